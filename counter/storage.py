"""PostgreSQL: connections, migrations, the flush transaction, and stats queries."""

import datetime
import importlib.resources
import io
import math
import re
import secrets
import uuid

import psycopg2
import psycopg2.errors

# Any fixed number; every node takes this advisory lock while migrating.
_MIGRATION_LOCK = 0x636C6B73  # "clks"

GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}

DatabaseError = psycopg2.Error


def redact(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(password=)\S+", r"\1***", url)


def describe_error(exc: BaseException, url: str = "") -> str:
    """One line about a database error, never holding the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if url:
        text = text.replace(url, redact(url))
    return redact(text)


def connect(url: str, application_name: str = "click-counter", statement_timeout_ms=None):
    """A connection that gives up on a dead or silent server in seconds, not
    minutes: connect timeout, TCP keepalives and a TCP user timeout."""
    options = {}
    if statement_timeout_ms:
        options["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return psycopg2.connect(
        url, connect_timeout=5, application_name=application_name,
        keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
        tcp_user_timeout=30_000, **options,
    )


def close_quietly(conn):
    """Close a connection that may already be broken."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def _migrations():
    folder = importlib.resources.files("counter") / "migrations"
    found = []
    for item in folder.iterdir():
        match = re.match(r"^(\d{4})_(\w+)\.sql$", item.name)
        if match:
            found.append((int(match[1]), match[2], item.read_text()))
    return sorted(found)


def migrate(conn) -> list:
    """Apply the migrations this database lacks; return the names applied.

    One transaction under an advisory lock, so several nodes may run it at
    once: the first applies, the others wait and then find nothing to do.
    """
    applied = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
        for version, name, sql in _migrations():
            if version not in done:
                cur.execute(sql)
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied.append(f"{version:04d}_{name}")
    return applied


def migration_status(conn) -> list:
    """[(version, name, applied_at or None)] for every known migration."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        rows = {}
        if cur.fetchone()[0]:
            cur.execute("SELECT version, applied_at FROM schema_migrations")
            rows = dict(cur.fetchall())
    return [(v, n, rows.get(v)) for v, n, _ in _migrations()]


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


def floor_time(ts: datetime.datetime, granularity: str) -> datetime.datetime:
    step = GRANULARITIES[granularity]
    seconds = math.floor(ts.timestamp())
    return datetime.datetime.fromtimestamp(seconds - seconds % step, datetime.timezone.utc)


def ceil_time(ts: datetime.datetime, granularity: str) -> datetime.datetime:
    floor = floor_time(ts, granularity)
    if floor == ts:
        return floor
    return floor + datetime.timedelta(seconds=GRANULARITIES[granularity])


def bucket_count(start: datetime.datetime, end: datetime.datetime, granularity: str) -> int:
    """How many buckets overlap [start, end)."""
    span = ceil_time(end, granularity) - floor_time(start, granularity)
    return int(span.total_seconds()) // GRANULARITIES[granularity]


def click_stats(conn, banner_id: int, start, end, granularity: str):
    """[(bucket start, clicks)] of the buckets overlapping [start, end) that
    have clicks, oldest first. A bucket that overlaps is counted whole."""
    where, args = _range_filter(start, end, granularity, ())
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT date_trunc(%s, ts, 'UTC') AS bucket, sum(count)::bigint"
            f" FROM clicks WHERE banner_id = %s AND {where}"
            " GROUP BY bucket ORDER BY bucket",
            [granularity, banner_id] + args,
        )
        return cur.fetchall()


def _range_filter(start, end, granularity, banner_ids):
    """SQL condition and arguments for the minute rows of the buckets that
    overlap [start, end), optionally of some banners only."""
    sql = "ts >= %s AND ts < %s"
    args = [floor_time(start, granularity), ceil_time(end, granularity)]
    if banner_ids:
        sql += " AND banner_id = ANY(%s)"
        args.append(sorted(set(banner_ids)))
    return sql, args


def _export_query(start, end, granularity, banner_ids):
    """SQL and arguments of the export's (banner_id, bucket, clicks) rows, unordered."""
    where, args = _range_filter(start, end, granularity, banner_ids)
    if granularity == "minute":  # rows are already one per (banner, minute)
        return f"SELECT banner_id, ts AS bucket, count FROM clicks WHERE {where}", args
    return (f"SELECT banner_id, date_trunc(%s, ts, 'UTC') AS bucket, sum(count)::bigint"
            f" FROM clicks WHERE {where} GROUP BY banner_id, bucket", [granularity] + args)


def export_rows(conn, start, end, granularity, banner_ids=(), batch=20_000):
    """Yield (banner_id, bucket start, clicks) ordered by banner then time,
    streamed through a server-side cursor so memory stays flat."""
    sql, args = _export_query(start, end, granularity, banner_ids)
    with conn:
        with conn.cursor(name="counter_export") as cur:
            cur.itersize = batch
            cur.execute(sql + " ORDER BY banner_id, bucket", args)
            yield from cur


def export_size(conn, start, end, granularity, banner_ids=()) -> int:
    """How many rows export_rows will yield (for a progress bar)."""
    sql, args = _export_query(start, end, granularity, banner_ids)
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM ({sql}) AS exported", args)
        return cur.fetchone()[0]


def top_banners(conn, start, end, limit):
    """[(banner_id, clicks)] of the most clicked banners in the minutes
    overlapping [start, end), most clicked first."""
    where, args = _range_filter(start, end, "minute", ())
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT banner_id, sum(count)::bigint AS clicks FROM clicks WHERE {where}"
                    " GROUP BY banner_id ORDER BY clicks DESC, banner_id LIMIT %s", args + [limit])
        return cur.fetchall()


# -- campaigns ---------------------------------------------------------------------

def create_campaign(conn, campaign_id, name, start_time):
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO campaigns (id, name, start_time) VALUES (%s, %s, %s)"
                    " RETURNING id::text, name, start_time", (str(campaign_id), name, start_time))
        return cur.fetchone()


def get_campaign(conn, campaign_id):
    """(id, name, start_time) or None."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, name, start_time FROM campaigns WHERE id = %s", (str(campaign_id),))
        return cur.fetchone()


def list_campaigns(conn):
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, name, start_time FROM campaigns ORDER BY start_time, id")
        return cur.fetchall()


def campaign_stats(conn, campaign_id):
    """(last_hour, last_day, total) unique impressions: the current minute and
    the 59 (1439) minutes before it, and everything."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(count) FILTER (WHERE ts >= date_trunc('minute', now()) - interval '59 minutes'), 0)::bigint,"
            " coalesce(sum(count) FILTER (WHERE ts >= date_trunc('minute', now()) - interval '1439 minutes'), 0)::bigint,"
            " coalesce(sum(count), 0)::bigint FROM campaign_impressions WHERE campaign_id = %s",
            (str(campaign_id),))
        return cur.fetchone()


def database_id(conn) -> str:
    """This database's identity: a UUID made once and kept in it. Many URLs
    may name one database; this names it for good."""
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO service_secrets (name, value) VALUES ('database_id', %s)"
                    " ON CONFLICT (name) DO NOTHING", (str(uuid.uuid4()).encode(),))
        cur.execute("SELECT value FROM service_secrets WHERE name = 'database_id'")
        return bytes(cur.fetchone()[0]).decode()


def user_hash_key(conn) -> bytes:
    """The key for hashing user ids: made once, kept in the database, so every
    node and restart hashes a user the same way."""
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO service_secrets (name, value) VALUES ('user_hash_key', %s)"
                    " ON CONFLICT (name) DO NOTHING", (psycopg2.Binary(secrets.token_bytes(32)),))
        cur.execute("SELECT value FROM service_secrets WHERE name = 'user_hash_key'")
        return bytes(cur.fetchone()[0])


# A closed dedup window is kept this long after it closed: an impression
# stamped inside it that reaches the database later (a lagging or restarted
# node) must still find it, or it would count.
WINDOW_KEPT_AFTER_CLOSING = datetime.timedelta(days=1)
_PRUNE_BATCH = 10_000


def prune(conn, before, dedup_ttl, dry_run=False):
    """Delete click and campaign minute rows older than `before`, and the dedup
    windows that closed before it, at least WINDOW_KEPT_AFTER_CLOSING ago
    (retention). A window closes `dedup_ttl` seconds after its start.
    Returns {table: rows}; with dry_run, counts them only."""
    counted = {}
    with conn, conn.cursor() as cur:
        for table in ("clicks", "campaign_impressions"):
            if dry_run:
                cur.execute(f"SELECT count(*) FROM {table} WHERE ts < %s", (before,))
                counted[table] = cur.fetchone()[0]
            else:
                cur.execute(f"DELETE FROM {table} WHERE ts < %s", (before,))
                counted[table] = cur.rowcount
    closed = "window_start + %(ttl)s * interval '1 second' <= least(%(before)s, now() - %(kept)s)"
    args = {"ttl": dedup_ttl, "before": before, "kept": WINDOW_KEPT_AFTER_CLOSING, "batch": _PRUNE_BATCH}
    if dry_run:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM impression_windows WHERE {closed}", args)
            counted["impression_windows"] = cur.fetchone()[0]
        return counted
    # In short batches that skip rows the flusher holds: it re-opens closed
    # windows of returning users, and must neither wait long nor deadlock.
    counted["impression_windows"] = 0
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(
                "DELETE FROM impression_windows WHERE (campaign_id, user_hash) IN ("
                f" SELECT campaign_id, user_hash FROM impression_windows WHERE {closed}"
                " ORDER BY campaign_id, user_hash LIMIT %(batch)s FOR UPDATE SKIP LOCKED)", args)
            deleted = cur.rowcount
        counted["impression_windows"] += deleted
        if deleted < _PRUNE_BATCH:
            return counted
