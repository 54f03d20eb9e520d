"""The service's life around its web server: start-up, the flusher, shutdown.

gunicorn.conf.py (and counter serve, through counter.serving.gunicorn_hooks) call
these from gunicorn's hooks; granian_serve calls prepare and
shutdown_database around granian. Each does one thing.
"""

import dataclasses
import importlib.util
import logging
import os
import sys

from counter import config, logs
from counter.serving import flusher_supervisor, meinheld_worker
from counter.shm import directory, segment
from counter.storage import connection, embedded, identity, schema
from counter.web import health

log = logging.getLogger("counter.service")

_embedded = None
_flusher = None


def setup_logging(settings, role: str):
    logs.setup(settings.log_level, settings.log_format, role)


def worker_class(settings) -> str:
    """meinheld when it imports; otherwise the single-threaded sync worker,
    loudly. (A threaded worker would break the one-writer rule of segments.)"""
    if settings.worker_class != "auto":
        return settings.worker_class
    if meinheld_worker.MEINHELD_IMPORT_ERROR is None:
        return "counter.serving.meinheld_worker.MeinheldWorker"
    log.warning(
        "meinheld cannot be imported (%s); serving with gunicorn's sync worker, "
        "one request at a time per worker: expect far fewer clicks/s",
        meinheld_worker.MEINHELD_IMPORT_ERROR,
    )
    return "sync"


def check_single_threaded(cfg):
    """Refuse several threads per worker (e.g. --threads in GUNICORN_CMD_ARGS,
    which turns the sync worker into gthread): a segment has one writer."""
    if cfg.threads > 1 or "gthread" in str(cfg.worker_class_str):
        sys.exit("configuration error: one thread per worker is required "
                 "(each worker's segment has a single writer); drop --threads / gthread")


def claim_shm_dir(settings):
    """Make this service the owner of SHM_DIR, or exit with one line naming
    the live service that owns it (two services on one directory would
    fight over its segments and its flusher)."""
    database = (connection.redact(settings.database_url) if settings.database_url
                else f"embedded PostgreSQL in {settings.data_dir}")
    try:
        return directory.claim(str(settings.shm_dir), bind=settings.bind, database=database)
    except directory.InUse as exc:
        sys.exit(f"cannot start: {exc}")


def check_same_database(settings, previous, database_id):
    """Clicks left in SHM_DIR belong to the database they were counted for:
    a start against another database (a new DATABASE_URL, a second clone under
    one HOME) must not drain them into it. Exits with one line that says how
    to drain them where they belong; otherwise records the database."""
    shm_dir = str(settings.shm_dir)
    before = (previous or {}).get("database_id")
    if before and before != database_id:
        left = health.pending(shm_dir)
        if left:
            sys.exit(f"cannot start: SHM_DIR {shm_dir} holds {left} clicks not yet flushed into "
                     f"database {before} ({previous.get('database', '?')}), and this start's "
                     f"database is {database_id}. Drain them into theirs first: "
                     f"SHM_DIR={shm_dir} DATABASE_URL=<that database> counter flusher --drain")
    directory.update_node(shm_dir, database_id=database_id)


def fit_shm_bound(settings):
    """Compare SHM_MAX_BYTES with the room the tmpfs has: lower the bound,
    loudly, when the tmpfs is smaller (a full tmpfs would refuse every click
    with no word why); exit with one line when not even every worker's
    segments fit. Returns the settings in force."""
    shm_dir = str(settings.shm_dir)
    room = directory.free_bytes(shm_dir) + segment.segment_bytes(shm_dir)
    if room >= settings.shm_max_bytes:
        return settings
    threads = config.threads_per_worker(settings.server, settings.db_waiters)
    needed = settings.workers * config.bytes_per_worker(dataclasses.asdict(settings), threads)
    if room < needed:
        sys.exit(f"cannot start: SHM_DIR {shm_dir} has {room} bytes of room, less than "
                 f"SHM_MAX_BYTES={settings.shm_max_bytes} and less than the {needed} bytes that "
                 f"WORKERS={settings.workers} need; give that tmpfs more room (docker: --shm-size) "
                 f"or lower WORKERS, {', '.join(config.slot_settings()[:-1])} or "
                 f"{config.slot_settings()[-1]}"
                 + (" (or DB_WAITERS_PER_WORKER: granian needs segments per thread)"
                    if threads > 1 else ""))
    log.warning("SHM_DIR %s has %d bytes of room, less than SHM_MAX_BYTES=%d: using "
                "SHM_MAX_BYTES=%d, so that clicks past it get a 503 instead of a full tmpfs",
                shm_dir, room, settings.shm_max_bytes, room)
    os.environ["SHM_MAX_BYTES"] = str(room)  # the workers and the flusher read it at their start
    return dataclasses.replace(settings, shm_max_bytes=room)


def prepare(settings):
    """Before the first fork: the shared-memory directory (claimed, with room
    checked), the database (embedded when DATABASE_URL is unset) and its
    migrations."""
    global _embedded
    previous = claim_shm_dir(settings)
    fit_shm_bound(settings)
    url = settings.database_url
    if url is None:
        server = embedded.EmbeddedPostgres(settings.data_dir)
        try:
            url = server.acquire(create=True)  # started, or attached to if it runs
        except embedded.EmbeddedError as exc:
            sys.exit(f"cannot start: {exc}")
        _embedded = server
        # Workers inherit the environment at fork, the flusher at spawn.
        os.environ["DATABASE_URL"] = url
    try:
        conn = connection.connect(url)
        try:
            applied = schema.migrate(conn)
            database_id = identity.database_id(conn)
        finally:
            conn.close()
        check_same_database(settings, previous, database_id)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    except connection.DatabaseError as exc:
        # Clicks are still taken; the flusher migrates once the database answers.
        log.error("database not ready at start: %s", connection.describe_error(exc, url))


def start_flusher(server):
    global _flusher
    listeners = [sock.fileno() for sock in server.LISTENERS]
    _flusher = flusher_supervisor.FlusherSupervisor(
        flusher_supervisor.flusher_command(os.getpid()), server.log, close_fds=listeners
    )
    _flusher.start()


def seal_worker_segment():
    """A worker leaving gracefully seals its segments (of every kind) so the
    flusher can retire them now."""
    wsgi = sys.modules.get("counter.wsgi")
    if wsgi is not None:
        for writer in wsgi.writers.values():
            writer.close()
        wsgi.stats.close()


def shutdown(settings):
    """After the workers are gone: the flusher's final flush, then the embedded database."""
    if _flusher is not None:
        _flusher.stop(timeout=settings.graceful_timeout)
    shutdown_database()


def shutdown_database():
    """Leave the embedded database; it stops only if this was its last user
    (the rule in counter.storage.embedded), not under a CLI or another service."""
    if _embedded is not None:
        _embedded.release()


def choose_server(settings) -> str:
    """gunicorn + meinheld when meinheld imports; else granian (fast, and one
    thread per worker is easy there) when it imports; else gunicorn's sync
    worker. An explicit SERVER is kept."""
    if settings.server != "auto":
        return settings.server
    if meinheld_worker.MEINHELD_IMPORT_ERROR is None:
        return "gunicorn"
    if importlib.util.find_spec("granian") is None:
        return "gunicorn"  # worker_class() warns about the sync worker
    log.warning("meinheld cannot be imported (%s); serving with granian instead",
                meinheld_worker.MEINHELD_IMPORT_ERROR)
    return "granian"
