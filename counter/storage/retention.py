"""Retention: removing minute rows and closed dedup windows older than a cutoff."""

import datetime

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
