"""What /health reports: database reachability, the flusher's state, pending clicks."""

import os

from counter import impressions, segment, storage
from counter.flusher import StatusFile


def pending(shm_dir, kind=segment.CLICKS, opener=segment.SegmentFile) -> int:
    """Clicks (or impressions) in shared memory and not yet in the database."""
    total = 0
    for path in segment.list_segments(shm_dir, kind.suffix):
        try:
            seg = opener(path)
        except (OSError, ValueError):  # retired while we looked
            continue
        try:
            total += seg.unflushed()
        finally:
            seg.close()
    return total


def report(database, shm_dir, now: float) -> dict:
    try:
        database.run(storage.ping)
        db = {"reachable": True}
    except storage.DatabaseError as exc:
        db = {"reachable": False, "error": database.describe(exc)}

    status = StatusFile.read(shm_dir) or {}
    pid = status.get("pid")
    alive = bool(pid) and segment.process_start_time(pid) is not None
    last = status.get("last_flush_at")
    flusher = {
        "pid": pid,
        "alive": alive,
        "lag_seconds": round(now - last, 3) if last else None,
        "last_flush_at": last,
        "last_error": status.get("last_error"),
        "last_error_at": status.get("last_error_at"),
    }
    healthy = db["reachable"] and alive
    return {
        "status": "ok" if healthy else "degraded",
        "database": db,
        "flusher": flusher,
        "pending_clicks": pending(shm_dir) if os.path.isdir(shm_dir) else 0,
        "pending_impressions": pending(shm_dir, impressions.IMPRESSIONS, impressions.ImpressionLogFile)
        if os.path.isdir(shm_dir) else 0,
    }
