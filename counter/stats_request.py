"""Parsing and validating a stats request (pure logic, no I/O)."""

import dataclasses
import datetime
import json

from counter import storage

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


def timestamp(value, name: str) -> datetime.datetime:
    """An ISO-8601 timestamp; one without an offset is taken as UTC."""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be an ISO-8601 timestamp string")
    try:
        parsed = datetime.datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        parsed = parsed.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        raise BadRequest(f"'{name}' is not an ISO-8601 timestamp: {value[:64]!r}")
    if not 1 < parsed.year < 9999:  # keeps bucket arithmetic inside datetime's range
        raise BadRequest(f"'{name}' must lie between the years 2 and 9998")
    return parsed


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
    for name in names:
        if name in fields and fields[name] is not None:
            return fields[name], name
    raise BadRequest(f"'{names[0]}' is required (ISO-8601; '{names[1]}' is accepted too)")


def stats_query(banner: int, fields: dict) -> StatsQuery:
    """Validate the fields of a stats request (JSON body or query string)."""
    if not isinstance(fields, dict):
        raise BadRequest("the body must be a JSON object")
    start = timestamp(*_pick(fields, "from", "tsFrom"))
    end = timestamp(*_pick(fields, "to", "tsTo"))
    if not start < end:
        raise BadRequest("'from' must be before 'to'")
    granularity = fields.get("granularity") or "minute"
    if not isinstance(granularity, str) or granularity not in storage.GRANULARITIES:
        raise BadRequest("'granularity' must be one of: minute, hour, day")
    buckets = storage.bucket_count(start, end, granularity)
    if buckets > MAX_BUCKETS:
        coarser = [g for g in storage.GRANULARITIES
                   if storage.bucket_count(start, end, g) <= MAX_BUCKETS]
        hint = f"use granularity '{coarser[0]}'" if coarser else "narrow the range"
        raise BadRequest(
            f"the range holds {buckets} {granularity} buckets, more than {MAX_BUCKETS}; {hint}"
        )
    return StatsQuery(banner, start, end, granularity)


def parse_json(body: bytes):
    if not body.strip():
        raise BadRequest("the body is empty; send a JSON object with 'from' and 'to'")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}")
    except RecursionError:
        raise BadRequest("the body is nested too deeply")
