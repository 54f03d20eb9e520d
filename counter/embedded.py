"""A local PostgreSQL for when no DATABASE_URL is given.

It runs the PostgreSQL 16 binaries that the `pgserver` wheel ships (or, where
that wheel is not available, e.g. Python 3.13, Debian's postgresql package),
listening on 127.0.0.1 only (no Unix socket), with its data under
DATA_DIR/pgdata. PostgreSQL refuses to run as root, so as root it runs as an
unprivileged system user.
"""

import glob
import logging
import os
import pathlib
import socket
import subprocess
import warnings

log = logging.getLogger("counter.embedded")

SYSTEM_USER = "pgserver"


def _binaries() -> pathlib.Path:
    """The folder holding initdb and pg_ctl."""
    try:
        with warnings.catch_warnings():
            # importing pgserver touches platformdirs, which warns when
            # XDG_RUNTIME_DIR is unset; we use none of its runtime paths
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
        return POSTGRES_BIN_PATH
    except ImportError:
        pass
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                    key=lambda p: int(p.split("/")[4]))
    if debian:
        return pathlib.Path(debian[-1]).parent
    raise RuntimeError("no PostgreSQL binaries for the embedded database: install the pgserver "
                       "package (Python <= 3.12) or Debian's postgresql, or set DATABASE_URL")


def _ensure_system_user(name):
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def _ensure_reachable(path: pathlib.Path, mode: int):
    """Let another user reach `path`: o+x on every parent folder, `mode` added on it."""
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o001)
    path.chmod(path.stat().st_mode | mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    def __init__(self, data_dir, port=None):
        self.pgdata = pathlib.Path(data_dir).absolute() / "pgdata"
        self.port = port
        self.user = SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool, *args, timeout=60):
        command = [str(_binaries() / tool), "-D", str(self.pgdata), *args]
        # the user's own group and no others: keeping root's group would apply
        # the (closed) group bits of root-owned folders on the way to the data
        as_user = {}
        if self.user is not None:
            entry = _ensure_system_user(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **as_user)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        return done.stdout

    def _prepare(self):
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            entry = _ensure_system_user(self.user)
            _ensure_reachable(self.pgdata, 0)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            binaries = _binaries()
            for folder in (binaries, binaries.parent / "lib"):
                if folder.is_dir():
                    _ensure_reachable(folder, 0o005)
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("creating embedded PostgreSQL cluster in %s", self.pgdata)
            self._run("initdb", "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres")

    def running_port(self):
        """The port of a server already running on this data directory, or None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return port

    def start(self) -> str:
        """Start (or reuse) the server; return its URL."""
        self._prepare()
        port = self.running_port()
        if port is not None:
            self.port = port
            log.info("embedded PostgreSQL already running on port %d", port)
            return self.url
        self.port = self.port or free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=on"
        self._run("pg_ctl", "-w", "-t", "60", "-l", str(self.pgdata / "server.log"),
                  "-o", options, "start")
        log.info("embedded PostgreSQL started on 127.0.0.1:%d (data in %s)", self.port, self.pgdata)
        return self.url

    def stop(self, mode="fast"):
        if self.running_port() is not None:
            self._run("pg_ctl", "-w", "-t", "60", "-m", mode, "stop")
            log.info("embedded PostgreSQL stopped")
