"""Cooperative database waits on a meinheld worker (DESIGN invariant 12).

meinheld serves every request in a greenlet of its own (server.c,
call_wsgi_handler: ``greenlet_new`` per request, switched to from its picoev
loop in the worker's one thread). ``meinheld.server.trampoline(fd, ...)``,
called from a request's greenlet, registers the descriptor with the loop and
switches back to it; the loop resumes that greenlet when the descriptor is
ready (or throws ``meinheld.server.timeout``). With this module's wait
callback installed, psycopg2 runs every connection in its non-blocking mode
and calls the callback whenever it would block: the request that waits on
PostgreSQL parks its greenlet, and the worker goes on serving clicks.
Each waiting request has a connection of its own (counter/db_pool.py), so
no descriptor is waited on twice; a request waiting for a connection of the
pool parks the same way, on an eventfd of its own (picoev holds one waiter
per descriptor).

Needs the patched meinheld build (deploy/meinheld): meinheld's bundled
greenlet 0.4 header made trampoline fail against greenlet 3.
Installed per worker, after the fork, by counter.serving.meinheld_worker.MeinheldWorker only.
"""

import greenlet
import psycopg2
from meinheld import server
from psycopg2 import extensions, extras

from counter.storage import db_pool

# The longest one wait for the socket may take. The server ends a statement
# after 5 s (Database.STATEMENT_TIMEOUT_MS); this bounds what it does not: a
# connection attempt (libpq's connect_timeout does not apply to non-blocking
# connects) and a server that went silent.
WAIT_TIMEOUT = 10


def install():
    extensions.set_wait_callback(wait)
    db_pool.set_wait(wait_readable)


def _in_request() -> bool:
    """True in a request's greenlet (its parent is the loop's); False in the
    main greenlet, where nothing could be yielded to."""
    return greenlet.getcurrent().parent is not None


def wait_readable(fd: int, timeout: float):
    """The pool's wait for a connection (counter/db_pool.py): yield until
    `fd` is readable. meinheld's timeouts are whole seconds, so it gives up
    after one to two seconds, not `timeout`; meanwhile clicks are served."""
    if not _in_request():
        return db_pool.wait_readable(fd, timeout)
    if fd >= server.get_picoev_max_fd():
        return  # meinheld's table cannot hold it: give up (the request gets Busy)
    try:
        server.trampoline(fd, read=True, timeout=1)
    except server.timeout:
        pass


def wait(conn):
    """psycopg2's wait callback: poll the connection until its operation is
    done, yielding to meinheld's loop while the socket is not ready."""
    if not _in_request():
        return extras.wait_select(conn)  # no loop to yield to: block
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        if state not in (extensions.POLL_READ, extensions.POLL_WRITE):
            raise psycopg2.OperationalError(f"unexpected state from poll: {state}")
        fd = conn.fileno()
        if fd >= server.get_picoev_max_fd():  # meinheld's table cannot hold it
            raise psycopg2.OperationalError("no room in the worker's event loop for a "
                                            "database connection; retry shortly")
        try:
            server.trampoline(fd, read=state == extensions.POLL_READ,
                              write=state == extensions.POLL_WRITE, timeout=WAIT_TIMEOUT)
        except server.timeout:
            # psycopg2 closes a connection whose wait callback raised
            raise psycopg2.OperationalError(
                f"the database did not answer within {WAIT_TIMEOUT} s") from None
