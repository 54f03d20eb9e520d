"""A worker's lazily opened, self-healing database connection."""

from counter import storage


class Database:
    """Runs ``fn(conn, *args)`` on one connection, opened on first use and
    reopened after a connection failure. One per worker process (a
    connection must not cross a fork)."""

    # A worker's thread also serves clicks: no query may hold it for long.
    STATEMENT_TIMEOUT_MS = 5000

    def __init__(self, url: str):
        self.url = url
        self._conn = None

    def run(self, fn, *args):
        if self._conn is None or self._conn.closed:
            self._conn = storage.connect(self.url, statement_timeout_ms=self.STATEMENT_TIMEOUT_MS)
        try:
            return fn(self._conn, *args)
        except (storage.psycopg2.OperationalError, storage.psycopg2.InterfaceError):
            self.close()
            raise

    def describe(self, exc) -> str:
        return storage.describe_error(exc, self.url)

    def close(self):
        storage.close_quietly(self._conn)
        self._conn = None
