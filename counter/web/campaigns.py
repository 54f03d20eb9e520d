"""Campaigns on the worker side: validating requests, and a local cache so
the impression path does not ask the database per request."""

import datetime
import time
import uuid

from counter.storage import queries
from counter.web import stats_request

MAX_NAME = 200
MISS_TTL = 1.0  # seconds an unknown campaign id is remembered as unknown


BadRequest = stats_request.BadRequest


def parse_uuid(value, name):
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{name}' is required (a campaign UUID)")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise BadRequest(f"'{name}' is not a UUID: {value[:64]!r}")


def _required_text(fields, name):
    value = fields.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{name}' is required (a non-empty string)")
    if len(value) > MAX_NAME:
        raise BadRequest(f"'{name}' is longer than {MAX_NAME} characters")
    if any(ord(c) < 32 for c in value):
        raise BadRequest(f"'{name}' must not hold control characters")
    return value


def new_campaign(fields, now: datetime.datetime):
    """(name, start_time) of a campaign creation request."""
    if not isinstance(fields, dict):
        raise BadRequest("the body must be a JSON object")
    name = _required_text(fields, "name")
    if "start_time" not in fields:
        raise BadRequest("'start_time' is required (ISO-8601, or relative such as +1m)")
    start = stats_request.timestamp(fields["start_time"], "start_time", now)
    if start <= now:
        raise BadRequest("'start_time' must be in the future")
    return name.strip(), start


def impression(fields):
    """(campaign UUID, user id) of an impression; ad_id is required but not kept."""
    if not isinstance(fields, dict):
        raise BadRequest("the body must be a JSON object")
    campaign = parse_uuid(fields.get("campaign_id"), "campaign_id")
    user = _required_text(fields, "user_id")
    _required_text(fields, "ad_id")
    return campaign, user


def describe(row) -> dict:
    campaign_id, name, start = row
    return {"id": campaign_id, "name": name, "start_time": stats_request.format_time(start)}


def describe_stats(campaign_id: uuid.UUID, counts) -> dict:
    """The stats answer, from queries.campaign_stats' (last_hour, last_day, total)."""
    last_hour, last_day, total = counts
    return {"campaign_id": str(campaign_id), "last_hour": last_hour, "last_day": last_day,
            "total": total}


class CampaignCache:
    """campaign UUID -> start time. Campaigns never change once made, so a
    hit is good forever; an unknown id is asked again after MISS_TTL."""

    def __init__(self, database, clock=time.monotonic):
        self._database = database
        self._clock = clock
        self._known = {}
        self._unknown = {}

    def start_time(self, campaign_id: uuid.UUID):
        """The campaign's start, or None if there is no such campaign.
        Raises connection.DatabaseError on a miss while the database is away."""
        start = self._known.get(campaign_id)
        if start is not None:
            return start
        if self._unknown.get(campaign_id, 0) > self._clock():
            return None
        row = self._database.run(queries.get_campaign, campaign_id)
        if row is None:
            if len(self._unknown) > 100_000:
                self._unknown.clear()
            self._unknown[campaign_id] = self._clock() + MISS_TTL
            return None
        self.remember(campaign_id, row[2])
        return row[2]

    def remember(self, campaign_id, start):
        self._known[campaign_id] = start
        self._unknown.pop(campaign_id, None)
