"""Serving on granian: a small supervisor runs granian and the flusher side
by side (granian has no hooks like gunicorn's, and the flusher must not
depend on them).

    supervisor (this process) --spawns--> granian (WSGI, N workers, 1 thread each)
                              --spawns, watches, restarts--> flusher

Each granian worker runs the app on one blocking thread, so every segment
still has one writer. SIGTERM/SIGINT: granian stops first (in-flight requests
finish), then the flusher flushes until no segment has a live owner, then the
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

from counter import service, supervisor, worker

log = logging.getLogger("counter.granian")

_PR_SET_PDEATHSIG = 1


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
    server = subprocess.Popen(granian_command(settings), preexec_fn=_die_with_parent)
    server_fd = os.pidfd_open(server.pid)
    log.info("granian started (pid: %s) on %s with %d workers", server.pid, settings.bind,
             settings.workers)
    flusher = supervisor.FlusherSupervisor(supervisor.flusher_command(os.getpid()), log)
    flusher.start()

    code = 0
    while stop["signal"] is None:
        try:
            ready, _, _ = select.select([server_fd], [], [], 0.5)
        except InterruptedError:
            continue
        if ready:
            log.error("granian exited unexpectedly (status %s); stopping", server.wait())
            code = 1
            break
    if server.poll() is None:
        log.info("stopping granian")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=settings.graceful_timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    os.close(server_fd)
    if not flusher.stop(timeout=settings.graceful_timeout):
        code = code or 1
    service.shutdown_database()
    log.info("stopped")
    return code
