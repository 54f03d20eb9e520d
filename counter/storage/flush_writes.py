"""The flush transaction: click deltas, unique impressions and segment sequences, all or nothing."""

import datetime
import io

import psycopg2
import psycopg2.errors


def _array(values: list) -> str:
    # A Postgres array literal: far cheaper to build and parse than one
    # bound parameter per element. (A list's repr is the fastest way to
    # render many ints; the array parser ignores the spaces.)
    assert isinstance(values, list)  # a tuple's repr differs: (5,)
    return "{" + repr(values)[1:-1] + "}"


# Each COPY runs in a savepoint, i.e. a subtransaction with an id of its own.
# PostgreSQL caches 64 of them per transaction; past that, snapshot checks
# in every session of the server take a slow path until the commit. So one
# flush copies at most this many minutes (a catch-up after a long outage can
# hold hundreds); the rest go by upsert.
_MAX_COPIED_MINUTES = 32


def write_flush(conn, clicks, segment_seqs, retired=(), impressions=(), dedup_ttl=3600.0,
                new_minutes=frozenset()):
    """The flush transaction: add click deltas, count unique impressions, and
    record segment sequences -- all or nothing.

    clicks: {minute: {banner_id: delta}}; segment_seqs: {segment_id: seq};
    retired: ids of removed segments whose sequence rows may go;
    impressions: [(impression id, campaign UUID, user hash, time in µs)];
    new_minutes: minutes the caller has written no click row of yet (see
    _insert_new_rows).
    Rows are written in a fixed order (minute, then banner), so concurrent
    flushers of several nodes never deadlock on each other's rows.
    """
    segments = sorted(segment_seqs)
    copies_left = _MAX_COPIED_MINUTES
    with conn, conn.cursor() as cur:
        for minute in sorted(clicks):
            deltas = clicks[minute]
            banners = sorted(deltas)
            counts = list(map(deltas.__getitem__, banners))
            if minute in new_minutes and copies_left:
                copies_left -= 1
                if _insert_new_rows(cur, minute, banners, counts):
                    continue
            _add_to_rows(cur, minute, banners, counts)
        if impressions:
            _count_unique_impressions(cur, impressions, dedup_ttl)
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


def _add_to_rows(cur, minute, banners, counts):
    """Upsert one minute's rows: add each count to its row, making missing rows."""
    # The minute is a single parameter; only banner ids and counts travel as arrays.
    cur.execute(
        "INSERT INTO clicks (banner_id, ts, count)"
        " SELECT b, to_timestamp(%s::bigint * 60), c"
        " FROM unnest(%s::bigint[], %s::bigint[]) AS u(b, c)"
        " ON CONFLICT (banner_id, ts) DO UPDATE SET count = clicks.count + EXCLUDED.count",
        (minute, _array(banners), _array(counts)),
    )


def _insert_new_rows(cur, minute, banners, counts) -> bool:
    """Insert one minute's rows with COPY, for a minute whose rows are likely
    all new (the first flush of a minute). COPY is a bulk insert, two to three
    times faster than the upsert, but it cannot add to a row that exists: if
    one does (another node or an earlier flusher wrote it), the COPY is rolled
    back to its savepoint and False returned, for the upsert to do it."""
    ts = datetime.datetime.fromtimestamp(minute * 60, datetime.timezone.utc).isoformat()
    text = "".join([f"{banner}\t{ts}\t{count}\n" for banner, count in zip(banners, counts)])
    cur.execute("SAVEPOINT new_rows")
    try:
        cur.copy_expert("COPY clicks (banner_id, ts, count) FROM STDIN",
                        io.StringIO(text), size=1 << 20)
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT new_rows")
        cur.execute("RELEASE SAVEPOINT new_rows")  # the rollback leaves it open
        return False
    cur.execute("RELEASE SAVEPOINT new_rows")
    return True


def _count_unique_impressions(cur, impressions, ttl):
    """Apply the dedup window rule to a batch and add the counted impressions
    to campaign_impressions.

    Rule: a user's impression of a campaign counts when it opens a window, i.e.
    when there is no window yet or it is at least `ttl` seconds after the
    current window's start; it then becomes the window's start. The upsert
    locks each (campaign, user) row until commit, so flushers of other nodes
    wait for it and the rule holds across nodes. A statement may touch a row
    only once, so the batch goes in rounds: each round takes, per user, the
    earliest impression not yet decided, and the answer tells which of the
    user's later impressions the resulting window covers.
    """
    queues = {}
    for impression_id, campaign, user, micros in sorted(impressions, key=lambda r: r[3]):
        queues.setdefault((str(campaign), bytes(user)), []).append((micros, impression_id))
    ttl_micros = round(ttl * 1_000_000)
    counted = {}
    while queues:
        keys = sorted(queues)
        firsts = [queues[k][0] for k in keys]
        cur.execute(
            "INSERT INTO impression_windows AS w (campaign_id, user_hash, window_start, opened_by)"
            " SELECT c, u, timestamptz 'epoch' + t * interval '1 microsecond', i"
            " FROM unnest(%s::uuid[], %s::bytea[], %s::bigint[], %s::bigint[]) AS x(c, u, t, i)"
            " ON CONFLICT (campaign_id, user_hash) DO UPDATE SET"
            "  window_start = CASE WHEN EXCLUDED.window_start >= w.window_start + %s * interval '1 microsecond'"
            "   THEN EXCLUDED.window_start ELSE w.window_start END,"
            "  opened_by = CASE WHEN EXCLUDED.window_start >= w.window_start + %s * interval '1 microsecond'"
            "   THEN EXCLUDED.opened_by ELSE w.opened_by END"
            " RETURNING campaign_id::text, user_hash,"
            "  (extract(epoch FROM window_start) * 1000000)::bigint, opened_by",
            ([k[0] for k in keys], [psycopg2.Binary(k[1]) for k in keys],
             [f[0] for f in firsts], [f[1] for f in firsts], ttl_micros, ttl_micros),
        )
        for campaign, user, window_start, opened_by in cur.fetchall():
            key = (campaign, bytes(user))
            micros, impression_id = queues[key][0]
            if opened_by == impression_id:
                minute = micros // 60_000_000
                counted[campaign, minute] = counted.get((campaign, minute), 0) + 1
            # everything of this user inside the window is decided: not counted
            rest = [q for q in queues[key][1:] if q[0] >= window_start + ttl_micros]
            if rest:
                queues[key] = rest
            else:
                del queues[key]
    if counted:
        keys = sorted(counted)
        cur.execute(
            "INSERT INTO campaign_impressions (campaign_id, ts, count)"
            " SELECT c, to_timestamp(m * 60), n FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS x(c, m, n)"
            " ON CONFLICT (campaign_id, ts) DO UPDATE SET count = campaign_impressions.count + EXCLUDED.count",
            ([k[0] for k in keys], [k[1] for k in keys], [counted[k] for k in keys]),
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
