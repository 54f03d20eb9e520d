"""The WSGI entry point, loaded in each worker after the fork (never preloaded:
segments and database connections belong to the worker process)."""

import sys

from counter import config, logs
from counter.shm import impressions, segment, thread_writers, worker_counters
from counter.storage import db_pool
from counter.web import app, click_route


def _lifecycle():
    """The Lifecycle of our gunicorn master when it forked this worker: its
    hook module (loaded by `counter serve` and by gunicorn.conf.py) holds it,
    with the settings in force. None under granian, whose workers get those
    in their environment, and under any other WSGI server: the environment's."""
    hooks = sys.modules.get("counter.serving.gunicorn_hooks")
    return None if hooks is None else hooks.lifecycle


def create(settings):
    """The worker's app, and what the worker closes when it leaves."""
    views = impressions.ImpressionLog(settings.shm_dir, settings.impression_slots, settings.shm_max_bytes)
    stats = worker_counters.WorkerStats(settings.shm_dir)
    if settings.server == "granian":
        # DB_WAITERS_PER_WORKER + 1 threads serve this worker: a click writer per thread
        clicks = thread_writers.ThreadWriters(settings.shm_dir, settings.segment_slots,
                                              settings.shm_max_bytes)
        views, stats = thread_writers.OneAtATime(views), thread_writers.OneAtATime(stats)
    else:  # gunicorn: one thread per worker (meinheld, or the sync fallback)
        clicks = segment.SegmentWriter(settings.shm_dir, settings.segment_slots, settings.shm_max_bytes)
    db = db_pool.Database(settings.database_url, settings.db_waiters)
    api = app.create_app(settings, clicks, db, views, stats)
    # valid clicks are answered in front of Falcon; Falcon answers everything else
    application = click_route.click_route(clicks, api)
    if isinstance(clicks, segment.Writer):
        # an idle worker still notices a removed SHM_DIR (see MeinheldWorker.run)
        application.housekeeping = lambda: (clicks.tick(), views.tick())
    return application, (clicks, views, stats)


def _application():
    service = _lifecycle()
    application, resources = create(config.load() if service is None else service.settings)
    if service is not None:
        service.close_at_worker_exit(*resources)  # sealed by gunicorn's worker_exit hook
    return application


logs.set_role("worker")
application = _application()
