"""The contract, hardened: the OpenAPI document covers every route and real
answers match it; the bearer token guards reads and admin routes only."""

import copy
import datetime
import re
import types
import uuid

import falcon.inspect
import falcon.testing
import jsonschema
import pytest
from conftest import query
from openapi_spec_validator import validate

from counter import config
from counter.shm import segment
from counter.shm.worker_counters import WorkerStats
from counter.storage import db_pool
from counter.web import app as app_module
from counter.web import openapi
from counter.web.app import create_app
from counter.web.click_route import click_route

TOKEN = "t0ken-for-the-tests-only"
DOC = openapi.document()


def _client(tmp_path, url, **env):
    shm = tmp_path / "shm"
    shm.mkdir(exist_ok=True)
    settings = config.load({"DATABASE_URL": url, "SHM_DIR": str(shm), **env})
    clicks = segment.SegmentWriter(shm, 64, 1 << 22)
    application = create_app(settings, clicks, db_pool.Database(url))
    client = falcon.testing.TestClient(click_route(clicks, application))
    client.falcon_app = application
    return client


def _template(path):
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_the_document_is_valid_openapi():
    validate(DOC)


def test_the_document_names_the_package_version():
    import importlib.metadata

    assert DOC["info"]["version"] == importlib.metadata.version("click-counter")


def test_stats_times_may_be_relative_and_to_is_optional():
    for path in ("/stats/{bannerID}", "/v1/banners/stats/{bannerID}"):
        params = {p["name"]: p for p in DOC["paths"][path]["get"]["parameters"]}
        assert params["from"]["required"] and not params["to"]["required"]
        assert "format" not in params["from"]["schema"]  # not only date-time
        assert "-1h" in params["from"]["description"] and "now" in params["to"]["description"]
    body = DOC["components"]["schemas"]["StatsRequest"]
    assert body["anyOf"] == [{"required": ["from"]}, {"required": ["tsFrom"]}]
    jsonschema.validate({"from": "-1h"}, dict(body, components=COMPONENTS))
    start = DOC["components"]["schemas"]["NewCampaign"]["properties"]["start_time"]
    assert "+1m" in start["description"] and "format" not in start


def test_every_route_and_method_is_documented():
    stub = types.SimpleNamespace(add=lambda *a: True, append=lambda *a: True)
    app = create_app(config.load({"SHM_DIR": "/tmp/unused", "DATABASE_URL": "postgresql://x@h/d"}),
                     clicks=stub, database=None, views=stub, stats=stub)
    documented = {(_template(p), m.upper()) for p, ops in DOC["paths"].items() for m in ops}
    served = set()
    for route in falcon.inspect.inspect_routes(app):
        if route.path in app_module.ERROR_ONLY_ROUTES:
            continue
        for method in route.methods:
            if not method.internal:
                served.add((_template(route.path), method.method))
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented routes that do not exist"


def _as_json_schema(node):
    """OpenAPI 3.0's `nullable` in JSON Schema terms."""
    if isinstance(node, dict):
        node = {k: _as_json_schema(v) for k, v in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    return node


COMPONENTS = _as_json_schema(copy.deepcopy(DOC["components"]))


def assert_matches(method, path, result):
    """The answer's status is documented for that route, and its body fits."""
    for template, operations in DOC["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            responses = operations[method.lower()]["responses"]
            break
    else:
        raise AssertionError(f"{path} is not documented")
    assert str(result.status_code) in responses, (method, path, result.status_code)
    content = responses[str(result.status_code)].get("content", {})
    if "application/json" in content:
        schema = dict(_as_json_schema(content["application/json"]["schema"]), components=COMPONENTS)
        jsonschema.validate(result.json, schema)
    else:
        assert result.content == b"" or "text/plain" in content


def test_real_answers_match_their_schemas(tmp_path, database_url):
    client = _client(tmp_path, database_url)
    now = datetime.datetime.now(datetime.timezone.utc)
    future = (now + datetime.timedelta(days=1)).isoformat()
    made = client.simulate_post("/api/v1/campaigns", json={"name": "c", "start_time": future})
    campaign = made.json["id"]
    query(database_url, "UPDATE campaigns SET start_time = now() - interval '1 hour'")
    client.simulate_get("/counter/1")
    calls = [
        ("GET", "/counter/5", {}), ("POST", "/counter/5", {}), ("GET", "/counter/x", {}),
        ("GET", "/v1/banners/counter/5", {}), ("GET", "/v1/banners/counter/0", {}),
        ("POST", "/stats/1", {"json": {"from": "2024-01-01", "to": "2030-01-01", "granularity": "day"}}),
        ("POST", "/stats/1", {"json": {"from": "2024-01-02", "to": "2024-01-01"}}),
        ("POST", "/stats/1", {"body": "x" * 70000}),
        ("GET", "/stats/1", {"query_string": "from=2024-01-01&to=2024-01-02&granularity=hour"}),
        ("GET", "/stats/1", {"query_string": "from=-1h"}),
        ("POST", "/stats/1", {"json": {"from": "-5m"}}),
        ("POST", "/v1/banners/stats/1", {"json": {"tsFrom": "2024-01-01", "tsTo": "2024-01-02"}}),
        ("GET", "/health", {}), ("GET", "/v1/healthcheck", {}), ("GET", "/metrics", {}),
        ("GET", "/openapi.json", {}),
        ("POST", "/api/v1/campaigns", {"json": {"name": "d", "start_time": future}}),
        ("POST", "/api/v1/campaigns", {"json": {"name": "e", "start_time": "+1m"}}),
        ("POST", "/api/v1/campaigns", {"json": {"name": "", "start_time": future}}),
        ("GET", f"/api/v1/campaigns/{campaign}", {}), ("GET", f"/api/v1/campaigns/{uuid.uuid4()}", {}),
        ("GET", f"/api/v1/campaigns/{campaign}/stats", {}),
        ("POST", "/api/v1/impressions", {"json": {"campaign_id": campaign, "user_id": "u", "ad_id": 1}}),
        ("POST", "/api/v1/impressions", {"json": {"campaign_id": str(uuid.uuid4()), "user_id": "u", "ad_id": 1}}),
        ("POST", "/api/v1/impressions", {"json": {"campaign_id": campaign}}),
    ]
    for method, path, kwargs in calls:
        result = client.simulate_request(method, path, **kwargs)
        assert result.status_code < 500, (method, path, result.text)
        assert_matches(method, path, result)


def test_the_stats_token_guards_reads_and_admin_routes_only(tmp_path, database_url):
    client = _client(tmp_path, database_url, STATS_TOKEN=TOKEN)
    body = {"from": "2024-01-01", "to": "2024-01-02"}
    denied = client.simulate_post("/stats/1", json=body)
    assert denied.status_code == 401 and denied.json == {"error": "a valid bearer token is required", "code": 401}
    assert denied.headers["www-authenticate"] == "Bearer"
    wrong = client.simulate_post("/stats/1", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = client.simulate_post("/stats/1", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    lower = client.simulate_post("/stats/1", json=body, headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    future = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).isoformat()
    assert client.simulate_post("/api/v1/campaigns", json={"name": "c", "start_time": future}).status_code == 401
    assert client.simulate_get(f"/api/v1/campaigns/{uuid.uuid4()}").status_code == 401
    assert client.simulate_get(f"/api/v1/campaigns/{uuid.uuid4()}/stats").status_code == 401
    # the click and impression routes, health and metrics stay open
    assert client.simulate_get("/counter/1").status_code == 200
    assert client.simulate_post("/counter/1").status_code == 200
    assert client.simulate_get("/v1/banners/counter/1").status_code == 204
    assert client.simulate_post("/api/v1/impressions", json={
        "campaign_id": str(uuid.uuid4()), "user_id": "u", "ad_id": "a"}).status_code == 404
    for path in ("/health", "/v1/healthcheck", "/metrics", "/openapi.json"):
        assert client.simulate_get(path).status_code == 200, path


def test_a_short_token_is_refused_at_start():
    with pytest.raises(config.ConfigError, match="STATS_TOKEN"):
        config.load({"STATS_TOKEN": "short"})


def test_a_full_impression_memory_answers_503_and_is_counted(tmp_path, database_url):
    from conftest import query as q

    shm = tmp_path / "shm"
    shm.mkdir()
    campaign = uuid.uuid4()
    q(database_url, "INSERT INTO campaigns (id, name, start_time) VALUES (%s, 'c', now() - interval '1 hour')",
      (str(campaign),))
    settings = config.load({"DATABASE_URL": database_url, "SHM_DIR": str(shm)})
    full = type("Full", (), {"append": staticmethod(lambda c, u: False)})()
    stats = WorkerStats(shm)
    client = falcon.testing.TestClient(create_app(settings, segment.SegmentWriter(shm, 16, 1 << 20),
                                                  db_pool.Database(database_url), full, stats))
    r = client.simulate_post("/api/v1/impressions", json={"campaign_id": str(campaign), "user_id": "u", "ad_id": "a"})
    assert r.status_code == 503 and r.json["code"] == 503 and r.headers["retry-after"]
    (path,) = segment.list_segments(shm, ".wst")
    from counter.shm.worker_counters import WorkerStatsFile

    stats_file = WorkerStatsFile(path)
    assert stats_file.values()["rejected_impressions"] == 1
    stats_file.close()
