"""The real service (gunicorn master, meinheld workers, flusher) against a real
PostgreSQL: every acknowledged click is stored exactly once, whatever dies."""

import os
import signal
import threading
import time

import pytest
from conftest import clicks_by_banner, wait_until

from counter.testing import audit, clicker
from counter.testing.harness import alive, children, cmdline

pytestmark = pytest.mark.service

N = 20_000


def wait_for_flush(url, tally, flush_interval=0.2):
    """Wait until the database holds at least every acknowledged click, then two
    more flush intervals, so that a late double count would show."""
    wait_until(lambda: sum(clicks_by_banner(url).values()) >= tally.total, timeout=30)
    time.sleep(max(1.0, 3 * flush_interval))
    return clicks_by_banner(url)


def assert_exact(url, tally):
    """No acknowledged click lost; none counted twice. A request cut off by a
    kill (unanswered) may or may not have been counted, so it is the only slack;
    every click whose round trip stayed in one minute is in that minute's row."""
    wait_for_flush(url, tally)
    by_banner, by_minute = audit.stored_clicks(url)
    verdict = audit.compare(tally, by_banner, by_minute)
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0, verdict
    assert verdict["minute_mismatches"] == 0, verdict
    return by_banner


def test_clicks_are_stored_exactly_per_banner_and_minute(database_url, service_factory, stack):
    service = service_factory(database_url, server=stack, workers=2)
    tally = clicker.drive(service.url, N, banners=500, connections=16, seconds=120)
    assert tally.total == N and tally.unanswered == 0, tally.summary()
    stored = assert_exact(database_url, tally)
    assert stored == dict(tally.acked)  # nothing unanswered: exact equality


def _load_in_background(service, total, **kwargs):
    tally = clicker.Tally()
    thread = threading.Thread(
        target=clicker.drive, args=(service.url, total),
        kwargs=dict(banners=300, connections=16, seconds=120, tally=tally, **kwargs))
    thread.start()
    return thread, tally


def test_kill_worker_mid_load_loses_nothing(database_url, service_factory, stack):
    service = service_factory(database_url, server=stack, workers=2)
    thread, tally = _load_in_background(service, N)
    time.sleep(1.0)
    victim = service.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    thread.join()

    assert service.proc.poll() is None, "the gunicorn master died:\n" + service.log()
    assert wait_until(lambda: len(service.worker_pids()) == 2 and victim not in service.worker_pids())
    after = clicker.drive(service.url, 1, banners=1, connections=1, tally=tally)
    assert after.statuses[200] >= 1  # the service still answers
    assert tally.total > N // 2, tally.summary()
    assert_exact(database_url, tally)


def test_kill_flusher_mid_load_is_back_within_two_seconds(database_url, service_factory, stack):
    service = service_factory(database_url, server=stack, workers=2)
    thread, tally = _load_in_background(service, N)
    time.sleep(1.0)
    victim = service.flusher_pid()
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replacement = wait_until(
        lambda: (p := service.flusher_pid()) is not None and p != victim and p, timeout=5, interval=0.02)
    back_after = time.monotonic() - killed_at
    thread.join()
    assert replacement, "no new flusher:\n" + service.log()
    assert back_after < 2.0, f"flusher back after {back_after:.2f}s"
    assert_exact(database_url, tally)


def test_sigterm_flushes_everything_before_exit(database_url, service_factory, stack):
    # A flush interval far longer than the test: only the shutdown drain can store the clicks.
    service = service_factory(database_url, server=stack, workers=2, flush_interval=600)
    time.sleep(1.5)  # let the flusher's first (empty) cycle pass
    tally = clicker.drive(service.url, 5000, banners=100, connections=8, seconds=60)
    assert tally.total == 5000
    assert sum(clicks_by_banner(database_url).values()) == 0
    code = service.terminate()
    assert code == 0, service.log()
    assert clicks_by_banner(database_url) == dict(tally.acked)
    assert not [n for n in os.listdir(service.shm_dir) if n.endswith(".seg")]
    assert not [p for p in service.started_pids if alive(p)]


def test_two_instances_on_one_machine_do_not_collide(database_url, service_factory, tmp_path):
    # gunicorn 27 would give both the same control socket under $HOME by default
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": ""}
    one = service_factory(database_url, workers=2, extra_env=env)
    two = service_factory(database_url, workers=2, extra_env=env)
    assert one.port != two.port and one.shm_dir != two.shm_dir
    tallies = []
    threads = []
    for service in (one, two):
        tally = clicker.Tally()
        tallies.append(tally)
        threads.append(threading.Thread(target=clicker.drive, args=(service.url, 8000),
                                        kwargs=dict(banners=100, connections=8, tally=tally)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    both = clicker.Tally()
    for tally in tallies:
        both.merge(tally)
    assert both.total == 16000
    assert_exact(database_url, both)
    assert not (home / ".gunicorn").exists(), "a gunicorn control socket was created"


def test_kill_master_ends_the_tree_and_the_next_start_drains_its_segments(database_url, service_factory, stack):
    service = service_factory(database_url, server=stack, workers=2, flush_interval=600)
    time.sleep(1.5)  # the first, empty flush cycle has passed; the next is 10 minutes away
    tally = clicker.drive(service.url, 4000, banners=100, connections=8, seconds=60)
    children = service.worker_pids() + [service.flusher_pid()]
    os.kill(service.master_pid, signal.SIGKILL)
    service.proc.wait()
    # workers notice their parent is gone; the flusher flushes once more and exits
    assert wait_until(lambda: not [p for p in children if alive(p)], timeout=15), \
        [p for p in children if alive(p)]
    again = service_factory(database_url, server=stack, shm_dir=service.shm_dir, workers=2)
    assert_exact(database_url, tally)
    assert wait_until(lambda: len(os.listdir(again.shm_dir)) and not [
        n for n in os.listdir(again.shm_dir)
        if n.endswith(".seg") and n.split("-")[1] in {str(p) for p in children}])


def test_without_meinheld_the_sync_worker_serves_exactly(database_url, service_factory):
    service = service_factory(database_url, workers=2, extra_env={"WORKER_CLASS": "sync"})
    tally = clicker.drive(service.url, 3000, banners=50, connections=4, seconds=60)
    assert tally.total == 3000
    assert_exact(database_url, tally)


def test_serve_without_database_url_runs_an_embedded_postgres(data_dir, service_factory):
    env = {"DATA_DIR": str(data_dir)}
    service = service_factory(None, workers=1, extra_env=env)
    for _ in range(3):
        assert service.get("/counter/9")[0] == 200
    body = wait_until(lambda: (b := service.get(
        "/stats/9?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&granularity=day")[1]) and b'"total": 3' in b and b)
    assert b'"total": 3' in body
    assert (data_dir / "pgdata" / "postmaster.pid").exists()
    assert service.terminate() == 0
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()  # stopped with the service


def test_several_threads_per_worker_are_refused(database_url, service_factory):
    with pytest.raises(RuntimeError) as failure:
        service_factory(database_url, workers=1, extra_env={"GUNICORN_CMD_ARGS": "--threads 4"})
    assert "one thread per worker is required" in str(failure.value)


def test_granians_main_process_killed_leaves_no_orphan_workers(database_url, service_factory):
    service = service_factory(database_url, workers=2, server="granian")
    (main,) = [p for p in children(service.master_pid) if "-m granian" in cmdline(p)]
    old_workers = service.worker_pids()
    tally = clicker.Tally()
    load = threading.Thread(target=clicker.drive, args=(service.url, 10**8),
                            kwargs=dict(banners=100, connections=8, seconds=4, tally=tally))
    load.start()
    time.sleep(1.5)
    os.kill(main, signal.SIGKILL)
    load.join()
    # the supervisor killed the old group (its workers do not watch their parent) and started anew
    assert wait_until(lambda: not [p for p in old_workers if alive(p)], timeout=15)
    assert wait_until(lambda: len(service.worker_pids()) == 2, timeout=15)
    assert clicker.drive(service.url, 50, banners=5, connections=2, tally=tally).statuses[200] >= 50
    assert_exact(database_url, tally)
