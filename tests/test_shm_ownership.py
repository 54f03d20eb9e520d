"""SHM_DIR at start: one live service owns it (a second one refuses, a
standalone flusher may work beside it), and its bound must fit the tmpfs."""

import os
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ROOT, clicks_by_banner, wait_until

from counter.shm import directory
from counter.testing import clicker
from counter.testing.harness import Service

pytestmark = pytest.mark.service


def test_a_second_service_on_a_live_services_shm_dir_refuses_to_start(database_url, service_factory):
    first = service_factory(database_url, workers=1)
    node = directory.read_node(first.shm_dir)
    assert node["pid"] == first.master_pid and node["bind"].endswith(str(first.port))
    with pytest.raises(RuntimeError) as refused:
        service_factory(database_url, shm_dir=first.shm_dir, workers=1)
    assert f"belongs to a running click-counter service (pid {first.master_pid}" in str(refused.value)
    # the first one is unharmed: it counts, and stops promptly
    assert clicker.drive(first.url, 500, banners=5, connections=2).statuses[200] == 500
    assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) == 500, timeout=10)
    started = time.monotonic()
    assert first.terminate(timeout=30) == 0
    assert time.monotonic() - started < 10, first.log()
    # once its owner is gone, the directory can be had again
    again = service_factory(database_url, shm_dir=first.shm_dir, workers=1)
    assert directory.read_node(again.shm_dir)["pid"] == again.master_pid


def test_a_standalone_flusher_runs_beside_the_service(database_url, service_factory, tmp_path):
    service = service_factory(database_url, workers=1)
    env = dict(service.env)
    log = open(tmp_path / "standalone.log", "wb")
    standalone = subprocess.Popen([sys.executable, "-m", "cli", "flusher"], env=env, cwd=str(ROOT),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        assert clicker.drive(service.url, 300, banners=3, connections=2).statuses[200] == 300
        assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) == 300, timeout=10)
        # not refused: one of the two waits its turn on the flusher lock (on a
        # loaded machine the standalone one may take it while the service's
        # is between two lives; either way only one works the directory)
        assert wait_until(lambda: "waiting for it" in (tmp_path / "standalone.log").read_text()
                          or "waiting for it" in service.log(), timeout=30), \
            ((tmp_path / "standalone.log").read_text(), service.log())
        assert standalone.poll() is None
    finally:
        standalone.terminate()
        assert standalone.wait(timeout=30) in (0, 1)
        log.close()


@pytest.fixture
def small_tmpfs():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tempfile.mkdtemp(prefix="cc-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
    yield mount
    subprocess.run(["umount", mount], check=False)
    os.rmdir(mount)


def _start(database_url, shm_dir, tmp_path, **env):
    return Service(database_url, shm_dir, tmp_path, workers=2, extra_env=env)


def test_a_tmpfs_too_small_for_the_workers_is_refused_in_one_line(database_url, small_tmpfs, tmp_path):
    # two workers with default slots need ~2.3 MiB each; the tmpfs has 8 MiB -- make it 512 KiB of room
    filler = os.path.join(small_tmpfs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * ((8 << 20) - (512 << 10)))
    service = _start(database_url, os.path.join(small_tmpfs, "shm"), tmp_path)
    try:
        with pytest.raises(RuntimeError) as refused:
            service.start()
    finally:
        service.kill_all()
    lines = [line for line in str(refused.value).splitlines() if "cannot start" in line]
    assert len(lines) == 1, str(refused.value)
    assert "SHM_MAX_BYTES=268435456" in lines[0] and "bytes of room" in lines[0]
    assert "Traceback" not in str(refused.value)


def test_a_tmpfs_smaller_than_shm_max_bytes_lowers_the_bound_loudly(database_url, small_tmpfs, tmp_path):
    service = _start(database_url, os.path.join(small_tmpfs, "shm"), tmp_path,
                     SEGMENT_SLOTS="1024", IMPRESSION_SLOTS="1024")
    try:
        service.start()
        assert "less than SHM_MAX_BYTES=268435456: using SHM_MAX_BYTES=" in service.log()
        tally = clicker.drive(service.url, 10**8, banners=20_000, connections=8, seconds=3)
        assert tally.statuses[200] == tally.total > 1000, tally.summary()
        assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) >= tally.total, timeout=30)
        assert sum(clicks_by_banner(database_url).values()) == tally.total
    finally:
        service.stop(timeout=30)


def test_a_start_against_another_database_refuses_while_old_clicks_wait(
        database_url, make_database, service_factory):
    import signal

    from counter.testing.harness import alive

    old = service_factory(database_url, workers=1, flush_interval=600)
    time.sleep(1.0)  # the flusher's first (empty) round has passed; the next is far away
    assert clicker.drive(old.url, 5, banners=1, connections=1).statuses[200] == 5
    tree = [old.master_pid] + old.worker_pids() + [old.flusher_pid()]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)  # the node dies with its clicks in shared memory
    old.proc.wait()
    assert wait_until(lambda: not [p for p in tree if alive(p)], timeout=10)

    other = make_database()
    with pytest.raises(RuntimeError) as refused:
        service_factory(other, shm_dir=old.shm_dir, workers=1)
    line = [x for x in str(refused.value).splitlines() if "cannot start" in x]
    assert len(line) == 1 and "holds 5 clicks not yet flushed" in line[0], str(refused.value)
    assert "counter flusher --drain" in line[0]
    assert clicks_by_banner(other) == {}  # nothing went into the wrong database

    drained = subprocess.run([sys.executable, "-m", "cli", "flusher", "--drain"], cwd=str(ROOT),
                             env=dict(old.env, DATABASE_URL=database_url), timeout=60,
                             capture_output=True, text=True)
    assert drained.returncode == 0, drained.stderr
    assert clicks_by_banner(database_url) == {1: 5}
    service_factory(other, shm_dir=old.shm_dir, workers=1)  # nothing left: it starts
    assert clicks_by_banner(other) == {}
