"""Settings: read once from the environment, validated at start, then frozen.

Nothing else in the package reads ``os.environ``; components receive the
``Settings`` object (or the few values they need) as arguments.
"""

import dataclasses
import os
import pathlib
import re
from typing import Mapping, Optional

from counter.shm import impressions, segment


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


# name: (default, help) -- the README's configuration table is written from this.
DOCUMENTED = {
    "DATABASE_URL": ("(unset)", "PostgreSQL URL; unset starts an embedded PostgreSQL under DATA_DIR"),
    "FLUSH_INTERVAL": ("1", "seconds between flushes of shared memory into PostgreSQL"),
    "FLUSH_MAX_ROWS": ("100000", "rows one flush transaction carries at most; a larger flush goes in parts"),
    "WORKERS": ("number of CPUs", "gunicorn worker processes"),
    "BIND": ("127.0.0.1:8000", "host:port the service listens on"),
    "DATA_DIR": ("~/.local/share/click-counter", "embedded PostgreSQL data lives here"),
    "SHM_DIR": ("/dev/shm/click-counter-<port>", "segment files (tmpfs); one directory per node"),
    "SEGMENT_SLOTS": ("16384", "distinct banners one worker segment holds (32 bytes each)"),
    "SHM_MAX_BYTES": ("268435456", "cap on all segment files; past it new banners get 503"),
    "SERVER": ("auto", "gunicorn (with meinheld) or granian; auto = gunicorn when meinheld imports, else granian"),
    "WORKER_CLASS": ("auto", "gunicorn worker class; auto = meinheld when importable"),
    "GRACEFUL_TIMEOUT": ("30", "seconds SIGTERM waits for workers and the final flush"),
    "LOG_LEVEL": ("info", "debug, info, warning or error"),
    "LOG_FORMAT": ("text", "text, or json (one object a line, for log shippers)"),
    "DEDUP_TTL": ("3600", "seconds a user's impression of a campaign is counted once"),
    "IMPRESSION_SLOTS": ("16384", "impressions one worker log holds before it rolls over (40 bytes each)"),
    "USER_HASH_KEY": ("(unset)", "hex key for hashing user ids; unset: one is made and kept in the database"),
    "STATS_TOKEN": ("(unset)", "bearer token required by the stats and campaign routes; unset: open"),
    "DB_WAITERS_PER_WORKER": ("4", "requests per worker that may wait on the database at once (one "
                              "connection each); one more gets 503 at once"),
}

DEFAULT_DB_WAITERS = 4

_BIND = re.compile(r"^(?P<host>[^\s:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def _number(env, name, default, kind, minimum, maximum=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {'number' if kind is float else 'whole number'}")
    if value != value or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name}={raw!r} must be {bound}")
    return value


def bytes_per_worker(segment_slots: int, impression_slots: int, threads: int = 1) -> int:
    """Shared memory one worker may need: at a minute change each of its
    threads that counts clicks briefly holds two click segments (the sealed
    one until it is flushed), and the worker may hold two impression logs
    (one log per worker, shared by its threads)."""
    return 2 * (threads * segment.file_size(segment_slots)
                + segment.file_size(impression_slots, impressions.IMPRESSIONS.record_words))


def threads_per_worker(server: str, db_waiters: int) -> int:
    """Threads that count clicks in one worker: granian runs the app on
    DB_WAITERS_PER_WORKER + 1 threads (so that clicks have one left while
    that many requests wait on the database), each with its own segment;
    a meinheld or sync worker has one."""
    return db_waiters + 1 if server == "granian" else 1


def load(env: Optional[Mapping[str, str]] = None) -> Settings:
    """Build and validate the settings; raise ConfigError with a clear message."""
    env = os.environ if env is None else env

    database_url = env.get("DATABASE_URL", "").strip() or None
    if database_url and not database_url.startswith(("postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")

    bind = env.get("BIND", "").strip() or "127.0.0.1:8000"
    match = _BIND.match(bind)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"BIND={bind!r} must look like HOST:PORT, e.g. 127.0.0.1:8000")

    level = (env.get("LOG_LEVEL", "").strip() or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"LOG_LEVEL={level!r} must be debug, info, warning or error")
    log_format = (env.get("LOG_FORMAT", "").strip() or "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT={log_format!r} must be text or json")

    data_dir = pathlib.Path(
        env.get("DATA_DIR", "").strip() or "~/.local/share/click-counter"
    ).expanduser().absolute()
    shm_dir = pathlib.Path(
        env.get("SHM_DIR", "").strip() or f"/dev/shm/click-counter-{match['port']}"
    ).expanduser().absolute()

    workers = _number(env, "WORKERS", os.cpu_count() or 1, int, 1, 1024)
    slots = _number(env, "SEGMENT_SLOTS", 16384, int, 16, 1 << 24)
    impression_slots = _number(env, "IMPRESSION_SLOTS", 16384, int, 16, 1 << 24)
    max_bytes = _number(env, "SHM_MAX_BYTES", 256 << 20, int, 1 << 16)
    server = (env.get("SERVER", "").strip() or "auto").lower()
    if server not in ("auto", "gunicorn", "granian"):
        raise ConfigError(f"SERVER={server!r} must be auto, gunicorn or granian")
    db_waiters = _number(env, "DB_WAITERS_PER_WORKER", DEFAULT_DB_WAITERS, int, 1, 64)
    threads = threads_per_worker(server, db_waiters)
    per_worker = bytes_per_worker(slots, impression_slots, threads)
    if workers * per_worker > max_bytes:
        per_thread = (f" for each of its {threads} threads (granian: DB_WAITERS_PER_WORKER + 1)"
                      if threads > 1 else "")
        raise ConfigError(
            f"SHM_MAX_BYTES={max_bytes} is too small for WORKERS={workers}: each worker needs "
            f"{per_worker} bytes (two segments of SEGMENT_SLOTS={slots}{per_thread} and two logs "
            f"of IMPRESSION_SLOTS={impression_slots}); raise SHM_MAX_BYTES or lower the others"
        )

    key = env.get("USER_HASH_KEY", "").strip() or None
    if key is not None:
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise ConfigError("USER_HASH_KEY must be hexadecimal (e.g. from `openssl rand -hex 32`)")
        if len(key) < 16:
            raise ConfigError("USER_HASH_KEY must be at least 16 bytes (32 hex digits)")

    token = env.get("STATS_TOKEN", "").strip() or None
    if token is not None and (len(token) < 16 or not token.isprintable() or " " in token):
        raise ConfigError("STATS_TOKEN must be at least 16 printable characters without spaces")

    return Settings(
        database_url=database_url,
        flush_interval=_number(env, "FLUSH_INTERVAL", 1.0, float, 0.05, 3600),
        workers=workers,
        bind=bind,
        data_dir=data_dir,
        shm_dir=shm_dir,
        segment_slots=slots,
        shm_max_bytes=max_bytes,
        worker_class=env.get("WORKER_CLASS", "").strip() or "auto",
        graceful_timeout=_number(env, "GRACEFUL_TIMEOUT", 30.0, float, 1, 3600),
        log_level=level,
        log_format=log_format,
        dedup_ttl=_number(env, "DEDUP_TTL", 3600.0, float, 1, 366 * 86400),
        impression_slots=impression_slots,
        user_hash_key=key,
        stats_token=token,
        server=server,
        # the default is flusher.MAX_PART_ROWS (not imported: it brings psycopg2)
        flush_max_rows=_number(env, "FLUSH_MAX_ROWS", 100_000, int, 1, 10_000_000),
        db_waiters=db_waiters,
    )
