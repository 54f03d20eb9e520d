"""Serving on granian: a small supervisor runs granian and the flusher side
by side (granian has no hooks like gunicorn's, and the flusher must not
depend on them).

    supervisor (this process) --spawns--> granian (WSGI, N workers, 1 thread each)
                              --spawns, watches, restarts--> flusher

Each granian worker runs the app on one blocking thread, so every segment
still has one writer. If granian itself exits (it does when a
worker dies twice within 5.5 s), it is started again. SIGTERM/SIGINT: granian
stops first (in-flight requests finish), then the flusher flushes until no segment has a live owner, then the
embedded database stops. If this supervisor is killed, granian gets SIGTERM
from the kernel (PR_SET_PDEATHSIG) and the flusher sees its parent gone.
"""

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time

from counter import service, supervisor, worker

log = logging.getLogger("counter.granian")

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS_PER_MINUTE = 10


def _die_with_parent():
    """In the child before exec: SIGTERM when the supervisor dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def granian_command(settings):
    host, port = settings.bind.rsplit(":", 1)
    return [sys.executable, "-m", "granian", "--interface", "wsgi",
            "--host", host.strip("[]"), "--port", port,
            "--workers", str(settings.workers),
            "--blocking-threads", "1",  # one writer per segment
            "--respawn-failed-workers", "--respawn-interval", "0.5",
            "--workers-kill-timeout", str(int(settings.graceful_timeout)),
            # idle connections count against backpressure: room for many, as
            # meinheld has (worker_connections); headers over 16 KiB get a 431
            "--backlog", "4096", "--backpressure", "16384", "--http1-buffer-size", "16384",
            "--no-access-log",
            "--log-level", "warning" if settings.log_level in ("warning", "error") else "info",
            "counter.wsgi:application"]


def run(settings) -> int:
    service.setup_logging(settings.log_level)
    service.prepare(settings)
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, request_stop)

    worker.raise_fd_limit(16384)  # inherited by granian and its workers

    def start_granian():
        process = subprocess.Popen(granian_command(settings), preexec_fn=_die_with_parent)
        log.info("granian started (pid: %s) on %s with %d workers", process.pid, settings.bind,
                 settings.workers)
        return process, os.pidfd_open(process.pid)

    server, server_fd = start_granian()
    flusher = supervisor.FlusherSupervisor(supervisor.flusher_command(os.getpid()), log)
    flusher.start()

    code = 0
    restarts = []  # granian exits on its own when a worker dies twice within 5.5 s
    while stop["signal"] is None:
        try:
            ready, _, _ = select.select([server_fd], [], [], 0.5)
        except InterruptedError:
            continue
        if not ready:
            continue
        status = server.wait()
        os.close(server_fd)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > MAX_RESTARTS_PER_MINUTE:
            log.error("granian keeps exiting (status %s); giving up", status)
            code = 1
            server_fd = None
            break
        log.error("granian exited unexpectedly (status %s); starting it again", status)
        time.sleep(0.5)
        server, server_fd = start_granian()
    if server.poll() is None:
        log.info("stopping granian")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=settings.graceful_timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if server_fd is not None:
        os.close(server_fd)
    if not flusher.stop(timeout=settings.graceful_timeout):
        code = code or 1
    service.shutdown_database()
    log.info("stopped")
    return code
