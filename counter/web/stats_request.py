"""Parsing and validating a stats request (pure logic, no I/O)."""

import dataclasses
import datetime
import json

from counter import times
from counter.storage import queries

MAX_BUCKETS = 100_000
MAX_BANNER_ID = 2**63 - 1


class BadRequest(ValueError):
    """The request is malformed; the message tells the client what to fix."""


def banner_id(text: str) -> int:
    """A banner id: a decimal integer from 1 to 2**63-1."""
    if not (0 < len(text) <= 32 and text.isascii() and text.isdigit()):
        raise BadRequest(f"banner id must be a decimal integer from 1 to {MAX_BANNER_ID}")
    value = int(text)
    if not 1 <= value <= MAX_BANNER_ID:
        raise BadRequest(f"banner id must be a decimal integer from 1 to {MAX_BANNER_ID}")
    return value


def timestamp(value, name: str, now: datetime.datetime = None) -> datetime.datetime:
    """A time as counter.times reads it (ISO-8601 or a relative form such as
    -1h); `today` and a time without an offset are UTC."""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string: ISO-8601 or a relative time such as -1h")
    try:
        return times.parse(value, times.UTC, now)
    except ValueError as exc:
        raise BadRequest(f"'{name}': {exc}")


def format_time(ts: datetime.datetime) -> str:
    """RFC 3339 in UTC with a Z (isoformat: strftime does not zero-pad years < 1000)."""
    ts = ts.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds") + "Z"


@dataclasses.dataclass(frozen=True)
class StatsQuery:
    banner_id: int
    start: datetime.datetime
    end: datetime.datetime
    granularity: str

    def answer(self, buckets) -> dict:
        """The stats answer of SPEC from [(bucket start, clicks)]."""
        stats = [{"ts": format_time(ts), "v": int(v)} for ts, v in buckets]
        return {
            "bannerID": self.banner_id,
            "from": format_time(self.start),
            "to": format_time(self.end),
            "granularity": self.granularity,
            "total": sum(item["v"] for item in stats),
            "stats": stats,
        }


def _pick(fields: dict, *names):
    """(value, name) of the first of `names` given, or (None, None)."""
    for name in names:
        if name in fields and fields[name] is not None:
            return fields[name], name
    return None, None


def stats_query(banner: int, fields: dict, now: datetime.datetime = None) -> StatsQuery:
    """Validate the fields of a stats request (JSON body or query string).
    `to` is optional and defaults to now."""
    if not isinstance(fields, dict):
        raise BadRequest("the body must be a JSON object")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    value, name = _pick(fields, "from", "tsFrom")
    if name is None:
        raise BadRequest("'from' is required ('tsFrom' is accepted too): ISO-8601, "
                         "or a relative time such as -1h")
    start = timestamp(value, name, now)
    value, name = _pick(fields, "to", "tsTo")
    end = now if name is None else timestamp(value, name, now)
    if not start < end:
        raise BadRequest("'from' must be before 'to'")
    granularity = fields.get("granularity") or "minute"
    if not isinstance(granularity, str) or granularity not in queries.GRANULARITIES:
        raise BadRequest("'granularity' must be one of: minute, hour, day")
    buckets = queries.bucket_count(start, end, granularity)
    if buckets > MAX_BUCKETS:
        coarser = [g for g in queries.GRANULARITIES
                   if queries.bucket_count(start, end, g) <= MAX_BUCKETS]
        hint = f"use granularity '{coarser[0]}'" if coarser else "narrow the range"
        raise BadRequest(
            f"the range holds {buckets} {granularity} buckets, more than {MAX_BUCKETS}; {hint}"
        )
    return StatsQuery(banner, start, end, granularity)


def parse_json(body: bytes):
    if not body.strip():
        raise BadRequest("the body is empty; send a JSON object with 'from' (and 'to')")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}")
    except RecursionError:
        raise BadRequest("the body is nested too deeply")
