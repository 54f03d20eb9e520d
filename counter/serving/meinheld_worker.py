"""gunicorn worker classes for the service.

MeinheldWorker fixes a trap of meinheld's own gunicorn worker: its __init__
(which runs in the gunicorn master) replaces ``Logger.error`` on gunicorn's
Logger class with a function taking ``(exc, val, tb)``. The master's next
ordinary error log -- e.g. "Worker was sent SIGKILL!" -- then raises and the
master exits, taking the service down. Here gunicorn's Logger is left alone
and meinheld gets an adapter that speaks its logging interface instead.
"""

import os
import resource

from gunicorn.workers.base import Worker

from counter.shm import segment

try:
    from meinheld import server as meinheld_server
    from meinheld.gmeinheld import MeinheldWorker as _MeinheldWorker
except ImportError as exc:  # e.g. Python 3.13, where meinheld does not import
    MEINHELD_IMPORT_ERROR = exc
    _MeinheldWorker = None
else:
    MEINHELD_IMPORT_ERROR = None


def raise_fd_limit(connections: int):
    """meinheld closes only sockets numbered below worker_connections, so the
    process must be allowed that many descriptors (and some to spare)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


class _MeinheldLog:
    """meinheld calls error(exc_type, exc, tb) and access(environ)."""

    def __init__(self, log):
        self._log = log

    def error(self, exc_type, exc, tb):
        self._log.error("meinheld: unhandled error", exc_info=(exc_type, exc, tb))

    def access(self, environ):
        self._log.access_log.info(
            '%s "%s %s" %s', environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD", "-"),
            environ.get("PATH_INFO", "-"), environ.get("STATUS_CODE", "-"),
        )


if _MeinheldWorker is not None:

    class MeinheldWorker(_MeinheldWorker):
        def __init__(self, *args, **kwargs):
            # Deliberately skip _MeinheldWorker.__init__ (see the module docstring).
            Worker.__init__(self, *args, **kwargs)
            adapter = _MeinheldLog(self.log)
            meinheld_server.set_access_logger(adapter if self.cfg.accesslog else None)
            meinheld_server.set_error_logger(adapter)

        def init_process(self):
            # in the worker, after the fork: database waits yield to meinheld's loop
            from counter.storage import cooperative_wait

            cooperative_wait.install()
            raise_fd_limit(self.cfg.worker_connections)
            super().init_process()

        def run(self):
            # The writers' housekeeping (a removed SHM_DIR noticed, removed
            # segments put back) runs on their own records; a worker that gets
            # none runs it from meinheld's loop once a second, in its one thread.
            housekeeping = getattr(self.wsgi, "housekeeping", None)
            every = max(1, int(segment.HOUSEKEEPING_INTERVAL))  # meinheld's timers take whole seconds
            if housekeeping is not None:
                def tick():
                    # A pending timer keeps meinheld's loop alive: none is set
                    # once the worker is on its way out (its master gone, or
                    # told to stop), or the worker would never exit.
                    if self._stopping or os.getppid() != self.ppid:
                        return
                    try:
                        housekeeping()
                    finally:
                        meinheld_server.schedule_call(every, tick)

                meinheld_server.schedule_call(every, tick)
            super().run()

        _stopping = False

        def handle_quit(self, sig, frame):
            self._stopping = True
            super().handle_quit(sig, frame)

        def handle_exit(self, sig, frame):
            self._stopping = True
            super().handle_exit(sig, frame)
