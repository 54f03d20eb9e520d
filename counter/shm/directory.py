"""The shared-memory directory (SHM_DIR) as a whole: who owns it, whether it
was removed while the service ran, and whether it has room.

    node.json      which service owns the directory: its pid and start time,
                   address, and the database it flushes to (password masked)
    node.lock      held only while a starting service checks and writes node.json
    recreated_at   written when a process notices that the directory (or a
                   file in it) was removed under the running service

A service refuses to start on a directory whose owner still lives; a
standalone flusher (`counter flusher`) takes no ownership and may run beside it.
"""

import contextlib
import fcntl
import json
import logging
import os
import time

log = logging.getLogger("counter.shm")

NODE_FILE = "node.json"
NODE_LOCK = "node.lock"
REMOVED_MARK = "recreated_at"


class InUse(RuntimeError):
    """Another live service owns the directory."""


def process_start_time(pid: int):
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if
    there is no such process or it has exited (a zombie not yet reaped). With
    the pid it names one process for good, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    fields = stat[stat.rindex(b")") + 2:].split()
    return None if fields[0] == b"Z" else int(fields[19])


def _write_json(path, value):
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f)
    os.replace(temporary, path)


def read_node(directory):
    try:
        with open(os.path.join(directory, NODE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def owner_alive(node) -> bool:
    """True while the process named by a node file still runs (same pid and start time)."""
    try:
        return node is not None and process_start_time(int(node["pid"])) == node["pid_start"]
    except (KeyError, TypeError, ValueError):
        return False


def claim(directory, **about):
    """Make this process the directory's owner, or raise InUse naming the
    live owner. `about` goes into the node file (e.g. bind, database).
    Returns the previous owner's node file (None if there was none).
    Invariant 6: the segments a dead service left stay; nothing here wipes them."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, NODE_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two starts at once: one checks and writes at a time
        node = read_node(directory)
        if owner_alive(node) and node["pid"] != os.getpid():
            raise InUse(f"SHM_DIR {directory} belongs to a running click-counter service "
                        f"(pid {node['pid']}, bind {node.get('bind', '?')}); stop it first, "
                        f"or give this one its own SHM_DIR")
        pid = os.getpid()
        mine = dict(about, pid=pid, pid_start=process_start_time(pid), claimed_at=time.time())
        _write_json(os.path.join(directory, NODE_FILE), mine)
        return node
    finally:
        os.close(fd)


def update_node(directory, **about):
    """Add to this (owning) process's node file."""
    node = dict(read_node(directory) or {}, **about)
    _write_json(os.path.join(directory, NODE_FILE), node)
    return node


def restore_node(directory, node):
    """Write a node file back after the directory was recreated."""
    if node is not None:
        with contextlib.suppress(OSError):
            _write_json(os.path.join(directory, NODE_FILE), node)


def note_removal(directory, what: str):
    """Something in `directory` was removed under the running service: make
    the directory again, mark when (for /health), and say so in one line."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        _write_json(os.path.join(directory, REMOVED_MARK), {"at": time.time(), "noticed": what})
    log.warning("%s was removed from under the running service (a tmp cleaner, or "
                "systemd-logind's RemoveIPC?); recreated it. Nothing is lost: the counts are "
                "still mapped and go back into it (%s)", directory, what)


def recreated_at(directory):
    """When the directory was last found removed (and made again), or None."""
    try:
        with open(os.path.join(directory, REMOVED_MARK)) as f:
            return float(json.load(f)["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def free_bytes(directory) -> int:
    """Bytes an unprivileged writer may still allocate on the directory's filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
