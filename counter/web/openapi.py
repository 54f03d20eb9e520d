"""The OpenAPI 3 description of every route (served at /openapi.json).

Kept as data beside the routes; tests check that every route of the app is
here and that real answers match these schemas."""

from counter import version
from counter.web.stats_request import MAX_BANNER_ID as MAX_ID


def _error(description):
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref, description):
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


BANNER = {"name": "bannerID", "in": "path", "required": True,
          "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
          "description": "Decimal banner id from 1 to 2^63-1; anything else is a 400."}
CAMPAIGN = {"name": "campaign_id", "in": "path", "required": True,
            "schema": {"type": "string", "format": "uuid"}}
GUARDED = [{}, {"bearer": []}]  # open unless STATS_TOKEN is set

_ANSWERS = {
    "400": _error("Bad request: the message says what to fix."),
    "401": _error("STATS_TOKEN is set and the bearer token is missing or wrong."),
    "413": _error("The body is larger than 64 KiB."),
    "503": _error("Memory bound reached or database unavailable; see Retry-After."),
}


def _click(status, description):
    answers = {status: {"description": description}}
    answers.update({k: _ANSWERS[k] for k in ("400", "503")})
    operation = {"parameters": [BANNER], "responses": answers, "summary": "Count one click now."}
    return {"get": dict(operation, operationId=f"click_get_{status}"),
            "post": dict(operation, operationId=f"click_post_{status}")}


def _stats(name):
    answers = {"200": _json("StatsAnswer", "Clicks per bucket, oldest first.")}
    answers.update({k: _ANSWERS[k] for k in ("400", "401", "503")})
    query = [BANNER] + [
        {"name": "from", "in": "query", "required": True, "schema": _WHEN,
         "description": "Start of the range. " + _WHEN_TEXT},
        {"name": "to", "in": "query", "required": False, "schema": _WHEN,
         "description": "End of the range (default: now). " + _WHEN_TEXT},
        {"name": "granularity", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["minute", "hour", "day"]}},
    ]
    posted = dict(answers, **{"413": _ANSWERS["413"]})
    return {
        "get": {"operationId": f"{name}_get", "summary": "Statistics of a time range.",
                "security": GUARDED, "parameters": query, "responses": answers},
        "post": {"operationId": f"{name}_post", "summary": "Statistics of a time range.",
                 "security": GUARDED, "parameters": [BANNER],
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/StatsRequest"}}}},
                 "responses": posted},
    }


def document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "click-counter", "version": version.VERSION,
                 "description": "Counts ad banner clicks and unique campaign impressions."},
        "paths": {
            "/counter/{bannerID}": _click("200", "Counted."),
            "/v1/banners/counter/{bannerID}": _click("204", "Counted."),
            "/stats/{bannerID}": _stats("stats"),
            "/v1/banners/stats/{bannerID}": _stats("legacy_stats"),
            "/health": {"get": {"operationId": "health", "summary": "Liveness and details.",
                                "responses": {"200": _json("Health", "Serving.")}}},
            "/v1/healthcheck": {"get": {"operationId": "healthcheck", "summary": "Liveness.",
                                        "responses": {"200": _json("Heartbeat", "Serving.")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text exposition.",
                                 "responses": {"200": {"description": "Metrics.", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                      "responses": {"200": {"description": "OpenAPI 3.", "content": {
                                          "application/json": {"schema": {"type": "object"}}}}}}},
            "/api/v1/campaigns": {"post": {
                "operationId": "create_campaign", "summary": "Register a campaign.",
                "security": GUARDED,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/NewCampaign"}}}},
                "responses": {"201": _json("Campaign", "Registered."),
                              **{k: _ANSWERS[k] for k in ("400", "401", "413", "503")}}}},
            "/api/v1/campaigns/{campaign_id}": {"get": {
                "operationId": "get_campaign", "summary": "One campaign.", "security": GUARDED,
                "parameters": [CAMPAIGN],
                "responses": {"200": _json("Campaign", "The campaign."), "404": _error("No such campaign."),
                              **{k: _ANSWERS[k] for k in ("401", "503")}}}},
            "/api/v1/campaigns/{campaign_id}/stats": {"get": {
                "operationId": "campaign_stats", "summary": "Unique impressions.",
                "security": GUARDED, "parameters": [CAMPAIGN],
                "responses": {"200": _json("CampaignStats", "Unique impressions."),
                              "404": _error("No such campaign."),
                              **{k: _ANSWERS[k] for k in ("401", "503")}}}},
            "/api/v1/impressions": {"post": {
                "operationId": "track_impression", "summary": "Track an impression.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Impression"}}}},
                "responses": {"202": {"description": "Accepted."},
                              "404": _error("No such campaign."),
                              "409": _error("The campaign has not started."),
                              **{k: _ANSWERS[k] for k in ("400", "413", "503")}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
    }


_TIME = {"type": "string", "format": "date-time"}
# What a request may say for a time (counter/times.py): ISO-8601 or relative.
_WHEN_TEXT = ("ISO-8601 (no offset means UTC), or relative to now: now, today, yesterday "
              "(UTC midnights), -5m, -1h, -7d, -2w, +1m (units s, m, h, d, w). In a query "
              "string write + as %2B.")
_WHEN = {"type": "string", "minLength": 1, "example": "-1h"}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\x00-\\x1f]*\\S[^\\x00-\\x1f]*$"}
_ID = {"oneOf": [_TEXT, {"type": "integer"}]}

SCHEMAS = {
    "Error": {"type": "object", "required": ["error", "code"], "additionalProperties": False,
              "properties": {"error": {"type": "string", "minLength": 1},
                             "code": {"type": "integer", "minimum": 400, "maximum": 599}}},
    "StatsRequest": {"type": "object",
                     "anyOf": [{"required": ["from"]}, {"required": ["tsFrom"]}],
                     "properties": {"from": dict(_WHEN, description="Start. " + _WHEN_TEXT),
                                    "to": dict(_WHEN, description="End (default: now). " + _WHEN_TEXT),
                                    "tsFrom": dict(_WHEN, description="Same as from."),
                                    "tsTo": dict(_WHEN, description="Same as to."),
                                    "granularity": {"type": "string", "enum": ["minute", "hour", "day"]}}},
    "StatsAnswer": {"type": "object", "additionalProperties": False,
                    "required": ["bannerID", "from", "to", "granularity", "total", "stats"],
                    "properties": {
                        "bannerID": {"type": "integer", "minimum": 1},
                        "from": _TIME, "to": _TIME,
                        "granularity": {"type": "string", "enum": ["minute", "hour", "day"]},
                        "total": {"type": "integer", "minimum": 0},
                        "stats": {"type": "array", "items": {
                            "type": "object", "required": ["ts", "v"], "additionalProperties": False,
                            "properties": {"ts": _TIME, "v": {"type": "integer", "minimum": 1}}}}}},
    "Health": {"type": "object", "required": ["status", "problems", "database", "flusher", "pending",
                                              "refusals", "shm"],
               "properties": {
                   "status": {"type": "string", "enum": ["ok", "degraded"]},
                   "problems": {"type": "array", "items": {"type": "string"},
                                "description": "Why the status is degraded (empty when ok)."},
                   "database": {"type": "object", "required": ["reachable"],
                                "properties": {"reachable": {"type": "boolean"},
                                               "error": {"type": "string"}}},
                   "flusher": {"type": "object", "required": ["alive", "lag_seconds"], "properties": {
                       "pid": {"type": "integer", "nullable": True},
                       "alive": {"type": "boolean"},
                       "lag_seconds": {"type": "number", "nullable": True},
                       "stalled": {"type": "boolean", "description":
                                   "No commit for max(5 x FLUSH_INTERVAL, 5 s)."},
                       "last_flush_at": {"type": "number", "nullable": True},
                       "last_error": {"type": "string", "nullable": True},
                       "last_error_at": {"type": "number", "nullable": True}}},
                   "pending": {"type": "integer", "minimum": 0, "description":
                               "Clicks and impressions in shared memory, not yet in the database, "
                               "read from the segments at the time of asking."},
                   "refusals": {"type": "object", "required": ["recent"], "properties": {
                       "last_at": {"type": "number", "nullable": True},
                       "recent": {"type": "boolean", "description": "A 503 for lack of memory "
                                  "in the last 10 s."}}},
                   "shm": {"type": "object", "required": ["dir", "recreated_at"], "properties": {
                       "dir": {"type": "string"},
                       "recreated_at": {"type": "number", "nullable": True, "description":
                                        "When SHM_DIR was last found removed and made again."}}}}},
    "Heartbeat": {"type": "object", "required": ["status"],
                  "properties": {"status": {"type": "string", "enum": ["ok"]}}},
    "NewCampaign": {"type": "object", "required": ["name", "start_time"], "properties": {
        "name": _TEXT, "start_time": dict(_WHEN, example="+1m", description=(
            "Must be in the future. " + _WHEN_TEXT))}},
    "Campaign": {"type": "object", "required": ["id", "name", "start_time"], "additionalProperties": False,
                 "properties": {"id": {"type": "string", "format": "uuid"},
                                "name": {"type": "string"}, "start_time": _TIME}},
    "CampaignStats": {"type": "object", "additionalProperties": False,
                      "required": ["campaign_id", "last_hour", "last_day", "total"],
                      "properties": {"campaign_id": {"type": "string", "format": "uuid"},
                                     "last_hour": {"type": "integer", "minimum": 0},
                                     "last_day": {"type": "integer", "minimum": 0},
                                     "total": {"type": "integer", "minimum": 0}}},
    "Impression": {"type": "object", "required": ["campaign_id", "user_id", "ad_id"], "properties": {
        "campaign_id": {"type": "string", "format": "uuid"}, "user_id": _ID, "ad_id": _ID}},
}
