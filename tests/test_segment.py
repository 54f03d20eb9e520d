"""The shared-memory segment: layout, publish order, rollover, bounds, ownership."""

import os
import time

import pytest

from counter.shm import segment
from counter.shm.segment import SegmentFile, SegmentWriter


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def writer(tmp_path, slots=16, max_bytes=1 << 20, clock=None):
    return SegmentWriter(tmp_path, slots, max_bytes, clock or Clock())


def records(path):
    seg = SegmentFile(path)
    try:
        w = seg.words
        return {w[16 + 4 * i]: w[17 + 4 * i] for i in range(w[segment.USED])}
    finally:
        seg.close()


def test_counts_land_in_a_file_named_for_the_minute(tmp_path):
    clock = Clock(1_700_000_030.0)
    w = writer(tmp_path, clock=clock)
    for banner in (5, 5, 7, 5):
        assert w.add(banner)
    paths = segment.list_segments(tmp_path)
    assert len(paths) == 1
    assert os.path.basename(paths[0]).startswith(f"{1_700_000_030 // 60}-{os.getpid()}-")
    assert records(paths[0]) == {5: 3, 7: 1}
    seg = SegmentFile(paths[0])
    assert seg.minute == 1_700_000_030 // 60
    assert not seg.finished()  # its owner (this process) lives and it is not sealed
    seg.close()


def test_a_record_is_published_only_after_its_key_is_written(tmp_path):
    """Readers see USED records only; each has its banner id already in place."""
    w = writer(tmp_path)
    seen_used = []

    class SpyWords:
        # Wrap the memoryview to observe the order of the stores.
        def __init__(self, words):
            self.words = words
            self.banner_written = set()

        def __getitem__(self, i):
            return self.words[i]

        def __setitem__(self, i, value):
            if i == segment.USED:
                # every record below the new USED must already carry its banner id
                for r in range(value):
                    assert self.words[16 + 4 * r] != 0
                seen_used.append(value)
            self.words[i] = value

    assert w.add(1)
    w._words = SpyWords(w._words)
    assert w.add(2) and w.add(3) and w.add(2)
    assert seen_used == [2, 3]


def test_the_minute_changing_seals_the_old_segment_and_starts_a_new_one(tmp_path):
    clock = Clock(1_700_000_000.0)
    w = writer(tmp_path, clock=clock)
    w.add(1)
    first = w.path
    clock.now += 60
    w.add(1)
    assert w.path != first
    old = SegmentFile(first)
    assert old.words[segment.SEALED] == 1 and old.finished()
    old.close()
    assert records(first) == {1: 1} and records(w.path) == {1: 1}


def test_a_full_segment_rolls_over_within_the_same_minute(tmp_path):
    w = writer(tmp_path, slots=16)
    for banner in range(1, 17):
        assert w.add(banner)
    first = w.path
    assert w.add(17)  # the 17th distinct banner needs a new segment
    assert w.path != first
    assert len(records(first)) == 16 and records(w.path) == {17: 1}
    assert w.add(1) and records(w.path) == {17: 1, 1: 1}


def test_memory_bound_refuses_new_banners_but_counts_known_ones(tmp_path):
    size = segment.file_size(16)
    w = writer(tmp_path, slots=16, max_bytes=size)  # room for exactly one segment
    for banner in range(1, 17):
        assert w.add(banner)
    assert not w.add(99)  # no room for a second segment
    assert w.add(3)  # a banner already in the segment still counts
    assert records(w.path)[3] == 2
    # the flusher retires the full segment: room again
    os.unlink(w.path)
    time.sleep(0.3)  # past the retry pause
    assert w.add(99)


def test_memory_bound_at_a_new_minute_refuses_everything(tmp_path):
    clock = Clock()
    size = segment.file_size(16)
    w = writer(tmp_path, slots=16, max_bytes=size, clock=clock)
    w.add(1)
    clock.now += 60
    assert not w.add(1)  # the old minute's segment cannot take it; no room for a new one
    assert SegmentFile(w_path := segment.list_segments(tmp_path)[0]).words[segment.SEALED] == 1
    os.unlink(w_path)
    time.sleep(0.3)  # past the retry pause
    assert w.add(1)


def test_close_seals_the_segment(tmp_path):
    w = writer(tmp_path)
    w.add(1)
    path = w.path
    w.close()
    seg = SegmentFile(path)
    assert seg.finished()
    seg.close()


def test_a_sealed_segment_takes_no_more_clicks(tmp_path):
    """Segments are sealed off add too (close; housekeeping, when SHM_DIR
    was removed); add must not count into a sealed one then, also when the
    clock steps back into the sealed segment's bounds."""
    clock = Clock(1_700_000_010.0)
    w = writer(tmp_path, clock=clock)
    assert w.add(1)
    first = w.path
    w.close()
    assert w.add(1)
    second = w.path
    assert second != first
    os.unlink(second)  # removed under the writer ...
    clock.now += segment.HOUSEKEEPING_INTERVAL + 1
    w.tick()  # ... so its housekeeping seals it and puts it back
    clock.now -= segment.HOUSEKEEPING_INTERVAL + 1  # e.g. NTP stepping the clock back
    assert w.add(1)
    assert w.path not in (first, second)
    assert [records(path) for path in (first, second, w.path)] == [{1: 1}] * 3
    w.close()


@pytest.mark.processes  # a forked owner
def test_a_segment_whose_owner_died_is_finished(tmp_path):
    pid = os.fork()
    if pid == 0:  # child: count and die without sealing
        w = writer(tmp_path)
        w.add(1)
        os._exit(0)
    os.waitpid(pid, 0)
    (path,) = segment.list_segments(tmp_path)
    seg = SegmentFile(path)
    assert seg.words[segment.SEALED] == 0
    assert seg.finished()
    seg.close()


def test_stage_and_confirm_move_counts_to_flushed(tmp_path):
    w = writer(tmp_path)
    for banner in (1, 1, 2):
        w.add(banner)
    seg = SegmentFile(w.path)
    assert seg.stage() == {1: 2, 2: 1}
    assert not seg.settled
    w.add(1)  # a click during the flush is not part of it
    seg.commit_pending()
    assert seg.settled and seg.unflushed() == 1
    assert seg.stage() == {1: 1}
    seg.discard_pending()
    assert seg.settled and seg.stage() == {1: 1}
    seg.close()


def test_not_a_segment_is_refused(tmp_path):
    path = tmp_path / "1-2-3.seg"
    path.write_bytes(b"\0" * 256)
    with pytest.raises(ValueError):
        SegmentFile(str(path))


def test_a_full_tmpfs_is_no_room_not_a_crash(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    w = writer(tmp_path)
    assert not w.add(1)  # a 503 for the client; the worker lives on
    assert os.listdir(tmp_path) == []  # and the half-made file is gone


def test_a_live_owner_is_seen_through_its_lock_in_any_pid_namespace(tmp_path):
    """Liveness comes from the owner's shared lock, not from /proc: a pid the
    flusher cannot see (another container) does not make a live segment finished."""
    w = writer(tmp_path)
    w.add(1)
    seg = SegmentFile(w.path)
    seg.words[segment.OWNER_PID] = 999_999_999  # no such pid here
    assert not seg.finished()
    w.close()
    assert seg.finished()
    seg.close()


def test_stray_files_are_ignored(tmp_path):
    (tmp_path / "notes.seg").write_text("hello")
    (tmp_path / "1-2-zz.seg").write_text("hello")
    assert segment.list_segments(tmp_path) == []


def test_the_file_layout_is_the_one_earlier_versions_wrote():
    """Segment files left by an earlier version stay readable: the magic
    numbers and word positions are those it wrote (layout.py holds them now)."""
    from counter.shm import layout

    assert (layout.CLICKS, layout.IMPRESSIONS, layout.WORKER_COUNTERS) == (
        (0x31474553_4B434C43, ".seg", 4), (0x31474F4C_504D4943, ".imp", 5), (0x31535457_4B434C43, ".wst", 0))
    assert (layout.OWNER_PID, layout.OWNER_START, layout.MINUTE, layout.CAPACITY, layout.USED,
            layout.SEALED, layout.FLUSHED_SEQ, layout.PENDING_SEQ, layout.PENDING_USED,
            layout.FLUSHED_USED, layout.PENDING_START, layout.MOVED) == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15)
    assert (layout.REJECTED_CLICKS, layout.REJECTED_IMPRESSIONS, layout.LAST_REFUSAL_AT) == (11, 12, 13)
    assert (layout.BANNER, layout.COUNT, layout.FLUSHED, layout.PENDING) == (0, 1, 2, 3)
    assert layout.file_size(16384) == 8 * (16 + 4 * 16384)
