"""SHM_DIR removed while the service runs (a tmp cleaner, systemd-logind's
RemoveIPC) loses nothing that was answered 2xx (DESIGN invariant 11): the
mappings still hold the counts, and whoever holds a mapping puts the file
back in the recreated directory."""

import json
import os
import shutil
import signal
import threading
import time

import pytest
from conftest import clicks_by_banner, wait_until

from counter.flush.flusher import LOCK_FILE, Flusher, StopSignal
from counter.shm import directory, segment
from counter.testing import audit, clicker
from counter.testing.harness import remove_tree


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def test_a_writer_puts_its_removed_segment_back_for_the_next_flusher(shm, database_url):
    clock = Clock()
    w = segment.SegmentWriter(shm, 64, 1 << 20, clock=clock)
    for _ in range(3):
        assert w.add(1)
    shutil.rmtree(shm)  # no flusher had the segment mapped
    clock.now += segment.HOUSEKEEPING_INTERVAL  # the writer's next housekeeping
    assert w.add(1)
    # the old segment is back under its own name, the new click in a new one
    assert len(segment.list_segments(shm)) == 2
    assert directory.recreated_at(shm) is not None
    f = Flusher(shm, database_url)
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 4}
    w.close()
    f.flush_once()
    f.close()
    assert clicks_by_banner(database_url) == {1: 4}


def test_a_flusher_puts_back_a_removed_segment_whose_owner_is_gone(shm, database_url):
    w = segment.SegmentWriter(shm, 64, 1 << 20)
    assert w.add(1)
    first = Flusher(shm, database_url)
    first.flush_once()  # mapped and held by this flusher from now on
    for banner in (1, 2):
        assert w.add(banner)
    w._segment.release()  # the worker dies without sealing (kill -9): only the flusher maps it
    shutil.rmtree(shm)
    first._put_back_removed()  # what the flusher does at the start of every round
    assert directory.recreated_at(shm) is not None
    first.close()  # ... and then it dies before it has drained
    second = Flusher(shm, database_url)
    second.flush_once()
    second.flush_once()
    second.close()
    assert clicks_by_banner(database_url) == {1: 2, 2: 1}
    assert segment.list_segments(shm) == []  # the copy was drained and retired


def test_a_flusher_that_finds_another_on_the_recreated_directory_hands_over(shm, database_url):
    import fcntl

    w = segment.SegmentWriter(shm, 64, 1 << 20)
    assert w.add(7)
    owned = w._segment
    first = Flusher(shm, database_url)
    result = []
    thread = threading.Thread(target=lambda: result.append(first.run(StopSignal(5.0), interval=0.05)))
    thread.start()
    assert wait_until(lambda: clicks_by_banner(database_url) == {7: 1}, timeout=10)
    assert w.add(7)
    owned.release()  # its worker is gone: only the first flusher maps it now
    shutil.rmtree(shm)
    os.mkdir(shm)
    other = os.open(os.path.join(shm, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)  # another flusher works the new directory
    thread.join(timeout=10)
    assert result == [False]
    # what only the first flusher held was put back for the other one
    (path,) = segment.list_segments(shm)
    second = Flusher(shm, database_url)
    second.flush_once()
    second.close()
    os.close(other)
    assert clicks_by_banner(database_url) == {7: 2}


def _remove_under_load(service, kill_flusher):
    """rm -rf SHM_DIR while clicks flow; optionally SIGKILL the flusher before
    it has drained what it held. Returns the tally of every answer."""
    tally = clicker.Tally()
    load = threading.Thread(target=clicker.drive, args=(service.url, 10**8), kwargs=dict(
        banners=300, connections=16, seconds=4, tally=tally))
    load.start()
    time.sleep(1.5)
    flusher = service.flusher_pid()
    remove_tree(service.shm_dir)
    if kill_flusher:
        os.kill(flusher, signal.SIGKILL)
    load.join()
    return tally


@pytest.mark.service
@pytest.mark.parametrize("kill_flusher", [False, True], ids=["flusher-lives", "flusher-killed"])
def test_shm_dir_removed_under_load_loses_nothing(database_url, service_factory, stack, kill_flusher):
    service = service_factory(database_url, server=stack, workers=2)
    tally = _remove_under_load(service, kill_flusher)
    assert tally.total > 1000 and tally.unanswered == 0, tally.summary()
    assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) >= tally.total, timeout=30)
    time.sleep(1.0)  # a late double count would show now
    by_banner, by_minute = audit.stored_clicks(database_url)
    verdict = audit.compare(tally, by_banner, by_minute)
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0, verdict
    health = json.loads(service.get("/health")[1])
    assert health["shm"]["recreated_at"] is not None, health
    assert "was removed from under the running service" in service.log()
    assert os.path.exists(os.path.join(service.shm_dir, LOCK_FILE))


@pytest.mark.service
def test_an_idle_worker_puts_back_what_a_removed_shm_dir_held(database_url, service_factory):
    """No click arrives after the removal: the worker's housekeeping runs from
    meinheld's loop, not only on its clicks."""
    service = service_factory(database_url, workers=1)
    flusher = service.flusher_pid()
    os.kill(flusher, signal.SIGSTOP)  # nothing gets flushed from now on
    assert clicker.drive(service.url, 7, banners=1, connections=1).statuses[200] == 7
    remove_tree(service.shm_dir)
    os.kill(flusher, signal.SIGKILL)  # only the worker maps the segment now
    # no click comes: the new flusher gets only what the idle worker puts back
    assert wait_until(lambda: clicks_by_banner(database_url) == {1: 7}, timeout=15), \
        clicks_by_banner(database_url)


def test_a_flusher_that_opened_a_file_just_before_its_writer_moved_it_leaves_it(shm, database_url):
    """The window between a flusher's open and its hold: the writer may put the
    file back meanwhile; the flusher must then leave the old one (the copy is
    the live file), or both would be flushed."""
    clock = Clock()
    w = segment.SegmentWriter(shm, 64, 1 << 20, clock=clock)
    for _ in range(4):
        assert w.add(3)
    (path,) = segment.list_segments(shm)
    opened = segment.SegmentFile(path)  # a flusher's open, before its hold
    shutil.rmtree(shm)
    clock.now += segment.HOUSEKEEPING_INTERVAL
    w.tick()  # the writer seals the unlinked file and, nobody holding it, puts it back
    assert segment.list_segments(shm) == [path]
    assert opened.hold() and opened.moved  # the flusher's check after its hold
    opened.close()
    f = Flusher(shm, database_url)
    f.flush_once()
    w.close()
    f.flush_once()
    f.close()
    assert clicks_by_banner(database_url) == {3: 4}


def test_a_writer_does_not_move_a_file_a_flusher_holds_even_from_another_thread(shm):
    """The flusher's hold is an open-file-description lock: it keeps writers
    out whatever else the holding process (or thread) opens and closes."""
    clock = Clock()
    w = segment.SegmentWriter(shm, 64, 1 << 20, clock=clock)
    assert w.add(5)
    (path,) = segment.list_segments(shm)
    held = segment.SegmentFile(path)
    assert held.hold()
    segment.SegmentFile(path).close()  # another descriptor of the file, closed (/health's scan)
    shutil.rmtree(shm)
    clock.now += segment.HOUSEKEEPING_INTERVAL
    w.tick()
    assert segment.list_segments(shm) == []  # not put back: the flusher drains it
    assert not held.moved
    held.close()
    clock.now += segment.HOUSEKEEPING_INTERVAL
    w.tick()  # the flusher let go (as if killed): now the writer puts it back
    assert segment.list_segments(shm) == [path]
    w.close()
