"""Impression logs: the shared-memory segment kind for campaign impressions.

Where a click segment keeps counters, an impression log appends records,
because deduplication needs each impression's user and time:

    header: layout.py's table; PENDING_USED is the pending watermark and
            FLUSHED_USED the flushed one (both written by the flusher only)
    record i (5 x int64) at word 16 + 5*i, written by the worker:
      campaign id (UUID, two words), user hash (two words), time (microseconds)

The worker writes a whole record, then raises USED (publish order). The
flusher's protocol is the one of click segments: stage [FLUSHED_USED,
PENDING_USED) -- up to USED, or one part's worth -- as pending with
PENDING_SEQ = FLUSHED_SEQ + 1, commit, confirm. The campaign
and user hash are kept as raw bytes: a user id never reaches shared memory or
the database in clear.
"""

import hashlib
import hmac
import time
import uuid

from counter.shm import segment
from counter.shm.layout import FLUSHED_USED, IMPRESSIONS  # noqa: F401 (impressions.X for readers)


def user_hash(key: bytes, user_id: str) -> bytes:
    """A keyed hash of a user id (16 bytes): stable per key, not reversible."""
    return hmac.new(key, user_id.encode(), hashlib.sha256).digest()[:16]


def _words(raw: bytes):
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)


def _raw(high: int, low: int) -> bytes:
    return high.to_bytes(8, "little", signed=True) + low.to_bytes(8, "little", signed=True)


class ImpressionLog(segment.Writer):
    """The worker side: appends impressions to this process's current log."""

    def __init__(self, directory, slots: int, max_bytes: int, clock=time.time):
        super().__init__(directory, slots, max_bytes, clock)
        self._used = 0

    def append(self, campaign_id: uuid.UUID, hashed_user: bytes) -> bool:
        """Record one impression now; False when it cannot be stored (memory bound)."""
        now = self.clock()
        self._tick(now)
        if self._words is None or self._used == self.slots:
            if not self._start_log(now):
                return False
        first = segment.HEADER_WORDS + IMPRESSIONS.record_words * self._used
        w = self._words
        w[first], w[first + 1] = _words(campaign_id.bytes)
        w[first + 2], w[first + 3] = _words(hashed_user)
        w[first + 4] = int(now * 1_000_000)
        self._used += 1
        w[segment.USED] = self._used  # publish only after the record is written
        return True

    def _start_log(self, now) -> bool:
        log = self._create(int(now // 60), IMPRESSIONS)
        if log is None:
            return False
        self._switch_to(log)
        self._used = 0
        return True

    def _seal_current(self):
        super()._seal_current()
        self._used = 0

    def _unflushed(self, words) -> int:
        return words[segment.USED] - words[FLUSHED_USED]


class ImpressionLogFile(segment.MappedSegment):
    """The flusher side of an impression log."""

    kind = IMPRESSIONS

    def stage(self, start=0, end=None, limit=None):
        """Mark unflushed records pending, from FLUSHED_USED (or `start`, if
        later) to `end` (default: USED), at most `limit` of them (one part's
        worth); return them as
        [(impression id, campaign UUID, user hash, time in microseconds)]."""
        w = self.words
        start = max(start, w[FLUSHED_USED])  # those before are in the database
        used = w[segment.USED] if end is None else end
        if limit is not None:
            used = min(used, start + limit)
        records = []
        for i in range(start, used):
            first = segment.HEADER_WORDS + IMPRESSIONS.record_words * i
            records.append((
                self._impression_id(i),
                uuid.UUID(bytes=_raw(w[first], w[first + 1])),
                _raw(w[first + 2], w[first + 3]),
                w[first + 4],
            ))
        if records:
            w[segment.PENDING_USED] = used
            w[segment.PENDING_SEQ] = w[segment.FLUSHED_SEQ] + 1
        return records

    def _impression_id(self, index: int) -> int:
        """A 63-bit id naming one impression for good: which impression opened
        a dedup window is recorded by it."""
        digest = hashlib.blake2b(f"{self.id}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def pending_total(self) -> int:
        return self.words[segment.PENDING_USED] - self.words[FLUSHED_USED]

    def commit_pending(self):
        self.words[FLUSHED_USED] = self.words[segment.PENDING_USED]
        self.words[segment.FLUSHED_SEQ] = self.words[segment.PENDING_SEQ]

    def unflushed(self) -> int:
        return self.words[segment.USED] - self.words[FLUSHED_USED]
