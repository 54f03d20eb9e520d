"""Settings: read once from the environment, validated at start, then frozen.

Each setting is declared once, in SETTINGS: load() reads and checks it from
there, and markdown_table() writes the README's configuration table from
there (tests/test_config.py holds the README to it). Components receive the
``Settings`` object (or the few values they need) as arguments.
"""

import dataclasses
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from counter.kinds.registry import REGISTRY


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: Optional[str]
    flush_interval: float
    workers: int
    bind: str
    data_dir: pathlib.Path
    shm_dir: pathlib.Path
    segment_slots: int
    shm_max_bytes: int
    worker_class: str
    graceful_timeout: float
    log_level: str
    log_format: str
    dedup_ttl: float
    impression_slots: int
    user_hash_key: Optional[bytes]
    stats_token: Optional[str]
    server: str
    flush_max_rows: int
    db_waiters: int


DEFAULT_DB_WAITERS = 4

_BIND = re.compile(r"^(?P<host>[^\s:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


# Parsers for the settings that need more than a number or a choice; each
# raises ConfigError with the whole message.

def _postgres_url(raw: str) -> str:
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")
    return raw


def _host_port(raw: str) -> str:
    match = _BIND.match(raw)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"BIND={raw!r} must look like HOST:PORT, e.g. 127.0.0.1:8000")
    return raw


def _path(raw: str) -> pathlib.Path:
    return pathlib.Path(raw).expanduser().absolute()


def _hex_key(raw: str) -> bytes:
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise ConfigError("USER_HASH_KEY must be hexadecimal (e.g. from `openssl rand -hex 32`)")
    if len(key) < 16:
        raise ConfigError("USER_HASH_KEY must be at least 16 bytes (32 hex digits)")
    return key


def _token(raw: str) -> str:
    if len(raw) < 16 or not raw.isprintable() or " " in raw:
        raise ConfigError("STATS_TOKEN must be at least 16 printable characters without spaces")
    return raw


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: how it is read, checked and documented."""
    env: str  # the environment variable
    field: str  # the Settings attribute
    # Text used when the variable is unset or blank (parsed like the
    # operator's, trusted: not checked against the bounds), None for "no
    # value", or a function of the fields read so far that returns such text.
    default: Union[str, None, Callable[[dict], str]]
    parse: Callable[[str], Any]  # int or float: a bad number names the setting
    help: str
    low: Optional[float] = None  # bounds for numbers, inclusive
    high: Optional[float] = None
    choices: Tuple[str, ...] = ()  # the values allowed (after parse, e.g. str.lower)
    shown: str = ""  # the default for the docs, when it is a function
    form: str = ""  # what the value looks like, for the docs, when bounds and choices do not say

    def bounds(self) -> str:
        if self.high is None:
            return f"at least {self.low}"
        return f"between {self.low} and {self.high}"


# Every setting, in the README's order; load() reads them in this order (BIND
# before SHM_DIR, whose default holds the port) and markdown_table() writes
# the README's table from it.
SETTINGS = (
    Setting("DATABASE_URL", "database_url", None, _postgres_url,
            "PostgreSQL URL; unset starts an embedded PostgreSQL under `DATA_DIR`",
            form="`postgresql://...` (or `postgres://...`)"),
    Setting("FLUSH_INTERVAL", "flush_interval", "1", float,
            "seconds between flushes of shared memory into PostgreSQL", low=0.05, high=3600),
    # the default is flusher.MAX_PART_ROWS (not imported: it brings psycopg2)
    Setting("FLUSH_MAX_ROWS", "flush_max_rows", "100000", int,
            "rows (records with new clicks, impressions) one flush transaction carries at most; "
            "a larger flush goes in parts, each exactly-once on its own", low=1, high=10_000_000),
    Setting("WORKERS", "workers", lambda got: str(os.cpu_count() or 1), int,
            "gunicorn worker processes", low=1, high=1024, shown="number of CPUs"),
    Setting("BIND", "bind", "127.0.0.1:8000", _host_port,
            "the address the service listens on", form="`HOST:PORT`"),
    Setting("DATA_DIR", "data_dir", "~/.local/share/click-counter", _path,
            "the embedded PostgreSQL's data lives in `DATA_DIR/pgdata`", form="a directory"),
    Setting("SHM_DIR", "shm_dir",
            lambda got: "/dev/shm/click-counter-" + got["bind"].rsplit(":", 1)[1], _path,
            "segment files (tmpfs); one directory per node, kept across restarts",
            shown="`/dev/shm/click-counter-<port>`", form="a directory"),
    Setting("SEGMENT_SLOTS", "segment_slots", "16384", int,
            "distinct banners one worker segment holds (32 bytes each); a full segment rolls over "
            "to a new one", low=16, high=1 << 24),
    Setting("SHM_MAX_BYTES", "shm_max_bytes", str(256 << 20), int,
            "cap on all segment files together (each is fully allocated when made); past it "
            "clicks that need a new segment get `503`. Must hold 2 segments + 2 logs per worker",
            low=1 << 16),
    Setting("SERVER", "server", "auto", str.lower,
            "serving stack: `gunicorn` (with meinheld) or `granian`; `auto` is gunicorn when "
            "meinheld imports, else granian (with a warning)",
            choices=("auto", "gunicorn", "granian")),
    Setting("WORKER_CLASS", "worker_class", "auto", str,
            "gunicorn worker class; `auto` is meinheld when it imports, else `sync` "
            "(with a warning)", form="a gunicorn worker class"),
    Setting("GRACEFUL_TIMEOUT", "graceful_timeout", "30", float,
            "seconds SIGTERM waits for workers, then for the final flush", low=1, high=3600),
    Setting("LOG_LEVEL", "log_level", "info", str.lower,
            "the lowest severity that is logged", choices=("debug", "info", "warning", "error")),
    Setting("LOG_FORMAT", "log_format", "text", str.lower,
            "`json` writes one object a line, for log shippers; every line names its process: "
            "pid and role (master, worker, flusher, granian, supervisor)",
            choices=("text", "json")),
    Setting("DEDUP_TTL", "dedup_ttl", "3600", float,
            "seconds during which a user's repeated impressions of a campaign count once",
            low=1, high=366 * 86400),
    Setting("IMPRESSION_SLOTS", "impression_slots", "16384", int,
            "impressions one worker's log holds before it rolls over (40 bytes each)",
            low=16, high=1 << 24),
    Setting("STATS_TOKEN", "stats_token", None, _token,
            "bearer token required by the stats and campaign routes; unset: open",
            form="16 or more printable characters, no spaces"),
    Setting("DB_WAITERS_PER_WORKER", "db_waiters", str(DEFAULT_DB_WAITERS), int,
            "requests (stats, campaigns) per worker that may wait on PostgreSQL at once, one "
            "connection each, while the worker goes on counting clicks; one more gets `503` with "
            "`Retry-After` at once. granian runs this many + 1 threads per worker, each with its "
            "own segments (counted in the `SHM_MAX_BYTES` check)", low=1, high=64),
    Setting("USER_HASH_KEY", "user_hash_key", None, _hex_key,
            "key for hashing user ids; unset: a random key is made once and kept in the database",
            form="32 or more hex digits (16 bytes)"),
)


def markdown_table() -> str:
    """The README's configuration table, one row a setting."""
    rows = ["| variable | default | accepts | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if callable(s.default):
            default = s.shown
        else:
            default = "(unset)" if s.default is None else f"`{s.default}`"
        if s.choices:
            accepts = ", ".join(f"`{c}`" for c in s.choices)
        elif s.low is not None:
            accepts = s.bounds()
        else:
            accepts = s.form
        cells = [f"`{s.env}`", default, accepts, s.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def bytes_per_worker(fields: Mapping[str, Any], threads: int = 1) -> int:
    """Shared memory one worker may need: two files of each kind of event
    (the sealed one until it is flushed), per thread for a kind written by
    every thread (clicks), else per worker (an impression log is shared by
    the worker's threads). `fields`: the settings, by field name."""
    return sum(kind.bytes_per_worker(fields[kind.slots], threads) for kind in REGISTRY)


def env_of(field: str) -> str:
    """The variable of a Settings field."""
    return next(s.env for s in SETTINGS if s.field == field)


def slot_settings() -> list:
    """The variables that size the kinds' files (SEGMENT_SLOTS, ...), each once."""
    return list(dict.fromkeys(env_of(kind.slots) for kind in REGISTRY))


def threads_per_worker(server: str, db_waiters: int) -> int:
    """Threads that count clicks in one worker: granian runs the app on
    DB_WAITERS_PER_WORKER + 1 threads (so that clicks have one left while
    that many requests wait on the database), each with its own segment;
    a meinheld or sync worker has one."""
    return db_waiters + 1 if server == "granian" else 1


def load(env: Optional[Mapping[str, str]] = None) -> Settings:
    """Build and validate the settings; raise ConfigError with a clear message."""
    env = os.environ if env is None else env
    got = {}
    for s in SETTINGS:
        raw = env.get(s.env, "").strip()
        if not raw:
            default = s.default(got) if callable(s.default) else s.default
            got[s.field] = None if default is None else s.parse(default)
            continue
        try:
            value = s.parse(raw)
        except ConfigError:
            raise
        except ValueError:
            kind = "number" if s.parse is float else "whole number"
            raise ConfigError(f"{s.env}={raw!r} is not a {kind}") from None
        if s.choices and value not in s.choices:
            listed = ", ".join(s.choices[:-1]) + " or " + s.choices[-1]
            raise ConfigError(f"{s.env}={value!r} must be {listed}")
        if s.low is not None and (value != value or value < s.low
                                  or (s.high is not None and value > s.high)):
            raise ConfigError(f"{s.env}={raw!r} must be {s.bounds()}")
        got[s.field] = value

    # Shared memory must hold every worker's segments and logs.
    workers, max_bytes = got["workers"], got["shm_max_bytes"]
    threads = threads_per_worker(got["server"], got["db_waiters"])
    per_worker = bytes_per_worker(got, threads)
    if workers * per_worker > max_bytes:
        per_thread = (f" for each of its {threads} threads (granian: DB_WAITERS_PER_WORKER + 1)"
                      if threads > 1 else "")
        files = " and ".join(
            f"two {kind.files} of {env_of(kind.slots)}={got[kind.slots]}"
            + (per_thread if kind.per_thread else "") for kind in REGISTRY)
        raise ConfigError(
            f"SHM_MAX_BYTES={max_bytes} is too small for WORKERS={workers}: each worker needs "
            f"{per_worker} bytes ({files}); raise SHM_MAX_BYTES or lower the others"
        )
    return Settings(**got)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m counter.config --markdown")
    sys.stdout.write(markdown_table())
