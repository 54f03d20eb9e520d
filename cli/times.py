"""Times as a person types them: ISO-8601, or `now`, `today`, `yesterday`,
`-1h`, `-30m`, `-7d`, `-2w` (relative to now)."""

import datetime
import re
import zoneinfo

import click

_RELATIVE = re.compile(r"^([+-])(\d{1,9})([smhdw])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def zone(name):
    if name in (None, "", "UTC", "utc", "Z"):
        return datetime.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"unknown time zone {name!r} (e.g. UTC, Europe/Berlin)")


def parse(text: str, tz, now: datetime.datetime) -> datetime.datetime:
    """A point in time in UTC. Times without an offset are in `tz`."""
    value = text.strip().lower()
    local_now = now.astimezone(tz)
    if value == "now":
        return now
    if value in ("today", "yesterday"):
        midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
        if value == "yesterday":
            midnight -= datetime.timedelta(days=1)
        return midnight.astimezone(datetime.timezone.utc)
    match = _RELATIVE.match(value)
    if match:
        sign, amount, unit = match.groups()
        delta = datetime.timedelta(**{_UNIT[unit]: int(amount)})
        return now - delta if sign == "-" else now + delta
    try:
        parsed = datetime.datetime.fromisoformat(text.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        parsed = parsed.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        raise click.BadParameter(
            f"{text!r} is not a time: use ISO-8601 (2024-01-31T10:00), now, today, yesterday, "
            "or -30m / -1h / -7d / -2w")
    if not 1 < parsed.year < 9999:
        raise click.BadParameter(f"{text!r} must lie between the years 2 and 9998")
    return parsed


def show(ts: datetime.datetime, tz) -> str:
    """A timestamp for output: ISO-8601 in `tz` (Z for UTC)."""
    local = ts.astimezone(tz)
    if tz is datetime.timezone.utc:
        return local.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
    return local.isoformat(timespec="seconds")
