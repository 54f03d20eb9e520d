"""One lifecycle for both serving stacks (counter.serving.lifecycle): it holds
the settings in force, gives them to the processes it starts in an explicit
environment (nothing writes os.environ), stops the server, then the
flusher's final flush, then the database, and closes a gunicorn worker's
segments at its exit through what its app registered with it (gunicorn_hooks.worker_application)."""

import ast
import os
import shutil
import signal
import tempfile

import pytest
from conftest import ROOT, query, wait_until

from counter import config
from counter.flush import status
from counter.serving import lifecycle
from counter.shm import segment
from counter.storage import embedded
from counter.testing import clicker
from counter.testing.harness import children, cmdline


def _is_os_environ(node):
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def environ_writes(source):
    """(line, what) for every write to the process environment in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if _is_os_environ(target) or (isinstance(target, ast.Subscript)
                                              and _is_os_environ(target.value)):
                    found.append((node.lineno, ast.unparse(target)))
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id
            if name in ("putenv", "unsetenv") or (
                    isinstance(func, ast.Attribute) and _is_os_environ(func.value)
                    and name in ("update", "setdefault", "pop", "popitem", "clear",
                                 "__setitem__", "__delitem__")):
                found.append((node.lineno, ast.unparse(func)))
    return found


def test_the_environ_scan_sees_every_kind_of_write():
    source = ("import os\nfrom os import environ\nos.environ['A'] = '1'\nos.environ.update(B='2')\n"
              "environ['C'] = '3'\ndel os.environ['D']\nos.putenv('E', '5')\nos.environ.get('F')\n"
              "x = dict(os.environ, G='7')\n")
    assert sorted(line for line, _ in environ_writes(source)) == [3, 4, 5, 6, 7]


def test_no_module_in_counter_or_cli_writes_os_environ():
    found = [f"{path.relative_to(ROOT)}:{line}: {what}"
             for package in ("counter", "cli") for path in sorted((ROOT / package).rglob("*.py"))
             for line, what in environ_writes(path.read_text())]
    assert found == []


def test_no_module_in_counter_or_cli_reaches_into_sys_modules():
    """Modules get what they need passed in or imported, never looked up in
    sys.modules (the worker's app registers what it closes with the lifecycle)."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for package in ("counter", "cli") for path in sorted((ROOT / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "modules"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert found == []


def test_prepare_writes_no_environment_and_children_get_the_settings_in_force(database_url, tmp_path):
    given = {"DATABASE_URL": database_url, "SHM_DIR": str(tmp_path / "shm"), "WORKERS": "1",
             "SHM_MAX_BYTES": str(1 << 60), "SERVER": "granian", "SOMETHING_ELSE": "kept"}
    before = dict(os.environ)
    service = lifecycle.Lifecycle(config.load(given), given)
    service.prepare()
    try:
        assert dict(os.environ) == before
        in_force = service.settings.shm_max_bytes
        assert in_force < 1 << 60  # lowered to the room the directory's filesystem has
        child = service.child_environment()
        assert child["SHM_MAX_BYTES"] == str(in_force)
        assert child["DATABASE_URL"] == database_url and child["SERVER"] == "granian"
        assert child["SOMETHING_ELSE"] == "kept"
        assert config.load(child) == service.settings  # a child loads exactly the settings in force
    finally:
        assert service.stop()


# -- on a real tree, with the embedded PostgreSQL (DATABASE_URL unset) ----------------

def environment_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


def running_url(data_dir):
    server = embedded.EmbeddedPostgres(data_dir)
    server.port = server.running_port()
    return server.url if server.port else None


@pytest.mark.service
def test_the_flusher_and_granian_get_the_embedded_url_and_shm_bound_in_their_environment(
        data_dir, service_factory, stack):
    service = service_factory(None, server=stack, workers=1, extra_env={"DATA_DIR": str(data_dir)})
    url = running_url(data_dir)
    assert url is not None and "DATABASE_URL" not in service.env
    flusher = environment_of(service.flusher_pid())
    assert flusher["DATABASE_URL"] == url
    assert flusher["SHM_MAX_BYTES"] == str(config.load(service.env).shm_max_bytes)
    if stack == "granian":  # its workers build their app from their environment
        (main,) = [p for p in children(service.master_pid) if "-m granian" in cmdline(p)]
        for pid in [main, *service.worker_pids()]:
            assert environment_of(pid)["DATABASE_URL"] == url
            assert environment_of(pid)["SERVER"] == "granian"


@pytest.mark.service
def test_the_embedded_database_is_up_for_the_flushers_final_flush(data_dir, service_factory, stack):
    service = service_factory(None, server=stack, workers=1, flush_interval=600,
                              extra_env={"DATA_DIR": str(data_dir)})
    # the flusher's first round (at its start) is done; the next is 10 minutes away
    assert wait_until(lambda: (status.StatusFile.read(service.shm_dir) or {}).get("last_flush_at"))
    tally = clicker.drive(service.url, 300, banners=3, connections=3, seconds=30)
    assert tally.statuses[200] == 300
    url = running_url(data_dir)
    assert query(url, "SELECT count(*) FROM clicks") == [(0,)]  # all still in shared memory
    assert service.terminate() == 0
    assert running_url(data_dir) is None  # stopped with the service, after the final flush
    server = embedded.EmbeddedPostgres(data_dir)
    try:
        assert query(server.acquire(create=False), "SELECT sum(count) FROM clicks") == [(300,)]
    finally:
        server.release()


@pytest.mark.service
def test_a_gunicorn_worker_leaving_gracefully_seals_its_segments(database_url, service_factory):
    service = service_factory(database_url, workers=2, flush_interval=600)

    def counting_pids():
        clicker.drive(service.url, 200, banners=5, connections=8, seconds=10)
        return {int(os.path.basename(p).split("-")[1]) for p in segment.list_segments(service.shm_dir)}

    workers = service.worker_pids()
    assert wait_until(lambda: set(workers) <= counting_pids(), timeout=30)  # each has a segment
    # the flusher's first round (made at its start, maybe late on a busy machine)
    # is over: its next one is 10 minutes away, so nothing retires the segments
    assert wait_until(lambda: (status.StatusFile.read(service.shm_dir) or {}).get("last_flush_at"), timeout=30)
    os.kill(service.master_pid, signal.SIGTTOU)  # one worker fewer: gunicorn stops one gracefully
    assert wait_until(lambda: len(service.worker_pids()) == 1, timeout=30)
    (gone,) = set(workers) - set(service.worker_pids())
    paths = [p for p in segment.list_segments(service.shm_dir) if f"-{gone}-" in os.path.basename(p)]
    assert paths  # not retired yet: the flusher's next round is 10 minutes away
    for path in paths:
        mapped = segment.SegmentFile(path)
        try:
            assert mapped.words[segment.SEALED] == 1, path
        finally:
            mapped.close()


@pytest.mark.service
def test_gunicorn_conf_py_run_directly_gives_its_workers_the_settings_in_force(data_dir, tmp_path):
    """`gunicorn -c gunicorn.conf.py` (not `counter serve`) on the embedded
    database: the workers read the embedded URL from the master's lifecycle."""
    import subprocess
    import sys
    import urllib.request

    from counter.testing.harness import alive

    port = embedded.free_port()
    shm_dir = tempfile.mkdtemp(prefix="cc-test-", dir="/dev/shm")
    env = dict(os.environ, DATA_DIR=str(data_dir), SHM_DIR=shm_dir, BIND=f"127.0.0.1:{port}",
               WORKERS="1", FLUSH_INTERVAL="0.2", GRACEFUL_TIMEOUT="20")
    env.pop("DATABASE_URL", None)
    log = open(tmp_path / "gunicorn.log", "wb")
    master = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    tree = [master.pid]

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read()
        except OSError:
            return None, b""

    try:
        assert wait_until(lambda: get("/counter/5")[0] == 200, timeout=30), \
            (tmp_path / "gunicorn.log").read_text()
        tree += children(master.pid)
        assert get("/counter/5")[0] == 200
        stats = "/stats/5?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&granularity=day"
        assert wait_until(lambda: b'"total": 2' in get(stats)[1]), (tmp_path / "gunicorn.log").read_text()
        master.send_signal(signal.SIGTERM)
        assert master.wait(timeout=40) == 0
        assert running_url(data_dir) is None
    finally:
        tree += children(master.pid)  # also when it failed before they were listed
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        master.wait()
        wait_until(lambda: not [pid for pid in tree if alive(pid)], timeout=10)
        shutil.rmtree(shm_dir, ignore_errors=True)
