"""/health does not lie (DESIGN invariant 13): `degraded` whenever counting is
not fully working -- a frozen flusher, refused clicks -- and `pending` read
from the segments when asked. Real service trees, real PostgreSQL."""

import json
import os
import signal
import threading
import time

import pytest
from conftest import clicks_by_banner, wait_until

from counter.testing import audit, clicker

pytestmark = pytest.mark.service


def health(service):
    return json.loads(service.get("/health")[1])


def test_a_frozen_flusher_makes_health_degraded_and_pending_shows_the_clicks(
        database_url, service_factory, stack):
    service = service_factory(database_url, server=stack, workers=2)
    assert wait_until(lambda: health(service)["status"] == "ok", timeout=10), health(service)
    flusher = service.flusher_pid()
    tally = clicker.Tally()
    load = threading.Thread(target=clicker.drive, args=(service.url, 10**8), kwargs=dict(
        banners=200, connections=8, seconds=7, tally=tally))
    load.start()
    time.sleep(1.0)
    os.kill(flusher, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        degraded = wait_until(lambda: (h := health(service))["status"] == "degraded" and h, timeout=10)
        assert degraded, health(service)
        # the lag bound is max(5 x FLUSH_INTERVAL, 5 s): not before, and not much after
        assert 4.0 <= time.monotonic() - frozen_at < 8.0
        assert degraded["flusher"]["alive"] and degraded["flusher"]["stalled"]
        assert any("has not committed" in p for p in degraded["problems"])
        stored = sum(clicks_by_banner(database_url).values())
        assert degraded["pending"] > 1000 and degraded["pending"] >= tally.total - stored - 5000
    finally:
        os.kill(flusher, signal.SIGCONT)
    load.join()
    assert wait_until(lambda: health(service)["status"] == "ok", timeout=10), health(service)
    assert wait_until(lambda: sum(clicks_by_banner(database_url).values()) >= tally.total, timeout=30)
    assert wait_until(lambda: health(service)["pending"] == 0, timeout=10)
    verdict = audit.compare(tally, *audit.stored_clicks(database_url))
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0, verdict


def test_refused_clicks_make_health_degraded_and_are_logged_sparingly(database_url, service_factory):
    # room for a few small segments: new banner ids soon get 503
    service = service_factory(database_url, workers=2, flush_interval=5, extra_env={
        "SEGMENT_SLOTS": "16", "IMPRESSION_SLOTS": "16", "SHM_MAX_BYTES": str(64 << 10)})
    assert wait_until(lambda: health(service)["status"] == "ok", timeout=15), health(service)
    tally = clicker.drive(service.url, 10**8, banners=100_000, connections=8, seconds=4)
    assert tally.statuses.get(503, 0) > 100, tally.summary()
    h = health(service)
    assert h["status"] == "degraded" and h["refusals"]["recent"], h
    assert any("refused" in p for p in h["problems"])
    # at most one line per worker per 10 s (the load ran 4 s: one line each)
    lines = service.log().count("refused")
    assert 1 <= lines <= 2, service.log()
    # ten seconds without a refusal: ok again
    assert wait_until(lambda: health(service)["status"] == "ok", timeout=20), health(service)
