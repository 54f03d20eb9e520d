"""Shared fixtures: a real PostgreSQL, fresh databases, and real service trees.

PostgreSQL: TEST_DATABASE_URL when set (a server whose user may create
databases), otherwise one embedded server (the pgserver wheel's binaries)
for the whole session. Each test gets a database of its own.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import psycopg2
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `loadtest`

from counter import embedded, storage  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "service: starts real gunicorn process trees")


@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="cc-test-pg-") as data_dir:
        server = embedded.EmbeddedPostgres(data_dir)
        url = server.start()
        try:
            yield url
        finally:
            server.stop(mode="immediate")


def _with_database(url, name):
    parts = url.rsplit("/", 1)
    query = ""
    if "?" in parts[1]:
        query = "?" + parts[1].split("?", 1)[1]
    return f"{parts[0]}/{name}{query}"


@pytest.fixture
def database_url(postgres_url):
    """A fresh, migrated database for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = _with_database(postgres_url, name)
    conn = storage.connect(url)
    storage.migrate(conn)
    conn.close()
    try:
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def query(url, sql, args=()):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args or None)  # None: a literal % in the SQL stays as it is
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def clicks_by_banner(url):
    return dict(query(url, "SELECT banner_id, sum(count)::bigint FROM clicks GROUP BY banner_id"))


def clicks_by_minute(url):
    rows = query(url, "SELECT banner_id, extract(epoch FROM ts)::bigint / 60, count FROM clicks")
    return {(b, m): c for b, m, c in rows}


def free_port():
    return embedded.free_port()


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


class Service:
    """One real service tree: `python -m cli serve` (the gunicorn master), its
    workers and its flusher, on a free loopback port with its own shm dir."""

    def __init__(self, database_url, shm_dir, log_dir, workers=2, flush_interval=0.2,
                 extra_env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shm_dir = str(shm_dir)
        self.log_path = pathlib.Path(log_dir) / f"service-{self.port}.log"
        self.env = dict(os.environ, BIND=f"127.0.0.1:{self.port}",
                        SHM_DIR=self.shm_dir, WORKERS=str(workers),
                        FLUSH_INTERVAL=str(flush_interval), GRACEFUL_TIMEOUT="20",
                        **(extra_env or {}))
        self.env.pop("DATABASE_URL", None)
        if database_url:  # None: the service starts its embedded PostgreSQL
            self.env["DATABASE_URL"] = database_url
        self.workers = workers
        self.proc = None
        self.started_pids = set()

    def start(self, timeout=30):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        log.close()
        self.started_pids.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited at start:\n{self.log()}")
            if self.ready():
                self._remember_children()
                return self
            time.sleep(0.1)
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

    @property
    def master_pid(self):
        return self.proc.pid

    def worker_pids(self):
        return [p for p in children(self.proc.pid) if "cli flusher" not in cmdline(p)]

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

    def kill_all(self):
        """SIGKILL every process this test started (by pid) that still lives."""
        self._remember_children()
        for pid in self.started_pids:
            if pid != self.proc.pid and alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def service_factory(tmp_path):
    """start(database_url, shm_dir=None, ...) -> a running Service; all are
    stopped (SIGTERM, then SIGKILL by pid) and their shm dirs removed after the test."""
    started, made = [], []

    def start(database_url, shm_dir=None, **kwargs):
        if shm_dir is None:
            shm_dir = tempfile.mkdtemp(prefix="cc-test-", dir="/dev/shm")
            made.append(shm_dir)
        service = Service(database_url, shm_dir, tmp_path, **kwargs).start()
        started.append(service)
        return service

    yield start
    for service in started:
        if service.proc.poll() is None:
            try:
                service.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        service.kill_all()
    for shm_dir in made:
        shutil.rmtree(shm_dir, ignore_errors=True)


def wait_until(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
