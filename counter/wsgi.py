"""The WSGI entry point, loaded in each worker after the fork (never preloaded:
segments and database connections belong to the worker process)."""

from counter import app, click_route, config, database, impressions, segment, worker_stats

settings = config.load()
clicks = segment.SegmentWriter(settings.shm_dir, settings.segment_slots, settings.shm_max_bytes)
views = impressions.ImpressionLog(settings.shm_dir, settings.impression_slots, settings.shm_max_bytes)
stats = worker_stats.WorkerStats(settings.shm_dir)
api = app.create_app(settings, clicks, database.Database(settings.database_url, settings.db_waiters),
                     views, stats)
# valid clicks are answered in front of Falcon; Falcon answers everything else
application = click_route.click_route(clicks, api)
