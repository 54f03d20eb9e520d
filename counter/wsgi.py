"""The WSGI entry point, loaded in each worker after the fork (never preloaded:
segments and database connections belong to the worker process)."""

from counter import app, config, database, impressions, segment

settings = config.load()
clicks = segment.SegmentWriter(settings.shm_dir, settings.segment_slots, settings.shm_max_bytes)
views = impressions.ImpressionLog(settings.shm_dir, settings.impression_slots, settings.shm_max_bytes)
application = app.create_app(settings, clicks, database.Database(settings.database_url), views)
