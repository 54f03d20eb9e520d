"""Running the service: one lifecycle for gunicorn and granian, the flusher's
supervisor, the meinheld worker, the worker's app."""
