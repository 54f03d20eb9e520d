"""Serving on granian: a small supervisor runs granian and the flusher side
by side (granian has no hooks like gunicorn's, and the flusher must not
depend on them).

    supervisor (this process) --spawns--> granian (WSGI, N workers, K+1 threads each)
                              --spawns, watches, restarts--> flusher

Each granian worker runs the app on up to DB_WAITERS_PER_WORKER + 1 (K+1)
blocking threads: K requests may wait on the database while clicks keep a
thread (DESIGN invariant 12). Each thread counts clicks into a segment of its
own (counter/thread_writers.py), so every segment still has one writer;
granian starts the extra threads on demand and retires them after 30 s idle
(--blocking-threads-idle-timeout), and their segments are then sealed. The
workers read their settings from the environment granian is given: the
lifecycle's child_environment(), with SERVER=granian and the settings in force
(e.g. the embedded database's URL). The order of start and stop is the
lifecycle's (counter.serving.lifecycle), as under gunicorn: the flusher, then
granian; on SIGTERM/SIGINT granian stops first (in-flight requests finish),
then the flusher flushes until no segment has a live owner, then the embedded
database stops. If granian itself exits (it does when a worker dies twice
within 5.5 s), it is started again. If this supervisor is killed, granian gets
SIGTERM from the kernel (PR_SET_PDEATHSIG) and the flusher sees its parent gone.
"""

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time

from counter import logs
from counter.serving import lifecycle, meinheld_worker

log = logging.getLogger("counter.granian")

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS_PER_MINUTE = 10
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child


def _die_with_parent():
    """In the child before exec: SIGTERM when the supervisor dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def granian_command(settings, log_config=None):
    """granian's command line; `log_config`: a file from logs.write_config."""
    host, port = settings.bind.rsplit(":", 1)
    return [sys.executable, "-m", "granian", "--interface", "wsgi",
            "--host", host.strip("[]"), "--port", port,
            "--workers", str(settings.workers),
            # K may wait on the database, one more serves clicks; a segment per thread
            "--blocking-threads", str(settings.db_waiters + 1),
            "--respawn-failed-workers", "--respawn-interval", "0.5",
            "--workers-kill-timeout", str(int(settings.graceful_timeout)),
            # idle connections count against backpressure: room for many, as
            # meinheld has (worker_connections); headers over 16 KiB get a 431
            "--backlog", "4096", "--backpressure", "16384", "--http1-buffer-size", "16384",
            "--no-access-log",
            "--log-level", "warning" if settings.log_level in ("warning", "error") else "info",
            *(["--log-config", log_config] if log_config else []),  # our one format
            "counter.wsgi:application"]


class Granian:
    """granian's process group: its main process and the workers it forks.
    Stopping signals the whole group, so that no worker outlives a killed
    main process (they do not watch their parent)."""

    def __init__(self, settings, log_config, env):
        self.settings = settings
        self.process = subprocess.Popen(granian_command(settings, log_config), env=env,
                                        preexec_fn=_die_with_parent, process_group=0)
        self.pidfd = os.pidfd_open(self.process.pid)
        log.info("granian started (pid: %s) on %s with %d workers", self.process.pid,
                 settings.bind, settings.workers)

    def stop(self):
        """SIGTERM to the group; SIGKILL to what is left once granian's own
        worker kill timeout has had its turn."""
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.settings.graceful_timeout + 5)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        os.close(self.pidfd)

    def _signal_group(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def run(settings, env) -> int:
    """Serve until a stop signal; `env`: the environment `settings` came from
    (the process's, with the command line's options)."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    logs.set_role("supervisor")
    service = lifecycle.Lifecycle(settings, env)
    service.prepare()  # logging was set up by `counter serve`
    meinheld_worker.raise_fd_limit(16384)  # inherited by granian and its workers
    log_config = logs.write_config(settings.log_level, settings.log_format, "granian")
    try:
        return _supervise(service, stop, log_config)
    finally:
        os.unlink(log_config)


def _supervise(service, stop, log_config) -> int:
    def start_granian():
        return Granian(service.settings, log_config, service.child_environment())

    server = service.start(log, server=start_granian)

    code = 0
    restarts = []  # granian exits on its own when a worker dies twice within 5.5 s
    while stop["signal"] is None:
        try:
            ready, _, _ = select.select([server.pidfd], [], [], 0.5)
        except InterruptedError:
            continue
        if not ready or stop["signal"] is not None:
            continue
        status = server.process.wait()
        server.stop()  # its workers too, should any have outlived it
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > MAX_RESTARTS_PER_MINUTE:
            log.error("granian keeps exiting (status %s); giving up", status)
            code, server = 1, None
            break
        log.error("granian exited unexpectedly (status %s); starting it again", status)
        time.sleep(0.5)
        server = start_granian()
    if server is not None:
        log.info("stopping granian")
    if not service.stop(server):
        code = code or 1
    log.info("stopped")
    return code
