"""Per-worker counters that are not clicks: requests refused for lack of
memory (503), and when the last one was. One small file per worker in
SHM_DIR, written only by its worker (on the refusal path, never on a counted
click), read by the flusher (which keeps the totals of workers that are
gone) and by /health (clicks refused in the last seconds mean degraded)."""

import logging
import os
import time

from counter.shm import layout, segment

log = logging.getLogger("counter.worker_stats")

STATS = layout.WORKER_COUNTERS
assert STATS.suffix in segment.UNMEASURED_SUFFIXES  # outside the memory bound
# header words, all written by the worker (layout.py)
REJECTED_CLICKS, REJECTED_IMPRESSIONS, LAST_REFUSAL_AT = (
    layout.REJECTED_CLICKS, layout.REJECTED_IMPRESSIONS, layout.LAST_REFUSAL_AT)
FIELDS = {"rejected_clicks": REJECTED_CLICKS, "rejected_impressions": REJECTED_IMPRESSIONS}
LOG_EVERY = 10.0  # seconds: at most one log line per worker about refusals


class WorkerStats:
    """The worker side; the file is made on the first refusal."""

    def __init__(self, directory, clock=time.time):
        self.directory = str(directory)
        self.clock = clock
        self._file = None
        self._refused_since_log = 0
        self._logged_at = float("-inf")

    def add(self, word: int):
        """Count one refusal (REJECTED_CLICKS or REJECTED_IMPRESSIONS)."""
        now = self.clock()
        self._count(word, now)
        self._refused_since_log += 1
        if now - self._logged_at >= LOG_EVERY:
            log.warning("refused %d requests with 503 in the last %.0fs: shared memory is full "
                        "(SHM_MAX_BYTES, or the tmpfs of %s); clicks are taken again once the "
                        "flusher has drained it", self._refused_since_log,
                        min(now - self._logged_at, LOG_EVERY), self.directory)
            self._logged_at, self._refused_since_log = now, 0

    def _count(self, word, now):
        try:
            if self._file is None:
                self._file = segment.create(self.directory, 0, 0, STATS)
            elif self._file.unlinked():  # the directory was removed: put the counts back
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                old, self._file = self._file, segment.republish(self._file, self.directory)
                old.release()
        except OSError:
            return  # no room even for this: the 503 itself still goes out
        self._file.words[word] += 1
        self._file.words[LAST_REFUSAL_AT] = int(now)

    def close(self):
        if self._file is not None:
            self._file.seal()
            self._file.release()
            self._file = None


class WorkerStatsFile(segment.MappedSegment):
    kind = STATS

    def values(self) -> dict:
        return {name: self.words[word] for name, word in FIELDS.items()}


def last_refusal(directory) -> int:
    """Unix time of the latest refusal any worker of `directory` made (0: none)."""
    latest = 0
    for path in segment.list_segments(directory, STATS.suffix):
        try:
            stats = WorkerStatsFile(path)
        except (ValueError, OSError):
            continue
        try:
            latest = max(latest, stats.words[LAST_REFUSAL_AT])
        finally:
            stats.close()
    return latest

