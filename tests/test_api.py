"""Every route and error of the HTTP contract, through falcon.testing, with a
real segment writer and a real PostgreSQL behind the app."""

import datetime
import json
import os

import falcon.testing
import pytest
from conftest import query

from counter import config
from counter.flush.flusher import Flusher
from counter.shm import segment
from counter.storage import db_pool
from counter.web import app as app_module
from counter.web import click_route as click_route_module
from counter.web.app import create_app
from counter.web.click_route import click_route

MAX = 2**63 - 1


@pytest.fixture(params=["falcon", "raw-click-route"])
def env(request, tmp_path, database_url):
    """The app as Falcon alone, and with the raw click route in front (as
    served): every contract test runs against both."""
    shm = tmp_path / "shm"
    shm.mkdir()
    settings = config.load({"DATABASE_URL": database_url, "SHM_DIR": str(shm)})
    clicks = segment.SegmentWriter(shm, settings.segment_slots, settings.shm_max_bytes)
    db = db_pool.Database(database_url)
    application = create_app(settings, clicks, db)
    if request.param == "raw-click-route":
        application = click_route(clicks, application)
    client = falcon.testing.TestClient(application)
    client.shm = str(shm)
    client.url = database_url
    yield client
    db.close()
    clicks.close()


def insert(url, rows):
    query(url, "INSERT INTO clicks (banner_id, ts, count)"
          " SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::bigint[])",
          ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))


def assert_error(result, status):
    assert result.status_code == status, result.text
    body = result.json
    assert set(body) == {"error", "code"} and body["code"] == status and body["error"]
    assert result.headers["content-type"].startswith("application/json")


def flush(client):
    f = Flusher(client.shm, client.url)
    f.flush_once()
    f.close()


# -- clicks -------------------------------------------------------------------

def test_get_and_post_counter_count_a_click_each(env):
    r = env.simulate_get("/counter/123")
    assert r.status_code == 200 and r.content == b""
    assert dict(r.headers) == {"content-length": "0", "content-type": "application/json"}
    r = env.simulate_post("/counter/123")
    assert r.status_code == 200 and r.content == b""
    r = env.simulate_get("/v1/banners/counter/123")
    assert r.status_code == 204 and r.content == b"" and dict(r.headers) == {}
    assert env.simulate_get(f"/counter/{MAX}").status_code == 200
    assert env.simulate_get("/counter/0000000000000000000000123").status_code == 200  # leading zeros
    flush(env)
    assert dict(query(env.url, "SELECT banner_id, sum(count)::int FROM clicks GROUP BY 1")) == {123: 4, MAX: 1}


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "+1", "1.5", "1e3", str(MAX + 1),
                                 "99999999999999999999999999", "%20", "١٢٣", "0x10", "12abc"])
def test_bad_banner_ids_are_400_and_count_nothing(env, bad):
    assert_error(env.simulate_get(f"/counter/{bad}"), 400)
    assert_error(env.simulate_get(f"/v1/banners/counter/{bad}"), 400)
    assert_error(env.simulate_post(f"/stats/{bad}", json={"from": "2024-01-01", "to": "2024-01-02"}), 400)
    assert segment.list_segments(env.shm) == []  # nothing was even opened


@pytest.mark.parametrize("path", ["/counter/", "/counter", "/stats/", "/v1/banners/counter/"])
def test_an_empty_banner_id_is_400(env, path):
    assert_error(env.simulate_get(path), 400)


@pytest.mark.parametrize("raw", [False, True])
def test_a_full_memory_answers_503_with_retry_after(tmp_path, raw):
    full = type("Full", (), {"add": staticmethod(lambda banner: False)})()
    settings = config.load({"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "SHM_DIR": str(tmp_path)})
    application = create_app(settings, full, db_pool.Database(settings.database_url))
    client = falcon.testing.TestClient(click_route(full, application) if raw else application)
    for path in ("/counter/1", "/v1/banners/counter/1"):
        r = client.simulate_get(path)
        assert_error(r, 503)
        assert r.headers["retry-after"] == str(app_module.RETRY_AFTER)


def test_unknown_route_is_404_and_wrong_method_405(env):
    assert_error(env.simulate_get("/nope"), 404)
    assert_error(env.simulate_delete("/counter/1"), 405)
    assert_error(env.simulate_put("/stats/1"), 405)
    assert_error(env.simulate_post("/health"), 405)


def test_a_remembered_click_path_still_refuses_other_methods(env):
    assert env.simulate_get("/counter/77").status_code == 200  # the raw route remembers the path
    for method in ("DELETE", "PUT", "PATCH", "HEAD"):
        assert env.simulate_request(method, "/counter/77").status_code == 405
    flush(env)
    assert query(env.url, "SELECT sum(count)::int FROM clicks WHERE banner_id = 77") == [(1,)]


@pytest.mark.parametrize("env", ["raw-click-route"], indirect=True)
def test_the_memo_of_click_paths_stays_bounded_and_counts_exactly(env, monkeypatch):
    monkeypatch.setattr(click_route_module, "MEMO_SIZE", 3)
    route = env.app
    paths = [f"/counter/{banner}" for banner in range(1, 8)] + ["/v1/banners/counter/3"]
    for _ in range(5):
        for path in paths:
            assert env.simulate_post(path).status_code in (200, 204)
            assert len(route.memo) <= 3
    flush(env)
    expected = {banner: 5 for banner in range(1, 8)}
    expected[3] = 10
    assert dict(query(env.url, "SELECT banner_id, sum(count)::int FROM clicks GROUP BY 1")) == expected


# -- stats ----------------------------------------------------------------------

@pytest.fixture
def stats_rows(env):
    insert(env.url, [
        (5, "2024-01-01T10:00:00Z", 2),
        (5, "2024-01-01T10:05:00Z", 1),
        (5, "2024-01-01T11:59:00Z", 4),
        (5, "2024-01-02T00:00:00Z", 8),
        (6, "2024-01-01T10:00:00Z", 100),
    ])
    return env


def test_stats_answer_has_the_contract_shape(stats_rows):
    r = stats_rows.simulate_post("/stats/5", json={"from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z"})
    assert r.status_code == 200
    assert r.json == {
        "bannerID": 5, "from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z",
        "granularity": "minute", "total": 7,
        "stats": [{"ts": "2024-01-01T10:00:00Z", "v": 2}, {"ts": "2024-01-01T10:05:00Z", "v": 1},
                  {"ts": "2024-01-01T11:59:00Z", "v": 4}],
    }


def test_stats_accepts_legacy_names_alias_route_and_get(stats_rows):
    body = {"tsFrom": "2024-01-01T00:00:00", "tsTo": "2024-01-01T10:01:00"}
    r = stats_rows.simulate_post("/v1/banners/stats/5", json=body)
    assert r.status_code == 200 and r.json["total"] == 2
    r = stats_rows.simulate_get("/stats/5",
                                query_string="from=2024-01-01T10:00:00Z&to=2024-01-03T00:00:00Z&granularity=hour")
    assert r.json["stats"] == [{"ts": "2024-01-01T10:00:00Z", "v": 3}, {"ts": "2024-01-01T11:00:00Z", "v": 4},
                               {"ts": "2024-01-02T00:00:00Z", "v": 8}]


def test_stats_day_buckets_and_offsets(stats_rows):
    # 2024-01-01T12:00+02:00 is 10:00Z; the day bucket overlapping it is counted whole
    r = stats_rows.simulate_post("/stats/5", json={"from": "2024-01-01T12:00:00+02:00", "to": "2024-01-02T00:00:01Z",
                                                   "granularity": "day"})
    assert r.json["from"] == "2024-01-01T10:00:00Z"
    assert r.json["stats"] == [{"ts": "2024-01-01T00:00:00Z", "v": 7}, {"ts": "2024-01-02T00:00:00Z", "v": 8}]
    assert r.json["total"] == 15


def test_stats_buckets_overlapping_the_range_edges_count(stats_rows):
    r = stats_rows.simulate_post("/stats/5", json={"from": "2024-01-01T10:05:30Z", "to": "2024-01-01T11:59:00.5Z"})
    assert [s["ts"] for s in r.json["stats"]] == ["2024-01-01T10:05:00Z", "2024-01-01T11:59:00Z"]


def test_stats_read_relative_times_and_to_defaults_to_now(env):
    """What a user types: -5m, -1h, today... over POST and GET; `to` may be left out."""
    before = datetime.datetime.now(datetime.timezone.utc)
    minute = before.replace(second=0, microsecond=0)
    insert(env.url, [(8, minute, 2), (8, minute - datetime.timedelta(minutes=30), 1)])
    asked = [env.simulate_post("/stats/8", json={"from": "-5m"}),
             env.simulate_post("/v1/banners/stats/8", json={"tsFrom": "-5m", "tsTo": "+1m"}),
             env.simulate_get("/stats/8", query_string="from=-5m"),
             env.simulate_get("/stats/8", query_string="from=-5M&to=now")]
    for r in asked:
        assert r.status_code == 200 and r.json["total"] == 2, r.text
    r = env.simulate_get("/stats/8", query_string="from=-1h")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert r.json["total"] == 3
    to = datetime.datetime.fromisoformat(r.json["to"].replace("Z", "+00:00"))
    assert before <= to <= after  # `to` left out: now
    r = env.simulate_post("/stats/8", json={"from": "yesterday", "to": "today", "granularity": "day"})
    midnight = after.replace(hour=0, minute=0, second=0, microsecond=0)  # today is UTC over HTTP
    assert r.status_code == 200 and r.json["to"] == midnight.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_early_years_are_zero_padded(env):
    r = env.simulate_post("/stats/1", json={"from": "0230-05-04T01:00:00Z", "to": "0230-05-05T01:00:00Z",
                                            "granularity": "day"})
    assert r.status_code == 200 and r.json["from"] == "0230-05-04T01:00:00Z"


def test_stats_of_an_unknown_banner_is_empty(stats_rows):
    r = stats_rows.simulate_post("/stats/999", json={"from": "2024-01-01", "to": "2024-01-02"})
    assert r.status_code == 200 and r.json["total"] == 0 and r.json["stats"] == []


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b'{"to": "2024-01-02"}', "'from' is required"),
    (b'{"to": "-1h"}', "'from' is required"),
    (b'{"from": 5, "to": "2024-01-02"}', "string"),
    (b'{"from": "last tuesday", "to": "2024-01-02"}', "ISO-8601"),
    (b'{"from": "-1x"}', "-1h"),
    (b'{"from": "-999999999w"}', "between the years"),
    (b'{"from": "2024-01-02"}', "use granularity 'hour'"),  # to: now
    (b'{"from": "+1h"}', "before"),
    (b'{"from": "2024-01-02", "to": "2024-01-01"}', "before"),
    (b'{"from": "2024-01-02", "to": "2024-01-02"}', "before"),
    (b'{"from": "2024-01-01", "to": "2024-01-02", "granularity": "week"}', "granularity"),
    (b'{"from": "2024-01-01", "to": "2024-01-02", "granularity": 3}', "granularity"),
    (b'{"from": "2020-01-01", "to": "2024-01-02"}', "use granularity 'hour'"),
    (b'{"from": "1990-01-01", "to": "2024-01-02", "granularity": "hour"}', "use granularity 'day'"),
    (b'{"from": "1000-01-01", "to": "9000-01-02", "granularity": "day"}', "narrow the range"),
    (b'{"from": "0001-01-01T00:00:00+01:00", "to": "2024-01-02"}', "ISO-8601"),
    (b'{"from": "2024-01-01", "to": "9999-12-31T23:59:59"}', "between the years"),
    (b'\xff\xfe', "not valid JSON"),
    (b"[" * 60000, "nested too deeply"),
    (b'{"from": "2024-01-01", "to": "2024-01-02", "granularity": ["x"]}', "granularity"),
])
def test_bad_stats_requests_are_400_with_a_clear_message(env, body, fragment):
    r = env.simulate_post("/stats/1", body=body, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert fragment in r.json["error"]


def test_a_body_over_64_kib_is_413(env):
    big = json.dumps({"from": "2024-01-01", "to": "2024-01-02", "pad": "x" * 70000})
    assert_error(env.simulate_post("/stats/1", body=big), 413)


def test_a_chunked_body_is_read_and_capped(env):
    ok = json.dumps({"from": "2024-01-01", "to": "2024-01-02"}).encode()
    r = env.simulate_post("/stats/1", body=ok, headers={"transfer-encoding": "chunked"})
    assert r.status_code == 200, r.text
    big = b'{"pad": "' + b"x" * 70000 + b'"}'
    r = env.simulate_post("/stats/1", body=big, headers={"transfer-encoding": "chunked"})
    assert_error(r, 413)


@pytest.mark.database
def test_stats_with_the_database_down_is_503(tmp_path):
    settings = config.load({"DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x", "SHM_DIR": str(tmp_path)})
    client = falcon.testing.TestClient(create_app(settings, segment.SegmentWriter(tmp_path, 16, 1 << 20),
                                                  db_pool.Database(settings.database_url)))
    r = client.simulate_post("/stats/1", json={"from": "2024-01-01", "to": "2024-01-02"})
    assert_error(r, 503)
    assert "secret" not in r.text


# -- health -----------------------------------------------------------------------

def test_health_reports_database_flusher_and_lag_from_the_flusher(env):
    h = env.simulate_get("/health")
    assert h.status_code == 200  # while the process serves
    assert h.json["status"] == "degraded" and h.json["flusher"]["alive"] is False  # no flusher yet
    env.simulate_get("/counter/1")
    from counter.flush.flusher import StopSignal

    stop = StopSignal(0.5)
    stop.set()
    assert Flusher(env.shm, env.url).run(stop, interval=0.1)  # flushes; our writer lives on till the deadline
    h = env.simulate_get("/health").json
    assert h["database"] == {"reachable": True}
    assert h["flusher"]["alive"] is True  # the status file names this (live) process
    assert 0 <= h["flusher"]["lag_seconds"] < 30 and h["pending"] == 0 and h["status"] == "ok"
    legacy = env.simulate_get("/v1/healthcheck")
    assert legacy.status_code == 200 and legacy.json == {"status": "ok"}


def test_health_shows_a_failing_database_without_secrets(tmp_path):
    from counter.flush.status import StatusFile

    StatusFile(tmp_path).failed("could not connect to server", 12, {})
    settings = config.load({"DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x", "SHM_DIR": str(tmp_path)})
    clicks = segment.SegmentWriter(tmp_path, 16, 1 << 20)
    client = falcon.testing.TestClient(create_app(settings, clicks, db_pool.Database(settings.database_url)))
    for banner in (1, 1, 2):
        assert client.simulate_get(f"/counter/{banner}").status_code == 200
    h = client.simulate_get("/health")
    assert h.status_code == 200
    assert h.json["database"] == {"reachable": False, "error": "could not connect to server"}
    assert h.json["status"] == "degraded" and "the database is unreachable" in h.json["problems"]
    # pending is read from the segments now, not from the flusher's last count (12)
    assert h.json["pending"] == 3 and "secret" not in h.text


@pytest.mark.parametrize("raw", [False, True])
def test_an_unexpected_error_is_a_json_500_without_a_trace(tmp_path, raw):
    broken = type("Broken", (), {"add": staticmethod(lambda banner: 1 / 0)})()
    settings = config.load({"DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "SHM_DIR": str(tmp_path)})
    application = create_app(settings, broken, db_pool.Database(settings.database_url))
    client = falcon.testing.TestClient(click_route(broken, application) if raw else application)
    r = client.simulate_get("/counter/1")
    assert_error(r, 500)
    assert "ZeroDivision" not in r.text and "Traceback" not in r.text


# -- metrics ------------------------------------------------------------------------

def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_expose_the_flushers_totals_and_the_workers_refusals(tmp_path, database_url):
    from counter.flush.flusher import StopSignal
    from counter.shm.worker_counters import WorkerStats

    shm = tmp_path / "shm"
    shm.mkdir()
    settings = config.load({"DATABASE_URL": database_url, "SHM_DIR": str(shm),
                            "SHM_MAX_BYTES": str(64 << 10), "SEGMENT_SLOTS": "16", "IMPRESSION_SLOTS": "16",
                            "WORKERS": "1"})
    clicks = segment.SegmentWriter(shm, 16, 64 << 10)
    stats = WorkerStats(shm)
    client = falcon.testing.TestClient(click_route(clicks, create_app(
        settings, clicks, db_pool.Database(database_url), stats=stats)))
    statuses = [client.simulate_get(f"/counter/{banner}").status_code for banner in range(1, 2000)]
    accepted, refused = statuses.count(200), statuses.count(503)
    assert accepted and refused and accepted + refused == len(statuses)
    stop = StopSignal(0.3)
    stop.set()
    Flusher(str(shm), database_url).run(stop, interval=0.05)
    r = client.simulate_get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert _metric(r.text, "click_counter_clicks_flushed_total") == accepted
    assert _metric(r.text, "click_counter_clicks_rejected_total") == refused
    assert _metric(r.text, "click_counter_flushes_total") >= 1
    assert _metric(r.text, "click_counter_database_up") == 1
    assert _metric(r.text, "click_counter_flusher_up") == 1
    for name in ("click_counter_rows_written_total", "click_counter_flush_lag_seconds",
                 "click_counter_flush_duration_seconds", "click_counter_pending",
                 "click_counter_segments_live", "click_counter_flush_failures_total",
                 "click_counter_clicks_accepted_total"):
        _metric(r.text, name)
    # a worker that is gone: its refusals are folded into the totals, its file removed
    stats.close()
    Flusher(str(shm), database_url).run(stop, interval=0.05)
    assert _metric(client.simulate_get("/metrics").text, "click_counter_clicks_rejected_total") == refused
    assert not [n for n in os.listdir(shm) if n.endswith(".wst")]


def test_metrics_count_accepted_clicks_and_impressions_apart(tmp_path, database_url):
    """click_counter_clicks_accepted_total counts clicks only, and
    click_counter_impressions_accepted_total impressions; both include what
    waits in shared memory while the database is away."""
    import datetime
    import uuid

    from counter.flush.flusher import StopSignal
    from counter.shm import impressions
    from counter.shm.worker_counters import WorkerStats
    from counter.storage import connection, queries

    shm = tmp_path / "shm"
    shm.mkdir()
    settings = config.load({"DATABASE_URL": database_url, "SHM_DIR": str(shm)})
    clicks = segment.SegmentWriter(shm, 64, 1 << 22)
    client = falcon.testing.TestClient(click_route(clicks, create_app(
        settings, clicks, db_pool.Database(database_url), impressions.ImpressionLog(shm, 64, 1 << 22),
        WorkerStats(shm))))
    campaign = uuid.uuid4()
    conn = connection.connect(database_url)
    queries.create_campaign(conn, campaign, "c", datetime.datetime.now(datetime.timezone.utc)
                            - datetime.timedelta(hours=1))
    conn.close()

    def traffic(click_count, impression_count, first_user):
        for banner in range(1, click_count + 1):
            assert client.simulate_get(f"/counter/{banner}").status_code == 200
        for user in range(first_user, first_user + impression_count):
            r = client.simulate_post("/api/v1/impressions",
                                     json={"campaign_id": str(campaign), "user_id": f"u{user}", "ad_id": "a"})
            assert r.status_code == 202, r.text

    def accepted():
        text = client.simulate_get("/metrics").text
        return (_metric(text, "click_counter_clicks_accepted_total"),
                _metric(text, "click_counter_impressions_accepted_total"))

    def flusher(url):
        stop = StopSignal(0.3)
        stop.set()
        Flusher(str(shm), url).run(stop, interval=0.05)

    traffic(7, 3, 0)
    flusher(database_url)
    assert accepted() == (7, 3)
    traffic(5, 2, 100)  # the database away: they wait in shared memory, and count
    flusher("postgresql://u@127.0.0.1:1/x")
    assert _metric(client.simulate_get("/metrics").text, "click_counter_database_up") == 0
    assert accepted() == (12, 5)
    flusher(database_url)  # back: flushed, the same totals
    assert accepted() == (12, 5)
