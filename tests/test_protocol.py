"""The exactly-once flush protocol against a real PostgreSQL: a crash between
any two steps neither loses nor repeats a click."""

import fcntl
import logging
import os

import psycopg2
import pytest
from conftest import clicks_by_banner, query

from counter.flush.flusher import LOCK_FILE, Flusher, StopSignal
from counter.kinds import clicks as click_kind
from counter.shm import segment
from counter.shm.segment import SegmentFile, SegmentWriter
from counter.storage import connection, schema


class Crash(Exception):
    """Stands for the flusher process dying at a fault point."""


def crash_at(point, exc=Crash):
    def fault(where):
        if where == point:
            raise exc(f"fault at {where}")
    return fault


def count(shm, clicks):
    w = SegmentWriter(shm, 64, 1 << 20)
    for banner, n in clicks.items():
        for _ in range(n):
            assert w.add(banner)
    return w


def test_a_flush_stores_the_deltas_and_a_second_adds_only_new_clicks(shm, database_url):
    w = count(shm, {1: 3, 2: 1})
    f = Flusher(shm, database_url)
    assert f.flush_once()["clicks"] == 4
    count_more = {1: 2}
    for banner, n in count_more.items():
        for _ in range(n):
            w.add(banner)
    assert f.flush_once()["clicks"] == 2
    assert f.flush_once()["clicks"] == 0
    assert clicks_by_banner(database_url) == {1: 5, 2: 1}
    f.close()


def test_crash_after_staging_values_before_the_sequence_loses_nothing(shm, database_url):
    count(shm, {1: 3})
    seg = SegmentFile(segment.list_segments(shm)[0])
    # step (a) only: pending values written, PENDING_SEQ never raised
    w = seg.words
    for first in range(16, 16 + 4 * w[segment.USED], 4):
        w[first + segment.PENDING] = w[first + segment.COUNT]
    seg.close()
    f = Flusher(shm, database_url)
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 3}
    f.close()


@pytest.mark.parametrize("exc", [Crash, psycopg2.OperationalError])
def test_crash_before_commit_is_settled_as_not_committed(shm, database_url, exc):
    count(shm, {1: 3, 2: 2})
    with pytest.raises(exc):
        Flusher(shm, database_url, fault=crash_at("before_commit", exc)).flush_once()
    assert clicks_by_banner(database_url) == {}
    seg = SegmentFile(segment.list_segments(shm)[0])
    assert not seg.settled  # the crash left pending values behind
    seg.close()
    f = Flusher(shm, database_url)  # the next flusher
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 3, 2: 2}
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 3, 2: 2}
    f.close()


@pytest.mark.parametrize("exc", [Crash, psycopg2.OperationalError])
def test_crash_after_commit_is_settled_as_committed(shm, database_url, exc):
    """Dying after COMMIT, before pending becomes flushed (or the connection
    dropping while COMMIT's answer was on its way) must not count twice."""
    count(shm, {1: 3, 2: 2})
    with pytest.raises(exc):
        Flusher(shm, database_url, fault=crash_at("after_commit", exc)).flush_once()
    assert clicks_by_banner(database_url) == {1: 3, 2: 2}
    f = Flusher(shm, database_url)
    f.flush_once()
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 3, 2: 2}
    f.close()


def test_crash_halfway_through_confirming_is_settled(shm, database_url):
    count(shm, {1: 3, 2: 2, 3: 1})
    with pytest.raises(Crash):
        Flusher(shm, database_url, fault=crash_at("after_commit")).flush_once()
    seg = SegmentFile(segment.list_segments(shm)[0])
    w = seg.words
    w[16 + segment.FLUSHED] = w[16 + segment.PENDING]  # only the first record confirmed
    seg.close()
    f = Flusher(shm, database_url)
    f.flush_once()
    assert clicks_by_banner(database_url) == {1: 3, 2: 2, 3: 1}
    f.close()


def test_settlement_waits_for_the_database(shm, postgres_url, database_url):
    count(shm, {7: 4})
    with pytest.raises(Crash):
        Flusher(shm, database_url, fault=crash_at("after_commit")).flush_once()
    unreachable = "postgresql://nobody@127.0.0.1:1/none"
    with pytest.raises(psycopg2.OperationalError):
        Flusher(shm, unreachable).flush_once()
    seg = SegmentFile(segment.list_segments(shm)[0])
    assert not seg.settled  # nothing decided without the database
    seg.close()
    f = Flusher(shm, database_url)
    f.flush_once()
    assert clicks_by_banner(database_url) == {7: 4}
    f.close()


def test_finished_segments_are_drained_then_removed(shm, database_url):
    w = count(shm, {1: 2})
    path = w.path
    w.close()  # sealed
    f = Flusher(shm, database_url)
    assert f.flush_once()["retired"] == 1
    assert not os.path.exists(path)
    assert clicks_by_banner(database_url) == {1: 2}
    seg_id = os.path.basename(path)[:-4]
    assert query(database_url, "SELECT count(*) FROM segment_flushes WHERE segment_id=%s", (seg_id,)) == [(1,)]
    count(shm, {2: 1})  # the next flush transaction drops the retired sequence row
    f.flush_once()
    assert query(database_url, "SELECT count(*) FROM segment_flushes WHERE segment_id=%s", (seg_id,)) == [(0,)]
    f.close()


def test_segments_of_many_minutes_become_rows_per_minute(shm, database_url):
    clock_time = [1_700_000_000.0]
    w = SegmentWriter(shm, 16, 1 << 20, clock=lambda: clock_time[0])
    w.add(1)
    clock_time[0] += 60
    w.add(1)
    w.add(1)
    f = Flusher(shm, database_url)
    f.flush_once()
    rows = query(database_url, "SELECT extract(epoch FROM ts)::bigint, count FROM clicks ORDER BY ts")
    minute = int(1_700_000_000 // 60 * 60)
    assert rows == [(minute, 1), (minute + 60, 2)]
    f.close()


def fixed_clock_writer(shm, clicks, now=1_700_000_000.0):
    w = SegmentWriter(shm, 64, 1 << 20, clock=lambda: now)
    for banner, n in clicks.items():
        for _ in range(n):
            assert w.add(banner)
    return w


def test_a_minutes_first_flush_goes_in_by_bulk_insert_later_ones_by_upsert(shm, database_url,
                                                                           monkeypatch):
    upserted = []
    add_to_rows = click_kind._add_to_rows
    monkeypatch.setattr(click_kind, "_add_to_rows",
                        lambda cur, minute, banners, counts: (upserted.append(banners),
                                                              add_to_rows(cur, minute, banners, counts)))
    w = fixed_clock_writer(shm, {1: 3, 2: 1})
    f = Flusher(shm, database_url)
    assert f.flush_once()["clicks"] == 4
    assert upserted == []  # the new minute's rows were copied in
    w.add(1)
    w.add(3)
    assert f.flush_once()["clicks"] == 2
    assert upserted == [[1, 3]]  # the minute has rows now: add to them
    assert clicks_by_banner(database_url) == {1: 4, 2: 1, 3: 1}
    f.close()


def test_rows_another_node_made_in_a_new_minute_are_added_to(shm, database_url):
    """This flusher has written nothing of the minute, but another node has:
    the bulk insert meets its row halfway through, is rolled back to its
    savepoint, and the upsert adds to every row -- none counted twice."""
    minute = int(1_700_000_000 // 60)
    query(database_url, "INSERT INTO clicks VALUES (2, to_timestamp(%s * 60), 5)", (minute,))
    fixed_clock_writer(shm, {1: 3, 2: 1, 3: 2})
    f = Flusher(shm, database_url)
    assert f.flush_once()["clicks"] == 6
    assert clicks_by_banner(database_url) == {1: 3, 2: 6, 3: 2}
    assert query(database_url, "SELECT count(*) FROM segment_flushes WHERE seq = 1") == [(1,)]
    f.close()


def test_a_new_minutes_copy_waits_for_another_nodes_insert_then_adds_to_it(shm, database_url):
    """Another node's insert of the same row is still uncommitted: the COPY
    waits for it, meets the committed row, and the upsert adds to it."""
    import threading
    import time

    minute = int(1_700_000_000 // 60)
    other = storage_connect(database_url)
    other.cursor().execute("INSERT INTO clicks VALUES (1, to_timestamp(%s * 60), 4)", (minute,))
    fixed_clock_writer(shm, {1: 2, 2: 1})
    f = Flusher(shm, database_url)
    thread = threading.Thread(target=f.flush_once)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # waiting on the other node's row
    other.commit()
    thread.join(timeout=10)
    assert clicks_by_banner(database_url) == {1: 6, 2: 1}
    other.close()
    f.close()


def test_a_minute_after_2038_is_made_and_added_to(shm, database_url):
    w = fixed_clock_writer(shm, {1: 1}, now=2_240_000_000.0)  # in 2040
    f = Flusher(shm, database_url)
    f.flush_once()  # makes the row (COPY)
    w.add(1)
    f.flush_once()  # adds to it (upsert): minute * 60 needs 64 bits
    assert query(database_url, "SELECT extract(epoch FROM ts)::bigint, count FROM clicks") \
        == [(2_240_000_000 // 60 * 60, 2)]
    f.close()


def test_a_catch_up_over_many_minutes_copies_at_most_32_of_them(shm, database_url, monkeypatch):
    """Each COPY is a subtransaction; PostgreSQL caches 64 per transaction."""
    upserted = []
    add_to_rows = click_kind._add_to_rows
    monkeypatch.setattr(click_kind, "_add_to_rows",
                        lambda cur, minute, banners, counts: (upserted.append(minute),
                                                              add_to_rows(cur, minute, banners, counts)))
    now = [1_700_000_000.0]
    w = SegmentWriter(shm, 64, 1 << 22, clock=lambda: now[0])
    for _ in range(40):  # 40 minutes of clicks while the database was away
        w.add(1)
        w.add(2)
        now[0] += 60
    w.close()
    f = Flusher(shm, database_url)
    assert f.flush_once()["clicks"] == 80
    assert len(upserted) == 8  # the 33rd minute on
    assert clicks_by_banner(database_url) == {1: 40, 2: 40}
    assert query(database_url, "SELECT count(*) FROM clicks") == [(80,)]
    f.close()


def test_a_second_flusher_waits_for_the_first(shm, database_url):
    count(shm, {1: 1}).close()
    lock = os.open(os.path.join(shm, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    stop = StopSignal(0.0)
    stop.set()  # would flush once at once, if it could take the lock
    assert Flusher(shm, database_url).run(stop, interval=0.1) is False
    assert clicks_by_banner(database_url) == {}
    os.close(lock)
    stop = StopSignal(1.0)
    stop.set()
    assert Flusher(shm, database_url).run(stop, interval=0.1) is True
    assert clicks_by_banner(database_url) == {1: 1}


@pytest.mark.processes
def test_flusher_retries_while_the_database_is_down_and_catches_up(shm, data_dir, caplog):
    import threading

    #STORAGE_IMPORTS#
    from counter.flush.status import StatusFile
    from counter.storage import embedded

    caplog.set_level(logging.INFO, logger="counter.flusher")
    server = embedded.EmbeddedPostgres(data_dir)
    url = server.start()
    try:
        conn = connection.connect(url)
        schema.migrate(conn)
        conn.close()
        w = count(shm, {1: 2})
        stop = StopSignal(30.0)
        flusher = Flusher(shm, url)
        thread = threading.Thread(target=flusher.run, args=(stop, 0.1), kwargs={"max_backoff": 0.5})
        thread.start()
        assert wait(lambda: clicks_by_banner(url) == {1: 2})
        server.stop(mode="immediate")
        for _ in range(5):
            w.add(2)  # clicks keep being counted while the database is away
        assert wait(lambda: (StatusFile.read(shm) or {}).get("last_error"))
        assert wait(lambda: "attempt=3" in caplog.text)  # retried, and still failing
        server.start()  # same data directory, same port
        assert wait(lambda: clicks_by_banner(url) == {1: 2, 2: 5})
        w.close()  # the owner leaves; the stopping flusher drains and returns
        stop.set()
        thread.join(timeout=30)
        assert "flush failed" in caplog.text and "flush recovered" in caplog.text
        assert "password" not in caplog.text
    finally:
        server.stop(mode="immediate")


def wait(predicate, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except psycopg2.Error:
            pass
        time.sleep(0.05)
    return False


def test_migrations_run_concurrently_apply_once(postgres_url, database_url):
    # database_url only lends its server address; the migrations go to a new, empty database
    import threading

    #STORAGE_IMPORTS#

    fresh = database_url.rsplit("/", 1)[0] + "/" + "m_" + os.urandom(4).hex()
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {fresh.rsplit('/', 1)[1]}")
    results, errors = [], []

    def migrate():
        try:
            conn = connection.connect(fresh)
            results.append(schema.migrate(conn))
            conn.close()
        except Exception as exc:  # noqa: BLE001 -- collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert sorted(map(len, results)) == [0, 0, 0, 0, 0, len(schema._migrations())]
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE {fresh.rsplit('/', 1)[1]} WITH (FORCE)")
        admin.close()


def test_a_stopping_flusher_waits_for_live_owners_to_finish(shm, database_url):
    """SIGTERM may reach the flusher before the workers (a whole process group
    or cgroup is signalled): it keeps flushing until every owner is gone."""
    import threading
    import time

    w = count(shm, {1: 1})
    stop = StopSignal(20.0)
    stop.set()
    f = Flusher(shm, database_url)
    done = []
    thread = threading.Thread(target=lambda: done.append(f.run(stop, interval=0.05)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # the owner still lives: not done yet
    w.add(1)  # a late click before the owner exits
    w.close()
    thread.join(timeout=10)
    assert done == [True]
    assert clicks_by_banner(database_url) == {1: 2}
    assert segment.list_segments(shm) == []
    assert query(database_url, "SELECT count(*) FROM segment_flushes") == [(0,)]  # no leaked rows


def test_a_commit_still_in_flight_is_waited_for_not_dropped(shm, database_url):
    """The flush transaction holds its segments' sequence rows until it ends;
    settling takes the same rows FOR UPDATE, so it cannot read the old sequence
    while that commit is still on its way."""
    import threading
    import time

    count(shm, {1: 3})
    first = Flusher(shm, database_url)
    first._refresh()
    first._register()
    ends = {path: seg.words[segment.USED] for path, seg in first.segments.items()}
    batches, seqs, staged, _ = first._stage({}, ends, 1000)
    # the first flusher's transaction is open (as if its COMMIT were in flight)
    slow = storage_connect(database_url)
    cur = slow.cursor()
    cur.execute("UPDATE segment_flushes SET seq = %s WHERE segment_id = %s",
                (seqs[staged[0].id], staged[0].id))
    cur.execute("INSERT INTO clicks VALUES (1, to_timestamp(%s * 60), 3)", (staged[0].minute,))
    # its connection is gone; the same flusher (its rows already registered) settles
    first._drop_connection()
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(first.flush_once()))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # settling waits for the open transaction
    slow.commit()  # ... which commits after all
    thread.join(timeout=10)
    assert clicks_by_banner(database_url) == {1: 3}  # not 6
    slow.close()
    first.close()


def storage_connect(url):
    return connection.connect(url)


def test_an_idle_flusher_migrates_and_notices_an_outage(shm, make_database):
    """No click yet: the flusher still connects every cycle, so it applies the
    migrations (stats and campaigns need the tables before the first click)
    and an unreachable database is an error, for /health to report."""
    url = make_database(migrated=False)
    flusher = Flusher(shm, url)
    flusher.flush_once()
    flusher.close()
    assert query(url, "SELECT to_regclass('clicks') IS NOT NULL, to_regclass('campaigns') IS NOT NULL") == \
        [(True, True)]
    unreachable = Flusher(shm, "postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(unreachable.store.Error):
        unreachable.flush_once()
    unreachable.close()
