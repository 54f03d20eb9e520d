"""What /health reports. It must not lie (DESIGN invariant 13): `degraded`
whenever counting is not fully working -- the database unreachable, no
flusher alive and committing, or clicks being refused.

The flusher's state comes from its status file; `pending` is read from the
segments at the time of asking (a scan of their used records, about a
millisecond for a node's default segments: see tests/test_health.py). No
database call here: this runs on a thread that also serves clicks.
"""

from counter.flush.status import StatusFile
from counter.kinds.registry import REGISTRY
from counter.shm import directory, segment, worker_counters

REFUSALS_RECENT = 10.0  # seconds: a refusal this recent makes the node degraded
MIN_STALL = 5.0  # seconds: the shortest flush lag that counts as a stalled flusher


def stall_after(flush_interval: float) -> float:
    """The flush lag past which the flusher counts as stalled."""
    return max(5 * flush_interval, MIN_STALL)


def pending(shm_dir) -> int:
    """Clicks and impressions in shared memory that are not yet in the database."""
    total = 0
    for kind in REGISTRY:
        for path in segment.list_segments(shm_dir, kind.segment_kind.suffix):
            try:
                seg = kind.reader(path)
            except (ValueError, OSError):
                continue  # retired meanwhile, or not ours
            try:
                total += seg.unflushed()
            finally:
                seg.close()
    return total


def report(shm_dir, now: float, flush_interval: float) -> dict:
    status = StatusFile.read(shm_dir) or {}
    alive = StatusFile.flusher_alive(status)
    reachable = StatusFile.database_reachable(status)
    last_ok, last_error = status.get("last_flush_at"), status.get("last_error_at")
    lag = round(now - last_ok, 3) if last_ok else None
    stalled = lag is None or lag > stall_after(flush_interval)
    last_refusal = worker_counters.last_refusal(shm_dir)
    refusing = now - last_refusal < REFUSALS_RECENT

    problems = []
    if not alive:
        problems.append("no flusher process is running")
    elif stalled and reachable:
        problems.append(f"the flusher has not committed for over {stall_after(flush_interval):g}s")
    if not reachable:
        problems.append("the database is unreachable")
    if refusing:
        problems.append(f"clicks were refused (503) in the last {REFUSALS_RECENT:g}s: shared memory is full")

    database = {"reachable": reachable}
    if not reachable and status.get("last_error"):
        database["error"] = status["last_error"]
    return {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "database": database,
        "flusher": {
            "pid": status.get("pid"),
            "alive": alive,
            "lag_seconds": lag,
            "stalled": stalled,
            "last_flush_at": last_ok,
            "last_error": status.get("last_error"),
            "last_error_at": last_error,
        },
        # clicks and impressions in shared memory, not yet in the database, now
        "pending": pending(shm_dir),
        "refusals": {"last_at": last_refusal or None, "recent": refusing},
        "shm": {"dir": str(shm_dir), "recreated_at": directory.recreated_at(shm_dir)},
    }
