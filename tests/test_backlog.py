"""A backlog of any size drains (DESIGN invariant 10): a flush goes in parts of
a bounded number of rows, each exactly-once on its own, and a statement
timeout makes the next part smaller instead of failing the whole flush."""

import logging
import os
import threading
import time

import psycopg2
import pytest
from conftest import clicks_by_banner, query, wait_until
from test_service import assert_exact

from counter.flush import flusher as flusher_module
from counter.flush.flusher import Flusher, StopSignal
from counter.flush.status import StatusFile
from counter.kinds import clicks as click_kind
from counter.kinds.registry import CLICKS, IMPRESSIONS
from counter.shm import impressions, segment
from counter.shm.segment import SegmentFile, SegmentWriter
from counter.storage import connection, flush_writes, queries
from counter.storage.store import PostgresStore
from counter.web import health

NOW = 1_700_000_000.0
BACKLOG = 30_000


class Crash(Exception):
    """Stands for the flusher process dying at a fault point."""


def crash_at(point, nth=1):
    """A fault hook that raises at the nth time the flusher reaches `point`."""
    seen = [0]

    def fault(where):
        if where == point:
            seen[0] += 1
            if seen[0] == nth:
                raise Crash(f"fault at {where} #{nth}")
    return fault


def writer(shm, slots=16384, now=NOW):
    return SegmentWriter(shm, slots, 256 << 20, clock=lambda: now)


def click(w, banners, times=1):
    for banner in banners:
        for _ in range(times):
            assert w.add(banner)


def stored(url):
    """{banner: clicks}, read without the statement timeout the test set."""
    conn = psycopg2.connect(url, options="-c statement_timeout=0")
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT banner_id, sum(count)::bigint FROM clicks GROUP BY banner_id")
            return dict(cur.fetchall())
    finally:
        conn.close()


def set_statement_timeout(url, value):
    """For every new connection to the test's database (the flusher's too)."""
    name = url.rsplit("/", 1)[1].split("?")[0]
    query(url, f"ALTER DATABASE {name} SET statement_timeout = '{value}'")


def click_deltas(batches) -> dict:
    """A part's click deltas, {minute: {banner: delta}} (what write_flush took as `clicks`)."""
    return batches[CLICKS].deltas if CLICKS in batches else {}


def count_transactions(monkeypatch):
    calls = []
    write_part = flush_writes.write_part
    monkeypatch.setattr(flush_writes, "write_part",
                        lambda conn, batches, *args: (calls.append(sum(map(len, click_deltas(batches).values()))),
                                                      write_part(conn, batches, *args))[1])
    return calls


# -- the issue: a 30,000-banner backlog under a 20 ms statement timeout -------------------

@pytest.mark.parametrize("timeout", ["20ms", "0"])
def test_a_30000_banner_backlog_drains_within_30s_under_a_20ms_statement_timeout(
        shm, database_url, timeout, caplog):
    caplog.set_level(logging.INFO, logger="counter.flusher")
    w = writer(shm)
    click(w, range(1, BACKLOG + 1), times=2)
    w.close()  # two full-ish 16,384-slot segments, sealed: drained, then removed
    set_statement_timeout(database_url, timeout)
    f = Flusher(shm, database_url)
    started = time.monotonic()
    failures = []
    while time.monotonic() - started < 30 and segment.list_segments(shm):
        try:
            f.flush_once()
        except psycopg2.Error as exc:  # the old all-or-nothing flush ends here, every time
            failures.append(exc)
            time.sleep(0.1)
    took = time.monotonic() - started
    f.close()
    print(f"\n{BACKLOG} banners drained in {took:.3f}s with statement_timeout={timeout};"
          f" {caplog.text.count('retrying at once')} parts halved")
    assert stored(database_url) == dict.fromkeys(range(1, BACKLOG + 1), 2)  # all, none twice
    assert took < 30 and not failures, failures[:1]
    if timeout != "0":
        assert "retrying at once" in caplog.text  # the timeout did bite, and parts shrank


def test_the_running_flusher_drains_the_backlog_without_outage_backoff(shm, database_url, caplog):
    caplog.set_level(logging.INFO, logger="counter.flusher")
    w = writer(shm)
    click(w, range(1, BACKLOG + 1))
    set_statement_timeout(database_url, "20ms")
    stop = StopSignal(30.0)
    f = Flusher(shm, database_url)
    thread = threading.Thread(target=f.run, args=(stop, 0.2), kwargs={"max_backoff": 10.0})
    started = time.monotonic()
    thread.start()
    try:
        assert wait_until(lambda: sum(stored(database_url).values()) >= BACKLOG, timeout=30)
        took = time.monotonic() - started
    finally:
        w.close()
        stop.set()
        thread.join(timeout=30)
    print(f"\nFlusher.run stored {BACKLOG} banners in {took:.3f}s under a 20 ms timeout")
    assert stored(database_url) == dict.fromkeys(range(1, BACKLOG + 1), 1)
    assert "flush failed" not in caplog.text  # no outage backoff: parts shrank instead
    status = StatusFile.read(shm)
    assert status["totals"]["clicks"] == BACKLOG and status["totals"]["flush_failures"] == 0


# -- parts and their bound ---------------------------------------------------------------

def test_a_flush_of_100000_rows_stays_one_transaction(shm, database_url, monkeypatch):
    calls = count_transactions(monkeypatch)
    w = writer(shm)
    click(w, range(1, 100_001))
    f = Flusher(shm, database_url)
    assert f.flush_once()["rows"] == 100_000
    assert calls == [100_000]
    f.close()
    w.close()


def test_a_part_carries_at_most_the_bound_and_the_totals_add_up(shm, database_url, monkeypatch):
    calls = count_transactions(monkeypatch)
    click(writer(shm), range(1, 1001), times=3)
    f = Flusher(shm, database_url, max_part_rows=300)
    result = f.flush_once()
    assert calls == [300, 300, 300, 100]
    assert (result["rows"], result["clicks"]) == (1000, 3000)
    assert clicks_by_banner(database_url) == dict.fromkeys(range(1, 1001), 3)
    seg_id = os.path.basename(segment.list_segments(shm)[0])[:-4]
    assert query(database_url, "SELECT seq FROM segment_flushes WHERE segment_id = %s",
                 (seg_id,)) == [(4,)]  # one sequence step per part
    f.close()


def test_a_minutes_first_flush_goes_in_by_bulk_insert_in_every_part(shm, database_url, monkeypatch):
    upserted = []
    add_to_rows = click_kind._add_to_rows
    monkeypatch.setattr(click_kind, "_add_to_rows", lambda cur, minute, banners, counts: (
        upserted.append(len(banners)), add_to_rows(cur, minute, banners, counts)))
    one, two = writer(shm), writer(shm)
    click(one, range(1, 601))
    click(two, range(1001, 1601))  # another worker, other banners: new rows too
    f = Flusher(shm, database_url, max_part_rows=250)
    f.flush_once()
    assert upserted == []
    # a third worker's segment with banners rows exist of now: the upsert adds to them
    click(writer(shm), range(1, 301))
    f.flush_once()
    assert upserted and sum(upserted) == 300
    expected = {b: 2 if b <= 300 else 1 for b in list(range(1, 601)) + list(range(1001, 1601))}
    assert clicks_by_banner(database_url) == expected
    f.close()


def test_overlapping_workers_split_into_parts_store_each_click_once(shm, database_url):
    """Two workers' segments of one minute share banners; a part that meets
    rows an earlier part made must add to them, not copy."""
    one, two = writer(shm), writer(shm)
    click(one, range(1, 501), times=2)
    click(two, range(1, 501))
    f = Flusher(shm, database_url, max_part_rows=128)
    f.flush_once()
    assert clicks_by_banner(database_url) == dict.fromkeys(range(1, 501), 3)
    f.close()


def test_impression_logs_go_in_parts_too(shm, database_url, monkeypatch):
    from test_campaigns import KEY, make_campaign

    views = []
    write_part = flush_writes.write_part
    monkeypatch.setattr(flush_writes, "write_part", lambda conn, batches, seqs, retired, *rest: (
        views.append(len(batches[IMPRESSIONS].records if IMPRESSIONS in batches else ())),
        write_part(conn, batches, seqs, retired, *rest))[1])
    campaign = make_campaign(database_url)
    log = impressions.ImpressionLog(shm, 2048, 1 << 24)
    for user in range(700):
        assert log.append(campaign, impressions.user_hash(KEY, str(user)))
    f = Flusher(shm, database_url, max_part_rows=300)
    assert f.flush_once()["impressions"] == 700
    assert views == [300, 300, 100]
    conn = connection.connect(database_url)
    assert queries.campaign_stats(conn, campaign)[2] == 700
    conn.close()
    f.close()


# -- crashes between and within parts -------------------------------------------------------

@pytest.mark.parametrize("point,nth", [("before_commit", 1), ("before_commit", 3),
                                       ("after_commit", 1), ("after_commit", 3),
                                       ("between_parts", 1), ("between_parts", 2)])
def test_a_crash_between_or_within_parts_neither_loses_nor_repeats(shm, database_url, point, nth):
    one, two = writer(shm), writer(shm)
    click(one, range(1, 701), times=2)
    click(two, range(301, 901))
    with pytest.raises(Crash):
        Flusher(shm, database_url, max_part_rows=256, fault=crash_at(point, nth)).flush_once()
    click(one, range(1, 101))  # clicks go on while no flusher runs
    f = Flusher(shm, database_url, max_part_rows=256)
    f.flush_once()
    f.flush_once()
    expected = {b: (3 if b <= 100 else 2 if b <= 300 else 3 if b <= 700 else 1) for b in range(1, 901)}
    assert clicks_by_banner(database_url) == expected
    f.close()


def test_after_a_crash_each_segment_confirms_exactly_its_staged_range(shm, database_url):
    click(writer(shm), range(1, 1001))
    with pytest.raises(Crash):
        Flusher(shm, database_url, max_part_rows=300, fault=crash_at("after_commit", 2)).flush_once()
    seg = SegmentFile(segment.list_segments(shm)[0])
    w = seg.words
    assert (w[segment.PENDING_START], w[segment.PENDING_USED]) == (300, 600)
    assert not seg.settled
    # below the range, pending values a discarded stage might have left: not to be confirmed
    for i in range(300):
        w[16 + 4 * i + segment.PENDING] = 99
    seg.close()
    f = Flusher(shm, database_url, max_part_rows=300)
    result = f.flush_once()
    assert result["clicks"] == 300 + 400  # the settled part, then the rest
    assert clicks_by_banner(database_url) == dict.fromkeys(range(1, 1001), 1)
    f.close()


def test_old_segment_files_with_range_start_zero_are_settled_both_ways(shm, database_url):
    """A file staged by the flusher before ranges: every record pending, word
    PENDING_START never written (0). Committed or not, it settles right."""
    click(writer(shm), [1, 2, 3], times=2)
    seg = SegmentFile(segment.list_segments(shm)[0])
    w = seg.words
    for i in range(3):  # what the old stage() did
        w[16 + 4 * i + segment.PENDING] = w[16 + 4 * i + segment.COUNT]
    w[segment.PENDING_USED] = 3
    w[segment.PENDING_SEQ] = 1
    assert w[segment.PENDING_START] == 0
    seg.close()
    # not committed: discarded, then flushed
    f = Flusher(shm, database_url)
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 2, 2: 2, 3: 2}
    f.close()
    # committed by an old flusher, which then died: confirmed, not added again
    w2 = writer(shm, now=NOW + 60)
    click(w2, [4], times=5)
    seg = SegmentFile(w2.path)
    w = seg.words
    w[16 + segment.PENDING] = 5
    w[segment.PENDING_USED] = 1
    w[segment.PENDING_SEQ] = 1
    store = PostgresStore(database_url)
    store.register([seg.id])
    batch = CLICKS.flush([], {})()  # a minute not known to be new: added by upsert
    batch.add(seg, {4: 5})
    store.write_part({CLICKS: batch}, {seg.id: 1})
    store.close()
    seg.close()
    f = Flusher(shm, database_url)
    assert f.flush_once()["clicks"] == 5  # confirmed by the settlement
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 2, 2: 2, 3: 2, 4: 5}
    f.close()


# -- the adaptive bound ----------------------------------------------------------------------

def test_a_part_failing_at_the_smallest_size_backs_off_and_says_so(shm, database_url, caplog):
    caplog.set_level(logging.INFO, logger="counter.flusher")
    click(writer(shm), range(1, 1001))
    set_statement_timeout(database_url, "50ms")
    blocker = psycopg2.connect(database_url, options="-c statement_timeout=0")
    blocker.cursor().execute("LOCK TABLE clicks IN SHARE MODE")  # every insert waits, whatever its size
    f = Flusher(shm, database_url, max_part_rows=1000)
    with pytest.raises(psycopg2.errors.QueryCanceled):
        f.flush_once()
    assert f.part_rows == flusher_module.MIN_PART_ROWS
    assert "failed too; backing off" in caplog.text
    assert "part_rows=500" in caplog.text and "part_rows=256" in caplog.text
    blocker.rollback()
    blocker.close()
    f.flush_once()  # the segment was settled (not committed) and goes in now
    assert stored(database_url) == dict.fromkeys(range(1, 1001), 1)
    assert f.part_rows == 2 * flusher_module.MIN_PART_ROWS  # success grows the bound back
    f.close()


# -- the real service ------------------------------------------------------------------------

@pytest.mark.service
def test_kill_9_of_the_flusher_between_parts_stays_exact(database_url, service_factory):
    from counter.testing import clicker

    service = service_factory(database_url, workers=2, extra_env={
        "COUNTER_TEST_FAULT": "between_parts:0.3,before_commit:0.02,after_commit:0.02",
        "FLUSH_MAX_ROWS": "64"})
    tally = clicker.drive(service.url, 20_000, banners=600, connections=16, seconds=120)
    assert tally.total == 20_000, tally.summary()
    assert_exact(database_url, tally)
    restarts = service.log_path.read_text(errors="replace").count("died; restarting it")
    assert restarts >= 3, service.log()


@pytest.mark.parametrize("raw", ["0", "-5", "many", "2.5", "10000001"])
def test_flush_max_rows_is_validated_by_name(raw):
    from counter import config

    with pytest.raises(config.ConfigError, match="FLUSH_MAX_ROWS"):
        config.load({"FLUSH_MAX_ROWS": raw})
    assert config.load({}).flush_max_rows == flusher_module.MAX_PART_ROWS


def test_each_committed_part_of_a_long_flush_counts_as_progress_for_health(shm, database_url):
    """A catch-up of many slow parts is progress, not a stall (DESIGN
    invariant 13): under Flusher.run, /health's lag follows the last committed
    part, not the start of the flush, so a long drain does not make the node
    degraded."""
    w = writer(shm)
    click(w, range(1, 1201))
    began = time.monotonic()
    seen = []  # (seconds since the start, lag, stalled) at each pause between parts

    def slow_parts(where):
        if where == "between_parts":
            time.sleep(1.2)
            flusher = health.report(shm, time.time(), flush_interval=1.0)["flusher"]
            seen.append((time.monotonic() - began, flusher["lag_seconds"], flusher["stalled"]))

    stop = StopSignal(30.0)
    f = Flusher(shm, database_url, max_part_rows=200, fault=slow_parts)
    thread = threading.Thread(target=f.run, args=(stop, 1.0))
    thread.start()
    try:
        assert wait_until(lambda: len(seen) >= 5, timeout=30), seen  # six parts, five pauses
    finally:
        w.close()
        stop.set()
        thread.join(timeout=30)
    elapsed, lag, stalled = seen[4]
    assert elapsed > health.MIN_STALL, seen  # longer than a stall, counted from the start
    assert lag is not None and lag < 2.5 and not stalled, seen
