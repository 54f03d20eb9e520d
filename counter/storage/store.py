"""The flusher's store: what the exactly-once protocol asks of the database,
behind one object handed to the Flusher (so it names no driver).

- register(ids): sequence rows (seq 0) for new segments, in a transaction of
  their own, before anything of them is flushed;
- committed(ids): each segment's last committed sequence, its row locked;
- write_part(batches, seqs, retired): one part's flush transaction.

Errors: every database error is a `Error`; those in `PartTooLarge` say the
part was too much (a statement timeout, a size limit, out of memory) and a
smaller one may pass; the others are outages, to back off from. After any
error call `disconnect()`: the next call connects again.
"""

import logging

import psycopg2
import psycopg2.errors

from counter.storage import connection, flush_writes, schema

log = logging.getLogger("counter.flusher")


class PostgresStore:
    Error = psycopg2.Error
    # Invariant 10: these say "this part was too much": the flusher halves it.
    PartTooLarge = (psycopg2.errors.QueryCanceled, psycopg2.errors.ProgramLimitExceeded,
                    psycopg2.errors.OutOfMemory)

    def __init__(self, url: str, application_name: str = "click-counter-flusher"):
        self.url = url
        self.application_name = application_name
        self._conn = None
        self._migrated = False

    def connect(self):
        """The connection, made now if there is none. The first one applies
        the migrations: the schema may not have been there when the service
        started."""
        if self._conn is None or self._conn.closed:
            conn = connection.connect(self.url, self.application_name)
            if not self._migrated:
                try:
                    applied = schema.migrate(conn)
                except BaseException:
                    connection.close_quietly(conn)
                    raise
                if applied:
                    log.info("applied migrations: %s", ", ".join(applied))
                self._migrated = True
            self._conn = conn
        return self._conn

    def disconnect(self):
        connection.close_quietly(self._conn)
        self._conn = None

    close = disconnect

    def register(self, segment_ids):
        flush_writes.register_segments(self.connect(), segment_ids)

    def committed(self, segment_ids) -> dict:
        return flush_writes.committed_seqs(self.connect(), segment_ids)

    def write_part(self, batches, segment_seqs, retired=()):
        flush_writes.write_part(self.connect(), batches, segment_seqs, retired)

    def describe_error(self, exc: BaseException) -> str:
        """One line about an error, never holding the password."""
        return connection.describe_error(exc, self.url)
