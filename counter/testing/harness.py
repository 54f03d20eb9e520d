"""A real service tree for tests and the fault suite: `python -m cli serve`
(the gunicorn master), its workers and its flusher, started and stopped by pid."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from counter.storage import embedded


def children(pid):
    """Direct children of a process (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def remove_tree(path, attempts=50):
    """rm -rf a directory that live processes keep writing into (a tmp
    cleaner removing SHM_DIR under a running service): a worker may create a
    segment file between the listing and the rmdir, or unlink one first, so
    one shutil.rmtree can fail with ENOTEMPTY or ENOENT. Retry until the
    directory itself is gone (the service may make it again right after)."""
    for _ in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                raise
            if exc.errno == errno.ENOENT and exc.filename == str(path):
                return  # the directory itself is gone
    raise RuntimeError(f"{path} kept filling up; gave up removing it after {attempts} tries")


class Service:
    """One real service tree: `python -m cli serve` (the gunicorn master), its
    workers and its flusher, on a free loopback port with its own shm dir."""

    def __init__(self, database_url, shm_dir, log_dir, workers=2, flush_interval=0.2,
                 extra_env=None, port=None, server="gunicorn"):
        self.port = port or embedded.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shm_dir = str(shm_dir)
        self.log_path = pathlib.Path(log_dir) / f"service-{self.port}.log"
        self.env = dict(os.environ, BIND=f"127.0.0.1:{self.port}",
                        SHM_DIR=self.shm_dir, WORKERS=str(workers),
                        FLUSH_INTERVAL=str(flush_interval), GRACEFUL_TIMEOUT="20")
        self.env["SERVER"] = server
        self.env.update(extra_env or {})
        self.env.pop("DATABASE_URL", None)
        if database_url:  # None: the service starts its embedded PostgreSQL
            self.env["DATABASE_URL"] = database_url
        self.workers = workers
        self.proc = None
        self.started_pids = set()

    def start(self, timeout=30):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=str(self.log_path.parent))
        log.close()
        self.started_pids.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.kill_all()  # whatever it forked before it exited
                raise RuntimeError(f"service exited at start:\n{self.log()}")
            if self.ready():
                self._remember_children()
                return self
            time.sleep(0.1)
        self.kill_all()  # a tree that never became ready must not be left running
        raise RuntimeError(f"service did not become ready:\n{self.log()}")

    def ready(self):
        if len(self.worker_pids()) < self.workers or self.flusher_pid() is None:
            return False
        try:
            with urllib.request.urlopen(self.url + "/v1/healthcheck", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _remember_children(self):
        self.started_pids.update(children(self.proc.pid))
        self.started_pids.update(self.worker_pids())

    @property
    def master_pid(self):
        return self.proc.pid

    def worker_pids(self):
        """The processes that serve requests: gunicorn's workers, or the
        workers of granian's main process."""
        found = []
        for pid in children(self.proc.pid):
            command = cmdline(pid)
            if "cli flusher" in command:
                continue
            found.extend(children(pid) if "-m granian" in command else [pid])
        return found

    def flusher_pid(self):
        found = [p for p in children(self.proc.pid) if "cli flusher" in cmdline(p)]
        return found[0] if found else None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_with_headers(self, path, timeout=30):
        """(status, headers) of a GET; (None, {}) when no answer came."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                r.read()
                return r.status, r.headers  # an email.message.Message: names ignore case
        except urllib.error.HTTPError as e:
            e.read()
            return e.code, e.headers
        except OSError:
            return None, {}

    def post(self, path, payload):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def terminate(self, timeout=40):
        """SIGTERM the master and wait for a clean exit; returns its exit code."""
        self._remember_children()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout=40):
        """SIGTERM if it still runs; then SIGKILL whatever of it is left."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()

    def kill_all(self):
        """SIGKILL every process this test started (by pid) that still lives.
        The tree is frozen first (SIGSTOP) and read again until no new process
        shows up: killed one by one while the rest ran, the supervisor or
        granian could start a replacement that nobody would kill."""
        seen, stopped = set(), set()
        self._remember_children()
        while not self.started_pids <= seen:
            stopped |= {pid for pid in self.started_pids - seen if self._signal(pid, signal.SIGSTOP)}
            seen |= self.started_pids
            for pid in stopped:  # what any of them started before it stopped
                self.started_pids.update(children(pid))
        for pid in self.started_pids:
            self._signal(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _signal(self, pid, signum):
        """Signal pid if it lives; True if it was signalled."""
        if pid == self.proc.pid and self.proc.poll() is not None:
            return False  # reaped: its pid may be another process's by now
        if not alive(pid):
            return False
        try:
            os.kill(pid, signum)
            return True
        except ProcessLookupError:
            return False
