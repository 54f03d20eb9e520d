"""Per-worker counters that are not clicks: requests refused for lack of
memory (503). One small file per worker in SHM_DIR, written only by its
worker (on the refusal path, never on a counted click), read by the flusher,
which keeps the totals of workers that are gone."""

from counter import segment

STATS = segment.Kind(0x31535457_4B434C43, ".wst", 0)  # "CLKWTS1"
REJECTED_CLICKS, REJECTED_IMPRESSIONS = 11, 12  # header words (worker-written)
FIELDS = {"rejected_clicks": REJECTED_CLICKS, "rejected_impressions": REJECTED_IMPRESSIONS}


class WorkerStats:
    """The worker side; the file is made on the first refusal."""

    def __init__(self, directory):
        self.directory = str(directory)
        self._file = None

    def add(self, word: int):
        if self._file is None:
            try:
                self._file = segment.create(self.directory, 0, 0, STATS)
            except OSError:
                return  # no room even for this: the 503 itself still goes out
        self._file.words[word] += 1

    def close(self):
        if self._file is not None:
            self._file.seal()
            self._file = None


class WorkerStatsFile(segment.MappedSegment):
    kind = STATS

    def values(self) -> dict:
        return {name: self.words[word] for name, word in FIELDS.items()}
