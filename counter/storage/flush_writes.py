"""The flush transaction: every kind's batch and the segments' sequences, all or nothing."""

import io

import psycopg2
import psycopg2.errors
import psycopg2.extensions

# Each COPY runs in a savepoint, i.e. a subtransaction with an id of its own.
# PostgreSQL caches 64 of them per transaction; past that, snapshot checks
# in every session of the server take a slow path until the commit. So one
# flush transaction makes at most this many bulk inserts (a catch-up after a
# long outage can hold hundreds of minutes); the rest go by upsert.
_MAX_COPIES = 32


class FlushCursor(psycopg2.extensions.cursor):
    """The cursor a kind's write gets: DB-API, plus a bulk insert of rows
    that are likely new, which keeps psycopg2's COPY and its errors here."""

    copies_left = _MAX_COPIES

    def copy_new(self, copy_sql: str, make_text) -> bool:
        """Run `copy_sql` (COPY ... FROM STDIN) on the text `make_text()`
        returns, in a savepoint. False, with nothing written, when a row
        exists already (the caller then upserts), or when the transaction has
        made its bulk inserts."""
        if self.copies_left <= 0:
            return False
        self.copies_left -= 1
        self.execute("SAVEPOINT new_rows")
        try:
            self.copy_expert(copy_sql, io.StringIO(make_text()), size=1 << 20)
        except psycopg2.errors.UniqueViolation:
            self.execute("ROLLBACK TO SAVEPOINT new_rows")
            self.execute("RELEASE SAVEPOINT new_rows")  # the rollback leaves it open
            return False
        self.execute("RELEASE SAVEPOINT new_rows")
        return True


def write_part(conn, batches, segment_seqs, retired=()):
    """The flush transaction of one part: write each kind's batch, and
    record segment sequences -- all or nothing.

    batches: {kind: batch}, written in that order (the registry's, the same
    on every node); segment_seqs: {segment_id: seq}; retired: ids of removed
    segments whose sequence rows may go.
    """
    segments = sorted(segment_seqs)
    with conn, conn.cursor(cursor_factory=FlushCursor) as cur:
        for kind, batch in batches.items():
            kind.write(cur, batch)
        if segments:
            cur.execute(
                "INSERT INTO segment_flushes (segment_id, seq)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[])"
                " ON CONFLICT (segment_id) DO UPDATE SET seq = EXCLUDED.seq, flushed_at = now()",
                (segments, [segment_seqs[s] for s in segments]),
            )
        if retired:
            cur.execute(
                "DELETE FROM segment_flushes WHERE segment_id = ANY(%s)", (sorted(retired),)
            )


def register_segments(conn, segment_ids):
    """Create the sequence rows (seq 0) of new segments."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO segment_flushes (segment_id, seq) SELECT unnest(%s::text[]), 0"
            " ON CONFLICT (segment_id) DO NOTHING", (sorted(segment_ids),),
        )


def committed_seqs(conn, segment_ids) -> dict:
    """{segment_id: last committed flush sequence}. The rows are locked
    (FOR UPDATE), so a flush transaction still committing is waited for."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT segment_id, seq FROM segment_flushes WHERE segment_id = ANY(%s)"
            " ORDER BY segment_id FOR UPDATE",
            (sorted(segment_ids),),
        )
        return dict(cur.fetchall())
