"""gunicorn settings and hooks of the service (used by gunicorn.conf.py and
`counter serve`). Every value comes from counter.config.Settings; the hooks
drive the service's one Lifecycle (counter.serving.lifecycle). Each worker
builds its app here, after the fork, from the lifecycle's settings in force
(worker_application), and leaves with it what it closes when it exits."""

# Module names are private (_x): gunicorn reads every public name here as a
# setting, and "config" is one of its own.
import sys as _sys

from counter import config as _config
from counter import logs as _logs
from counter.serving import lifecycle as _service
from counter.serving import worker_app as _worker_app

try:
    _settings = _config.load()
except _config.ConfigError as _exc:
    _sys.exit(f"configuration error: {_exc}")
_service.setup_logging(_settings, "master")
# Not a gunicorn setting. The only state of this module; forked workers inherit it.
lifecycle = _service.Lifecycle(_settings)

# -- serving -----------------------------------------------------------------
bind = [_settings.bind]
workers = _settings.workers
worker_class = _service.worker_class(_settings)
threads = 1  # one thread per worker: each segment has exactly one writer
# meinheld uses this as its file-descriptor table size; sockets above it are
# never closed, so it must exceed the connections a worker may hold.
worker_connections = 16384
keepalive = 5
timeout = 30
graceful_timeout = int(_settings.graceful_timeout)
preload_app = False  # segments are opened in the worker, after the fork
wsgi_app = "counter.serving.gunicorn_hooks:worker_application()"  # called in each worker

# -- process -----------------------------------------------------------------
proc_name = "click-counter"
control_socket_disable = True  # several instances per machine must not share one socket
loglevel = _settings.log_level
logconfig_dict = _logs.dict_config(_settings.log_level, _settings.log_format)
accesslog = None  # a log line per click would cost more than counting it


# -- hooks -------------------------------------------------------------------
def on_starting(server):
    _service.check_single_threaded(server.cfg)
    lifecycle.prepare()


def post_fork(server, worker):
    _logs.set_role("worker")


def when_ready(server):
    # the workers are forked once this returns: the flusher starts first
    lifecycle.start(server.log, close_fds=[sock.fileno() for sock in server.LISTENERS])


def worker_exit(server, worker):
    lifecycle.worker_exit()


def on_exit(server):
    lifecycle.stop()  # gunicorn has stopped its workers


def worker_application():
    """The worker's app, from the settings in force (the embedded database's
    URL, a SHM_MAX_BYTES lowered to fit the tmpfs); gunicorn calls it in the
    worker after the fork. Not a hook: gunicorn ignores names it does not know."""
    application, resources = _worker_app.create(lifecycle.settings)
    lifecycle.close_at_worker_exit(*resources)  # sealed by worker_exit
    return application
