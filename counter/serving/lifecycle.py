"""The service's life around its web server: start-up, the flusher, shutdown.

One Lifecycle object holds the start and the stop order for both serving
stacks: gunicorn drives it from its hooks (counter.serving.gunicorn_hooks, used
by `counter serve` and gunicorn.conf.py), granian's supervisor
(counter.serving.granian_serve) from its main loop. The functions below it
each do one thing.
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
    return dataclasses.replace(settings, shm_max_bytes=room)


class Lifecycle:
    """The order in which the service starts and stops around its web server,
    the same for gunicorn and granian:

        prepare()    SHM_DIR claimed and its room checked, the database
                     (embedded when DATABASE_URL is unset), its migrations
        start(...)   the flusher, then the server
        stop(...)    the server (its workers seal their segments), the
                     flusher's final flush, then the database

    `settings` are the settings in force: after prepare(), with the embedded
    database's URL filled in and SHM_MAX_BYTES lowered to the tmpfs's room if
    need be. Nothing is written into os.environ: the processes started from
    here get them in child_environment(); gunicorn's workers, forked from the
    master that holds this object, read `settings`."""

    def __init__(self, settings, env=None):
        self.settings = settings
        # the environment the settings came from; None: this process's, as it
        # is when a child starts (gunicorn adds its raw_env to it)
        self._env = env
        self._embedded = None
        self._flusher = None
        self._worker_resources = []

    def prepare(self):
        """Before the server starts (gunicorn: before the first fork)."""
        previous = claim_shm_dir(self.settings)
        self.settings = fit_shm_bound(self.settings)
        url = self.settings.database_url
        if url is None:
            server = embedded.EmbeddedPostgres(self.settings.data_dir)
            try:
                url = server.acquire(create=True)  # started, or attached to if it runs
            except embedded.EmbeddedError as exc:
                sys.exit(f"cannot start: {exc}")
            self._embedded = server
            self.settings = dataclasses.replace(self.settings, database_url=url)
        try:
            conn = connection.connect(url)
            try:
                applied = schema.migrate(conn)
                database_id = identity.database_id(conn)
            finally:
                conn.close()
            check_same_database(self.settings, previous, database_id)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        except connection.DatabaseError as exc:
            # Clicks are still taken; the flusher migrates once the database answers.
            log.error("database not ready at start: %s", connection.describe_error(exc, url))

    def child_environment(self) -> dict:
        """The environment of a process started from here (the flusher,
        granian): the service's own, with the settings in force that it may
        not hold (the embedded database's URL, a lowered SHM_MAX_BYTES) and
        the serving stack (granian's workers build their app for it)."""
        env = dict(os.environ if self._env is None else self._env)
        if self.settings.database_url is not None:
            env["DATABASE_URL"] = self.settings.database_url
        env["SHM_MAX_BYTES"] = str(self.settings.shm_max_bytes)
        env["SERVER"] = self.settings.server
        return env

    def start(self, logger, server=None, close_fds=()):
        """After prepare(): the flusher, then the server. `server` starts it
        and returns it (granian); gunicorn forks its workers itself once its
        when_ready hook, which calls this, has returned. `close_fds`: what the
        flusher must not inherit (gunicorn's listening sockets)."""
        self._flusher = flusher_supervisor.FlusherSupervisor(
            flusher_supervisor.flusher_command(os.getpid()), logger, self.child_environment(),
            close_fds=close_fds)
        self._flusher.start()
        return server() if server is not None else None

    def stop(self, server=None) -> bool:
        """The server first (in-flight requests finish, its workers seal their
        segments), then the flusher's final flush (it flushes until no segment
        has a live owner), then the database. gunicorn has stopped its
        workers before its on_exit hook calls this: no server there. True if
        the flusher finished in time."""
        if server is not None:
            server.stop()
        clean = True
        if self._flusher is not None:
            clean = self._flusher.stop(timeout=self.settings.graceful_timeout)
            self._flusher = None
        if self._embedded is not None:
            # it stops only if this was its last user (the rule in
            # counter.storage.embedded), not under a CLI or another service
            self._embedded.release()
            self._embedded = None
        return clean

    # -- in a gunicorn worker (a fork of the master that holds this object) --

    def close_at_worker_exit(self, *resources):
        """The worker's app (gunicorn_hooks.worker_application) hands over what it must close when it leaves
        gracefully: its click writer, impression log and counters."""
        self._worker_resources.extend(resources)

    def worker_exit(self):
        """Seal the worker's segments, so that the flusher retires them now
        rather than once it sees their owner gone."""
        for resource in self._worker_resources:
            resource.close()
        self._worker_resources = []


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
