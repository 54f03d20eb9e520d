"""The flusher's status file: its state and running totals, written by the
flusher after every cycle and read by /health and /metrics in the workers.
The web layer reads the flusher only through this module."""

import json
import os
import time

from counter.kinds.registry import REGISTRY
from counter.shm import segment, worker_counters

STATUS_FILE = "flusher.json"


class StatusFile:
    """The flusher's state and running totals, for /health and /metrics in the
    workers: a small JSON file replaced atomically after every cycle. Totals
    carry over from the previous flusher's file, so they only go up.
    `kinds`: the names of the event kinds flushed (each has a total)."""

    def __init__(self, shm_dir, kinds=REGISTRY.names):
        self.path = os.path.join(str(shm_dir), STATUS_FILE)
        previous = self.read(shm_dir) or {}
        self.written = ("rows",) + tuple(kinds)  # what each flush reports it wrote
        names = ("flushes", "flush_failures") + self.written + ("retired_segments",) + tuple(worker_counters.FIELDS)
        self.totals = {name: int(previous.get("totals", {}).get(name, 0)) for name in names}
        self.state = {"pid": os.getpid(), "started_at": time.time(), "last_flush_at": None,
                      "last_error": None, "last_error_at": None, "unflushed": 0,
                      "last_duration": None, "segments": 0, "live_segments": 0,
                      "totals": self.totals,
                      # live workers' refusals as last read: a counter must not dip
                      "live_rejections": previous.get("live_rejections", {})}

    def flushed(self, result, duration, live_rejections):
        """After a successful cycle. live_rejections: refusals counted by live
        workers (those of gone workers are already in the totals)."""
        for name in self.written:
            self.totals[name] += result[name]
        self.totals["flushes"] += 1
        self.totals["retired_segments"] += result["retired"]
        self.state.update(last_flush_at=time.time(), unflushed=0, last_duration=duration,
                          segments=result["segments"], live_segments=result["live_segments"],
                          live_rejections=live_rejections)
        self._write()

    def committed(self):
        """A part committed in the middle of a flush: say so at most once a
        second (the flush's end writes the file anyway)."""
        now = time.time()
        if now - (self.state["last_flush_at"] or 0) >= 1.0:
            self.state["last_flush_at"] = now
            self._write()

    def failed(self, message, unflushed, live_rejections):
        self.totals["flush_failures"] += 1
        self.state.update(last_error=message, last_error_at=time.time(), unflushed=unflushed,
                          live_rejections=live_rejections)
        self._write()

    def _write(self):
        temporary = self.path + f".{os.getpid()}"
        try:
            with open(temporary, "w") as f:
                json.dump(self.state, f)
            os.replace(temporary, self.path)
        except FileNotFoundError:
            pass  # SHM_DIR was removed: the flusher makes it again next round

    @staticmethod
    def flusher_alive(status) -> bool:
        pid = status.get("pid")
        return bool(pid) and segment.process_start_time(pid) is not None

    @staticmethod
    def database_reachable(status) -> bool:
        """As the flusher last found it: its last flush came after its last error."""
        last_ok, last_error = status.get("last_flush_at"), status.get("last_error_at")
        return last_ok is not None and (last_error is None or last_ok > last_error)

    @staticmethod
    def read(shm_dir):
        try:
            with open(os.path.join(str(shm_dir), STATUS_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
