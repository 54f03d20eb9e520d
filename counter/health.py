"""What /health reports, read from the flusher's status file: no database
call and no scan of shared memory on a thread that also serves clicks."""

from counter.flusher import StatusFile


def report(shm_dir, now: float) -> dict:
    status = StatusFile.read(shm_dir) or {}
    alive = StatusFile.flusher_alive(status)
    reachable = StatusFile.database_reachable(status)
    last_ok, last_error = status.get("last_flush_at"), status.get("last_error_at")
    database = {"reachable": reachable}
    if not reachable and status.get("last_error"):
        database["error"] = status["last_error"]
    return {
        "status": "ok" if alive and reachable else "degraded",
        "database": database,
        "flusher": {
            "pid": status.get("pid"),
            "alive": alive,
            "lag_seconds": round(now - last_ok, 3) if last_ok else None,
            "last_flush_at": last_ok,
            "last_error": status.get("last_error"),
            "last_error_at": last_error,
        },
        # clicks and impressions in shared memory, not yet in the database, as
        # the flusher last counted them (0 after a successful flush)
        "pending": status.get("unflushed", 0),
    }
