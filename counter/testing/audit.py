"""Comparing what the load was told (acknowledged clicks) with what the
database holds: per banner and per minute."""

import psycopg2


def stored_clicks(url, banners=None):
    """({banner: clicks}, {(banner, minute): clicks}) from the database."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 0")  # the fault suite may set a tiny one
            cur.execute("SELECT banner_id, extract(epoch FROM ts)::bigint / 60, count FROM clicks")
            rows = cur.fetchall()
    finally:
        conn.close()
    by_banner, by_minute = {}, {}
    for banner, minute, count in rows:
        if banners is None or banner in banners:
            by_banner[banner] = by_banner.get(banner, 0) + count
            by_minute[banner, minute] = count
    return by_banner, by_minute


def compare(tally, by_banner, by_minute):
    """lost: acknowledged clicks missing; duplicated: stored clicks beyond the
    acknowledged ones and those whose answer never came (the only ones the
    server may have counted without the client knowing); minute_mismatches:
    (banner, minute) rows outside what the round-trip times allow."""
    lost = duplicated = 0
    for banner in set(tally.acked) | set(by_banner) | set(tally.unanswered_by):
        acked, stored = tally.acked.get(banner, 0), by_banner.get(banner, 0)
        lost += max(0, acked - stored)
        duplicated += max(0, stored - acked - tally.unanswered_by.get(banner, 0))
    mismatches = []
    for (banner, minute), certain in tally.by_minute.items():
        row = by_minute.get((banner, minute), 0)
        slack = tally.straddling.get(banner, 0) + tally.unanswered_by.get(banner, 0)
        if not certain <= row <= certain + slack:
            mismatches.append((banner, minute, certain, row))
    return {"acknowledged": tally.total, "stored": sum(by_banner.values()), "lost": lost,
            "duplicated": duplicated, "unanswered": tally.unanswered,
            "minute_mismatches": len(mismatches)}
