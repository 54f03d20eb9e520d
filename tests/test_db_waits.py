"""Clicks never wait on the database (DESIGN invariant 12).

`clicks` is locked (ACCESS EXCLUSIVE) for the whole run, so every stats
query waits until its statement timeout. Meanwhile K stats requests per
worker stay in flight (re-sent when they time out), and ~1,000 clicks/s go
to 2 workers: every click is answered 2xx within 100 ms and counted exactly
once the lock is gone, and a stats request beyond K is refused at once.
"""

import datetime
import gc
import http.client
import json
import shutil
import tempfile
import threading
import time

import falcon.testing
import psycopg2
import pytest
from conftest import clicks_by_banner, query, wait_until

from counter import config
from counter.shm import segment, thread_writers
from counter.storage import db_pool
from counter.web import app, click_route

WORKERS = 2
WAITERS = config.DEFAULT_DB_WAITERS  # K per worker
LOCK_SECONDS = 15  # the lock; clicks are sent for all of it
CLICKS_PER_SECOND = 1000
CLICK_CONNECTIONS = 10
CLICK_BUDGET = 0.1  # seconds: every click is answered within this
BANNERS = 50


def _request(port, path, conn=None):
    """(status, seconds, headers, body) of one GET; a new connection unless given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, time.monotonic() - started, response.headers, body
    finally:
        if own:
            conn.close()


def _stats_path():
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in (now - datetime.timedelta(hours=1), now))
    return f"/stats/1?from={start}&to={end}"


def _busy(answer):
    """A refusal for lack of a database slot (not a statement timeout)."""
    status, _, _, body = answer
    return status == 503 and b"waiting on the database" in body


def _keep_stats_waiting(port, stop, answers):
    """One client: a stats request after another until `stop`. One that timed
    out is sent again on the same connection, so the slot it held on that
    worker is taken again at once; a refused one is sent again shortly, on a
    new connection (so maybe to the other worker)."""
    conn = None
    while not stop.is_set():
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        sent = time.monotonic()
        try:
            answer = _request(port, _stats_path(), conn)
        except (OSError, http.client.HTTPException):  # the server closed it: a new one
            conn.close()
            conn = None
            continue
        answers.append((sent, answer))
        if _busy(answer) or answer[2].get("Connection", "").lower() == "close":
            conn.close()
            conn = None
        if _busy(answer):
            stop.wait(0.05)
    if conn is not None:
        conn.close()


def _click(port, seconds, first, latencies, statuses):
    """CLICKS_PER_SECOND / CLICK_CONNECTIONS clicks a second for `seconds`,
    paced (never bursting to catch up); a new connection every 100 clicks."""
    interval = CLICK_CONNECTIONS / CLICKS_PER_SECOND
    conn, due, i = None, time.monotonic(), first
    end = due + seconds
    while due < end:
        time.sleep(max(0.0, due - time.monotonic()))
        if conn is None or i % 100 == 0:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        banner = 1 + i % BANNERS
        sent = time.monotonic()
        status, seconds_taken, _, _ = _request(port, f"/counter/{banner}", conn)
        latencies.append((seconds_taken, banner, sent))
        statuses.append((status, banner))
        i += CLICK_CONNECTIONS
        due = max(due + interval, time.monotonic())
    conn.close()


def _waiting_stats(url):
    return query(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                      " AND application_name = 'click-counter' AND wait_event_type = 'Lock'")[0][0]


@pytest.mark.service
def test_a_waiting_database_does_not_stall_clicks(database_url, service_factory, stack):
    service = service_factory(database_url, workers=WORKERS, server=stack)
    port = service.port
    locker = psycopg2.connect(database_url)
    stop = threading.Event()
    answers, latencies, statuses = [], [], []
    stats_clients = [threading.Thread(target=_keep_stats_waiting, args=(port, stop, answers))
                     for _ in range(WORKERS * (WAITERS + 1))]  # one more than fits per worker
    # This process times the clicks: a full collection of its heap (the whole
    # suite's, ~50 ms per 100k objects here) would stall every click in flight
    # at once and be charged to the server (CI: five at 0.095-0.101 s).
    gc.disable()
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE clicks IN ACCESS EXCLUSIVE MODE")
        for thread in stats_clients:
            thread.start()
        assert wait_until(lambda: _waiting_stats(database_url) == WORKERS * WAITERS, timeout=4), \
            f"{_waiting_stats(database_url)} stats queries wait, not {WORKERS * WAITERS}"

        time.sleep(db_pool.STUCK)  # till then, one more may wait for a connection to come back
        # every worker holds K waiting requests: one more is refused at once
        waiting_since = time.monotonic()
        probe = _request(port, _stats_path())
        clickers = [threading.Thread(target=_click, args=(port, LOCK_SECONDS, i, latencies, statuses))
                    for i in range(CLICK_CONNECTIONS)]
        for thread in clickers:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in clickers):
            samples.append(_waiting_stats(database_url))
            time.sleep(1)
        for thread in clickers:
            thread.join()
    finally:
        gc.enable()
        stop.set()
        locker.rollback()
        locker.close()
        for thread in stats_clients:
            thread.join(timeout=30)

    slowest = [(round(seconds, 4), banner, round(sent - waiting_since, 3))
               for seconds, banner, sent in sorted(latencies, reverse=True)[:5]]
    assert slowest[0][0] < CLICK_BUDGET, f"slowest clicks (seconds, banner, sent at): {slowest}"
    assert len(latencies) >= 0.9 * CLICKS_PER_SECOND * LOCK_SECONDS, len(latencies)
    assert {status for status, _ in statuses} == {200}, sorted(set(statuses))[:5]

    status, seconds, headers, body = probe
    assert status == 503 and seconds < CLICK_BUDGET and headers.get("Retry-After"), probe
    assert json.loads(body)["code"] == 503
    refused = [a for sent, a in answers if sent > waiting_since and _busy(a)]
    assert refused and max(a[1] for a in refused) < CLICK_BUDGET, max(a[1] for a in refused)
    assert all(a[2].get("Retry-After") for a in refused)
    # K per worker waited throughout (a slot is free only between a timeout and the next request)
    assert sum(s == WORKERS * WAITERS for s in samples) >= 0.8 * len(samples), samples

    expected = {}
    for _status, banner in statuses:
        expected[banner] = expected.get(banner, 0) + 1
    assert wait_until(lambda: clicks_by_banner(database_url) == expected, timeout=30), \
        "clicks in the database differ from the clicks answered 200"


def _sealed(path):
    mapped = segment.SegmentFile(path)
    try:
        return mapped.words[segment.SEALED] == 1
    finally:
        mapped.close()


def test_a_gone_threads_segment_is_sealed_by_a_live_threads_housekeeping():
    """granian retires idle threads: what a gone thread counted stays, and its
    segment is sealed (so the flusher retires it) by a live thread's writer."""
    shm_dir = tempfile.mkdtemp(prefix="cc-test-", dir="/dev/shm")
    try:
        writers = thread_writers.ThreadWriters(shm_dir, 64, 1 << 20)
        assert writers.add(1)
        [mine] = writers.writers()
        gone = threading.Thread(target=lambda: [writers.add(2) for _ in range(3)])
        gone.start()
        gone.join()
        [orphan] = [writer for writer in writers.writers() if writer is not mine]
        path = orphan.path
        assert not _sealed(path)
        # the live thread's next housekeeping (at most a second away) adopts it
        assert wait_until(lambda: writers.add(1) and _sealed(path), timeout=5, interval=0.05)
        assert writers.writers() == [mine]
        mapped = segment.SegmentFile(path)
        try:
            assert mapped.stage() == {2: 3}  # the gone thread's clicks, for the flusher
        finally:
            mapped.close()
    finally:
        shutil.rmtree(shm_dir)


@pytest.mark.parametrize("served_by", ["click route", "falcon"])
def test_each_thread_counts_into_a_segment_of_its_own(served_by):
    """granian calls the app from several threads: each click lands in the
    segment of the thread that answered it, on the click route and on
    Falcon's (both keep the ThreadWriters' add, which finds the calling
    thread's writer at each click)."""
    shm_dir = tempfile.mkdtemp(prefix="cc-test-", dir="/dev/shm")
    try:
        writers = thread_writers.ThreadWriters(shm_dir, 64, 1 << 20)
        settings = config.load({"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "SHM_DIR": shm_dir})
        application = app.create_app(settings, writers, db_pool.Database(settings.database_url))
        if served_by == "click route":
            application = click_route.click_route(writers, application)
        client = falcon.testing.TestClient(application)

        def click(banner):
            for _ in range(banner):
                assert client.simulate_get(f"/counter/{banner}").status_code == 200

        for banner in (1, 2, 3):  # one thread after another: the outcome is certain
            thread = threading.Thread(target=click, args=(banner,))
            thread.start()
            thread.join()
        staged = []
        for path in segment.list_segments(shm_dir):
            mapped = segment.SegmentFile(path)
            staged.append(mapped.stage())
            mapped.close()
        assert sorted(staged, key=list) == [{1: 1}, {2: 2}, {3: 3}]
    finally:
        shutil.rmtree(shm_dir)
