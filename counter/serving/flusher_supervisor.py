"""Keeps the flusher process running beside the web server.

The flusher is started with posix_spawn (a fresh interpreter: no inherited
signal handlers, no copy of the master's state) and watched through a pidfd,
because the gunicorn master reaps every child with waitpid(-1): exit statuses
and child_exit never reach us, and Popen would be fooled. Nothing here depends
on gunicorn; it needs only the command to run and its environment (the
lifecycle's child_environment(): the settings in force, e.g. the embedded
database's URL, which this process's own environment does not hold).
"""

import os
import select
import signal
import sys
import threading
import time

# Signals whose handlers or ignore flags must not leak from the parent.
_RESET_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH,
                  signal.SIGPIPE]
# Blocked until the child has its handlers (it unblocks them): a stop request
# in its first moments waits instead of killing it before its final flush.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


def flusher_command(parent_pid: int):
    return [sys.executable, "-m", "cli", "flusher", "--parent-pid", str(parent_pid)]


def _exited(pidfd, timeout) -> bool:
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def _reap(pidfd):
    """Collect the exit status, unless another waiter (gunicorn's master
    reaps every child) got it first. P_PIDFD names this very process."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        pass


class FlusherSupervisor:
    def __init__(self, command, log, env, close_fds=(), restart_delay=0.5):
        self.command = command
        self.log = log
        self.env = env
        self.close_fds = list(close_fds)  # e.g. the listening sockets, inheritable in gunicorn
        self.restart_delay = restart_delay
        self.pid = None
        self._pidfd = None
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = None

    def start(self):
        with self._lock:
            self._spawn()
        self._thread = threading.Thread(target=self._watch, name="flusher-watch", daemon=True)
        self._thread.start()

    def _spawn(self):
        """Start the flusher; on failure (e.g. EAGAIN) leave no pid behind and raise."""
        self.pid = self._pidfd = None
        pid = os.posix_spawn(
            self.command[0], self.command, self.env,
            file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in self.close_fds],
            setsigdef=_RESET_SIGNALS, setsigmask=STOP_SIGNALS,
            setpgroup=0,  # a terminal's Ctrl-C goes to gunicorn, which stops it in order
        )
        self.pid, self._pidfd = pid, os.pidfd_open(pid)
        self.log.info("flusher started (pid: %s)", pid)

    def _watch(self):
        while True:
            pidfd = self._pidfd
            if pidfd is not None and not _exited(pidfd, 0.5):
                if self._stopping:
                    return
                continue
            with self._lock:
                if self._stopping:
                    return
                if pidfd is not None:
                    self.log.warning("flusher (pid: %s) died; restarting it", self.pid)
                    _reap(pidfd)
                    os.close(pidfd)
                    self._pidfd = None
                time.sleep(self.restart_delay)
                try:
                    self._spawn()
                except OSError as exc:
                    self.log.error("cannot start the flusher (%s); trying again", exc)

    def stop(self, timeout: float) -> bool:
        """SIGTERM the flusher (it makes a final flush) and wait for it.
        True if it exited by itself within the timeout."""
        with self._lock:
            self._stopping = True
            pid, pidfd = self.pid, self._pidfd
        if pidfd is None:
            return True
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)  # never hits a reused pid
        except ProcessLookupError:
            pass
        clean = _exited(pidfd, timeout)
        if not clean:
            self.log.error("flusher (pid: %s) did not finish in %.0fs; killing it "
                           "(unflushed clicks stay in shared memory for the next start)",
                           pid, timeout)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _exited(pidfd, 5)
        _reap(pidfd)
        if self._thread is not None:
            self._thread.join(timeout=2)  # it may be in select() on this pidfd
        os.close(pidfd)
        self._pidfd = None
        return clean
