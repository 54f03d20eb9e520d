"""The WSGI entry point for granian and any WSGI server: the app from the
settings in the environment. (Our gunicorn master builds its workers' apps
from the settings in force instead: gunicorn_hooks.worker_application.)"""

from counter import config, logs
from counter.serving import worker_app

logs.set_role("worker")
application, _resources = worker_app.create(config.load())
