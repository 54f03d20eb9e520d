"""Times as a person types them, for the HTTP API and the CLI alike:
ISO-8601, or `now`, `today`, `yesterday`, `-30m`, `-1h`, `-7d`, `-2w`,
`+1m` (relative to now). Errors are ValueError with a message for people."""

import datetime
import re
import zoneinfo

UTC = datetime.timezone.utc
FORMS = "ISO-8601 (2024-01-31T10:00:00Z), now, today, yesterday, or -30m / -1h / -7d / -2w / +1m"

_RELATIVE = re.compile(r"^([+-])(\d{1,9})([smhdw])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def zone(name):
    """A time zone by name; UTC for none."""
    if name in (None, "", "UTC", "utc", "Z"):
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (e.g. UTC, Europe/Berlin)")


def parse(text: str, tz=UTC, now: datetime.datetime = None) -> datetime.datetime:
    """A point in time in UTC. `today`/`yesterday` and times without an
    offset are in `tz`; relative forms count from `now` (default: the clock)."""
    if now is None:
        now = datetime.datetime.now(UTC)
    value = text.strip().lower()
    relative = _RELATIVE.match(value)
    try:
        if value == "now":
            parsed = now
        elif value in ("today", "yesterday"):
            parsed = now.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
            if value == "yesterday":
                parsed -= datetime.timedelta(days=1)
        elif relative:
            sign, amount, unit = relative.groups()
            delta = datetime.timedelta(**{_UNIT[unit]: int(amount)})
            parsed = now - delta if sign == "-" else now + delta
        else:
            parsed = datetime.datetime.fromisoformat(text.strip())
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=tz)
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        if not relative:
            raise ValueError(f"{text[:64]!r} is not a time: use {FORMS}")
        parsed = None  # a relative time beyond datetime's range
    if parsed is None or not 1 < parsed.year < 9999:  # keeps bucket arithmetic in range
        raise ValueError(f"{text[:64]!r} must lie between the years 2 and 9998")
    return parsed


def show(ts: datetime.datetime, tz=UTC) -> str:
    """A timestamp for output: ISO-8601 in `tz` (Z for UTC)."""
    local = ts.astimezone(tz)
    if tz is UTC:
        return local.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
    return local.isoformat(timespec="seconds")
