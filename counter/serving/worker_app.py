"""A worker's application: its click writers, impression log and counters in
shared memory, its database pool, the Falcon app and the bare click route in
front of it. Built in each worker after the fork (never preloaded: segments
and connections belong to the worker process)."""

from counter.shm import impressions, segment, thread_writers, worker_counters
from counter.storage import db_pool
from counter.web import app, click_route


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
