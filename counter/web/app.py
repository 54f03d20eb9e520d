"""The HTTP API: ``create_app(settings, clicks, database)`` builds the Falcon app.

Dependencies come in as arguments: ``clicks`` has ``add(banner_id) -> bool``
(a SegmentWriter in production), ``database`` has ``run(fn, *args)``.
Every error, on every route, is rendered by ``_serialize_error`` as
``{"error": "...", "code": status}``; a BadRequest from the parsing modules
becomes a 400, a database error a 503, and Busy from ``database.run`` (all
of the worker's connections wait already) a 503 at once, in one handler
each, not in every responder.
"""

import datetime
import hmac
import json
import logging
import time
import urllib.parse
import uuid

import falcon

from counter.shm import impressions, worker_counters
from counter.storage import connection, identity, queries
from counter.storage.db_pool import Busy as DatabaseBusy
from counter.web import campaigns, health, metrics, openapi, stats_request

log = logging.getLogger("counter.app")

MAX_BODY = 64 * 1024
RETRY_AFTER = 1  # seconds; the flusher frees memory every flush interval


def _error(status_class, message, **kwargs):
    return status_class(description=message, **kwargs)


def _serialize_error(req, resp, exc: falcon.HTTPError):
    resp.content_type = falcon.MEDIA_JSON
    message = exc.description or exc.title
    if isinstance(exc, falcon.HTTPRouteNotFound):
        message = f"no route {req.path}"
    elif isinstance(exc, falcon.HTTPMethodNotAllowed):
        message = f"method {req.method} is not allowed on {req.path}"
    resp.text = json.dumps({"error": message, "code": exc.status_code})


def _unexpected_error(req, resp, exc, params):
    # Log the trace for us; the client gets a plain JSON 500, never a trace.
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(description="internal error")


def _bad_request(req, resp, exc, params):
    raise _error(falcon.HTTPBadRequest, str(exc))


def _database_unavailable(database):
    def handler(req, resp, exc, params):
        log.warning("database error on %s %s: %s", req.method, req.path, database.describe(exc))
        raise _error(falcon.HTTPServiceUnavailable, "the database is unavailable", retry_after=5)

    return handler


def _database_busy(req, resp, exc, params):
    # the worker's DB_WAITERS_PER_WORKER requests already wait: refuse, never queue
    raise _error(falcon.HTTPServiceUnavailable,
                 "too many requests are waiting on the database; retry shortly",
                 retry_after=RETRY_AFTER)


def read_body(req) -> bytes:
    """The request body, at most MAX_BODY bytes (413 beyond). Reads req.stream
    directly because bounded_stream is empty for chunked requests."""
    if req.content_length is not None:
        if req.content_length > MAX_BODY:
            raise _error(falcon.HTTPContentTooLarge, f"the body is larger than {MAX_BODY} bytes")
        return req.bounded_stream.read()
    body = req.stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise _error(falcon.HTTPContentTooLarge, f"the body is larger than {MAX_BODY} bytes")
    return body


class ClickResource:
    """Counts one click. Nothing here but parsing the id and one add."""

    def __init__(self, clicks, status, stats):
        self._add = clicks.add
        self._status = status
        self._stats = stats

    def on_get(self, req, resp, banner_id):
        if not self._add(stats_request.banner_id(banner_id)):
            self._stats.add(worker_counters.REJECTED_CLICKS)
            raise _error(
                falcon.HTTPServiceUnavailable,
                "click memory is full; retry shortly",
                retry_after=RETRY_AFTER,
            )
        resp.status = self._status

    on_post = on_get


class MissingBannerResource:
    """`/counter/` and friends: the id is empty, which is a bad request, not a 404."""

    def on_get(self, req, resp):
        raise _error(falcon.HTTPBadRequest, "banner id is missing")

    on_post = on_get


class StatsResource:
    guarded = True

    def __init__(self, database):
        self._database = database

    def on_get(self, req, resp, banner_id):
        banner = stats_request.banner_id(banner_id)
        fields = dict(urllib.parse.parse_qsl(req.query_string, keep_blank_values=True))
        self._answer(resp, banner, fields)

    def on_post(self, req, resp, banner_id):
        banner = stats_request.banner_id(banner_id)
        self._answer(resp, banner, _json_body(req))

    def _answer(self, resp, banner, fields):
        query = stats_request.stats_query(banner, fields)
        buckets = self._database.run(
            queries.click_stats, query.banner_id, query.start, query.end, query.granularity
        )
        resp.media = query.answer(buckets)


def _json_body(req):
    return stats_request.parse_json(read_body(req))


def _find_campaign(database, text):
    """(UUID, row) of an existing campaign; a 404 otherwise."""
    try:
        key = uuid.UUID(text)
    except ValueError:
        raise _error(falcon.HTTPNotFound, f"no campaign {text[:64]!r}")
    row = database.run(queries.get_campaign, key)
    if row is None:
        raise _error(falcon.HTTPNotFound, f"no campaign {text}")
    return key, row


class CampaignsResource:
    guarded = True

    def __init__(self, database, cache):
        self._database = database
        self._cache = cache

    def on_post(self, req, resp):
        name, start = campaigns.new_campaign(_json_body(req), datetime.datetime.now(datetime.timezone.utc))
        row = self._database.run(queries.create_campaign, uuid.uuid4(), name, start)
        self._cache.remember(uuid.UUID(row[0]), row[2])
        resp.status = falcon.HTTP_201
        resp.media = campaigns.describe(row)


class CampaignResource:
    guarded = True

    def __init__(self, database):
        self._database = database

    def on_get(self, req, resp, campaign_id):
        _, row = _find_campaign(self._database, campaign_id)
        resp.media = campaigns.describe(row)


class CampaignStatsResource:
    guarded = True

    def __init__(self, database):
        self._database = database

    def on_get(self, req, resp, campaign_id):
        key, _ = _find_campaign(self._database, campaign_id)
        resp.media = campaigns.describe_stats(key, self._database.run(queries.campaign_stats, key))


class ImpressionResource:
    """Appends one impression to this worker's log: no database per request
    (the campaign comes from the cache, the hash key is loaded once)."""

    def __init__(self, log, cache, database, stats, key=None):
        self._append = log.append
        self._cache = cache
        self._database = database
        self._stats = stats
        self._key = key

    def on_post(self, req, resp):
        campaign_id, user_id = campaigns.impression(_json_body(req))
        start = self._cache.start_time(campaign_id)
        if start is None:
            raise _error(falcon.HTTPNotFound, f"no campaign {campaign_id}")
        if start > datetime.datetime.now(datetime.timezone.utc):
            raise _error(falcon.HTTPConflict,
                         f"campaign {campaign_id} starts at {stats_request.format_time(start)}")
        if self._key is None:
            self._key = self._database.run(identity.user_hash_key)
        if not self._append(campaign_id, impressions.user_hash(self._key, user_id)):
            self._stats.add(worker_counters.REJECTED_IMPRESSIONS)
            raise _error(falcon.HTTPServiceUnavailable, "impression memory is full; retry shortly",
                         retry_after=RETRY_AFTER)
        resp.status = falcon.HTTP_202


class HealthResource:
    def __init__(self, shm_dir, flush_interval):
        self._shm_dir = shm_dir
        self._flush_interval = flush_interval

    def on_get(self, req, resp):
        resp.media = health.report(self._shm_dir, time.time(), self._flush_interval)


class HeartbeatResource:
    """The legacy health check: answers 200 whenever the process serves."""

    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class TokenGuard:
    """With STATS_TOKEN set, resources marked `guarded` (stats, campaigns)
    need `Authorization: Bearer <token>`; clicks and impressions stay open."""

    def __init__(self, token: str):
        self._expected = token.encode()

    def process_resource(self, req, resp, resource, params):
        if not getattr(resource, "guarded", False):
            return
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self._expected):
            raise falcon.HTTPUnauthorized(description="a valid bearer token is required",
                                          challenges=["Bearer"])


class OpenApiResource:
    def __init__(self):
        self._body = json.dumps(openapi.document()).encode()

    def on_get(self, req, resp):
        resp.content_type, resp.data = falcon.MEDIA_JSON, self._body


class MetricsResource:
    def __init__(self, shm_dir):
        self._shm_dir = shm_dir

    def on_get(self, req, resp):
        resp.content_type, resp.data = metrics.exposition(self._shm_dir)


# Paths that exist only to answer "banner id is missing" (400) instead of 404.
ERROR_ONLY_ROUTES = [prefix + end for prefix in ("/counter", "/v1/banners/counter", "/stats",
                                                 "/v1/banners/stats") for end in ("", "/")]


def create_app(settings, clicks, database, views=None, stats=None) -> falcon.App:
    """views: the worker's ImpressionLog, stats: its WorkerStats (both are made
    in settings.shm_dir when not given)."""
    guard = [TokenGuard(settings.stats_token)] if settings.stats_token else []
    app = falcon.App(media_type=falcon.MEDIA_JSON, middleware=guard)
    app.req_options.strip_url_path_trailing_slash = False
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(Exception, _unexpected_error)
    app.add_error_handler(stats_request.BadRequest, _bad_request)
    app.add_error_handler(connection.DatabaseError, _database_unavailable(database))
    app.add_error_handler(DatabaseBusy, _database_busy)

    if stats is None:
        stats = worker_counters.WorkerStats(settings.shm_dir)
    app.add_route("/counter/{banner_id}", ClickResource(clicks, falcon.HTTP_200, stats))
    app.add_route("/v1/banners/counter/{banner_id}", ClickResource(clicks, falcon.HTTP_204, stats))
    banner_stats = StatsResource(database)
    app.add_route("/stats/{banner_id}", banner_stats)
    app.add_route("/v1/banners/stats/{banner_id}", banner_stats)
    missing = MissingBannerResource()
    for path in ERROR_ONLY_ROUTES:
        app.add_route(path, missing)
    if views is None:
        views = impressions.ImpressionLog(settings.shm_dir, settings.impression_slots,
                                          settings.shm_max_bytes)
    cache = campaigns.CampaignCache(database)
    app.add_route("/api/v1/campaigns", CampaignsResource(database, cache))
    app.add_route("/api/v1/campaigns/{campaign_id}", CampaignResource(database))
    app.add_route("/api/v1/campaigns/{campaign_id}/stats", CampaignStatsResource(database))
    app.add_route("/api/v1/impressions",
                  ImpressionResource(views, cache, database, stats, settings.user_hash_key))
    app.add_route("/health", HealthResource(settings.shm_dir, settings.flush_interval))
    app.add_route("/metrics", MetricsResource(settings.shm_dir))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_route("/v1/healthcheck", HeartbeatResource())
    return app
