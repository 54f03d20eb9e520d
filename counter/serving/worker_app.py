"""A worker's application: a writer per event kind and its refusal counters
in shared memory, its database pool, the Falcon app and the bare click route
in front of it. Built in each worker after the fork (never preloaded:
segments and connections belong to the worker process)."""

from counter import config
from counter.kinds.registry import REGISTRY
from counter.shm import thread_writers, worker_counters
from counter.storage import db_pool
from counter.web import app, click_route


def create(settings):
    """The worker's app, and what the worker closes when it leaves."""
    # granian: DB_WAITERS_PER_WORKER + 1 threads serve this worker, each with its
    # own click segments; gunicorn: one thread (meinheld, or the sync fallback)
    threads = config.threads_per_worker(settings.server, settings.db_waiters)
    writers = {kind.name: kind.open_writer(settings, threads) for kind in REGISTRY}
    clicks, views = writers["clicks"], writers["impressions"]
    stats = worker_counters.WorkerStats(settings.shm_dir)
    if threads > 1:
        stats = thread_writers.OneAtATime(stats)
    db = db_pool.Database(settings.database_url, settings.db_waiters)
    api = app.create_app(settings, clicks, db, views, stats)
    # valid clicks are answered in front of Falcon; Falcon answers everything else
    application = click_route.click_route(clicks, api)
    if threads == 1:
        # an idle worker still notices a removed SHM_DIR (see MeinheldWorker.run)
        application.housekeeping = lambda: [writer.tick() for writer in writers.values()]
    return application, (*writers.values(), stats)
