"""A worker's database connections: a small pool, opened lazily, self-healing."""

import collections
import os
import select
import threading
import time

from psycopg2 import extensions

from counter.storage import connection

# A connection taken longer ago than this is waiting on the database. When one
# of a worker's is, or the last one given back was held this long, and none is
# free, one more request is refused at once rather than queued behind them.
# While all were taken just now and the database answers quickly (a burst of
# lookups, a worker's first requests), it waits for one to come back.
STUCK = 0.5  # seconds
# The longest a thread waits for a connection: on granian it may be the thread
# that clicks need. (meinheld's wait is cooperative, clicks go on meanwhile.)
THREAD_WAIT = 0.05  # seconds


class Busy(Exception):
    """No connection of this worker is free, and they are waiting on the
    database: the request is refused (503, retry shortly) instead of queueing
    behind them."""


def wait_readable(fd: int, timeout: float):
    """Block this thread until `fd` is readable or `timeout` passes (granian's
    threads, gunicorn's sync worker)."""
    select.select([fd], [], [], timeout)


_wait_readable = wait_readable


def set_wait(wait):
    """How requests of this process wait for a descriptor (``wait(fd,
    timeout)``); meinheld's is cooperative (counter/green.py installs it)."""
    global _wait_readable
    _wait_readable = wait


class _Waiter:
    """A request waiting for a connection: its eventfd becomes readable when
    one is handed over (a descriptor of its own, as meinheld's loop wants)."""

    def __init__(self):
        self.fd = os.eventfd(0)
        self.handed = False
        self.conn = None


class Database:
    """Runs ``fn(conn, *args)`` on one of at most `connections` connections,
    each opened on first use. One per worker process (a connection must not
    cross a fork).

    The cap is how many requests of the worker may wait on PostgreSQL at once
    (DB_WAITERS_PER_WORKER): on meinheld each waits cooperatively in its own
    greenlet (counter/green.py), on granian each on its own thread of
    DB_WAITERS_PER_WORKER + 1; clicks go on meanwhile (DESIGN invariant 12).
    One more gets Busy at once, unless all of them were taken within STUCK and
    the last one back was quick: then it waits for one, first come first
    served, at most THREAD_WAIT (on meinheld cooperatively, and up to a
    second or two).
    gunicorn's sync worker (the fallback without meinheld) serves one request
    at a time and still blocks while it waits.
    """

    # A wait holds a connection and a request slot: no query may take long.
    STATEMENT_TIMEOUT_MS = 5000

    def __init__(self, url: str, connections: int = 1):
        self.url = url
        self.connections = connections
        self._lock = threading.Lock()  # never held across a wait or a query
        self._free = [None] * connections  # an open connection, or None: opened when taken
        self._taken_at = {}  # a taker (object) -> when it took its connection (monotonic)
        self._queue = collections.deque()  # _Waiter, oldest first
        self._last_held = 0.0  # seconds the connection given back last was held

    def run(self, fn, *args):
        conn, taker = self._take()
        try:
            if conn is None:
                conn = connection.connect(self.url, statement_timeout_ms=self.STATEMENT_TIMEOUT_MS)
            return fn(conn, *args)
        finally:
            if conn is not None and not _reusable(conn):
                connection.close_quietly(conn)  # broken, or left inside a transaction
                conn = None
            self._give_back(conn, taker)

    def _take(self):
        """(connection or None, taker); raises Busy."""
        taker = object()
        with self._lock:
            now = time.monotonic()
            if self._free:
                self._taken_at[taker] = now
                return self._free.pop(), taker
            if now - min(self._taken_at.values()) >= STUCK or self._last_held >= STUCK:
                raise Busy(f"all {self.connections} database connections of this worker are "
                           "waiting on the database")
            waiter = _Waiter()
            self._queue.append(waiter)
        try:
            _wait_readable(waiter.fd, THREAD_WAIT)
        except BaseException:
            if self._leave(waiter):
                self._give_back(waiter.conn, waiter)
            raise
        if not self._leave(waiter):
            raise Busy("no database connection of this worker came free in time")
        return waiter.conn, waiter

    def _leave(self, waiter) -> bool:
        """Stop waiting; True when a connection was handed over meanwhile."""
        with self._lock:
            if not waiter.handed:
                self._queue.remove(waiter)
        os.close(waiter.fd)  # nobody writes to it once it is out of the queue
        return waiter.handed

    def _give_back(self, conn, taker):
        with self._lock:
            now = time.monotonic()
            self._last_held = now - self._taken_at.pop(taker)
            if self._queue:
                waiter = self._queue.popleft()
                waiter.conn, waiter.handed = conn, True
                self._taken_at[waiter] = now
                os.eventfd_write(waiter.fd, 1)
            else:
                self._free.append(conn)

    def describe(self, exc) -> str:
        return connection.describe_error(exc, self.url)

    def close(self):
        """Close the connections not in use."""
        with self._lock:
            for i, conn in enumerate(self._free):
                connection.close_quietly(conn)
                self._free[i] = None


def _reusable(conn) -> bool:
    """Open, and not inside a transaction (a query that failed or timed out
    was rolled back by its ``with conn``; a broken connection is closed)."""
    return not conn.closed and conn.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE
