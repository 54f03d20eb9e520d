"""Read side: click statistics, exports, top banners and campaigns."""

import datetime
import math

GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}


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
            "SELECT"
            " coalesce(sum(count) FILTER (WHERE ts >= date_trunc('minute', now()) - interval '59 minutes'), 0)::bigint,"
            " coalesce(sum(count) FILTER (WHERE ts >= date_trunc('minute', now()) - interval '1439 minutes'),"
            " 0)::bigint,"
            " coalesce(sum(count), 0)::bigint FROM campaign_impressions WHERE campaign_id = %s",
            (str(campaign_id),))
        return cur.fetchone()
