"""The shared-memory segment: one file in a tmpfs directory, mapped with mmap.

A segment belongs to one worker process and holds the clicks of one minute.
Every field has exactly one writer (DESIGN invariant 2):

    header (16 x int64)                     writer
      0 MAGIC                               creator, before the file is visible
      1 OWNER_PID, 2 OWNER_START            creator
      3 MINUTE (unix time // 60)            creator
      4 CAPACITY (records)                  creator
      5 USED (published records)            worker
      6 SEALED (1 = worker is done)         worker
      7 FLUSHED_SEQ, 8 PENDING_SEQ          flusher
      9 PENDING_USED                        flusher
     10 (impression logs: FLUSHED_USED, see impressions.py)
     11 PENDING_START                       flusher
    record i (4 x int64) at word 16 + 4*i
      BANNER, COUNT                         worker
      FLUSHED, PENDING                      flusher

Publish order (invariant 4): the worker writes a record's banner id first and
only then raises USED; readers never look at or past USED. A new file is
fully initialised under a temporary name and renamed into place, so a reader
never sees a half-written header. (The order of plain stores is kept by x86's
memory model; other architectures would need barriers.)

Owner liveness: the writing process holds a shared flock on its segment for
as long as it may write. The flusher knows the owner is gone -- killed,
exited, in whatever pid namespace -- when it can take an exclusive lock.
A file's memory is allocated when it is made (posix_fallocate), so a full
tmpfs is a clean "no room" (503), never a SIGBUS on a later write.

The flusher stages a range of records, [PENDING_START, PENDING_USED), one
part of a flush (DESIGN invariant 10); PENDING_SEQ says the range is pending.
PENDING_START 0 is a range from the first record: files from before ranges
(the word always 0) read as whole-segment stages, which is what they were.

Counts only go up (invariant 3); space comes back by retiring whole files.
All values are aligned 8-byte words written through ``memoryview.cast('q')``,
so a reader sees either the old or the new value, never a torn one.
"""

import array
import collections
import fcntl
import mmap
import os
import re
import secrets
import time

HEADER_WORDS = 16

# A kind of segment file: its magic number, file suffix and record size.
Kind = collections.namedtuple("Kind", "magic suffix record_words")
CLICKS = Kind(0x31474553_4B434C43, ".seg", 4)  # "CLCKSEG1" in little-endian bytes
SUFFIXES = (CLICKS.suffix, ".imp")  # every kind's suffix (impressions.py adds the second)

RECORD_WORDS = CLICKS.record_words
SUFFIX = CLICKS.suffix

# header words
OWNER_PID, OWNER_START, MINUTE, CAPACITY, USED, SEALED = 1, 2, 3, 4, 5, 6
FLUSHED_SEQ, PENDING_SEQ, PENDING_USED = 7, 8, 9
PENDING_START = 11
# record words, relative to the record's first word
BANNER, COUNT, FLUSHED, PENDING = 0, 1, 2, 3


def file_size(slots: int, record_words: int = RECORD_WORDS) -> int:
    return 8 * (HEADER_WORDS + record_words * slots)


def process_start_time(pid: int):
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if
    there is no such process. With the pid it names one process for good, even
    after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def segment_bytes(directory) -> int:
    """Bytes taken by all segment files of a directory (the memory bound's measure)."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(SUFFIXES):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:  # retired meanwhile
                    pass
    return total


class Owned:
    """A segment this process writes: mapped, and share-locked while open."""

    def __init__(self, path, fd, mapping):
        self.path = path
        self._fd = fd
        self._mapping = mapping
        self.words = memoryview(mapping).cast("q")

    def seal(self):
        """No more writes: mark it sealed, unmap it, drop the owner's lock."""
        self.words[SEALED] = 1
        self.words.release()
        self._mapping.close()
        os.close(self._fd)


def create(directory, minute: int, slots: int, kind: Kind = CLICKS) -> Owned:
    """Create, initialise and publish a segment file owned by this process.
    Raises OSError (e.g. ENOSPC when the tmpfs is full), leaving nothing behind."""
    pid = os.getpid()
    name = f"{minute}-{pid}-{secrets.token_hex(8)}"
    final = os.path.join(directory, name + kind.suffix)
    temporary = os.path.join(directory, "." + name + ".tmp")
    size = file_size(slots, kind.record_words)
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    owned = Owned(final, fd, mapping)
    words = owned.words
    words[OWNER_PID] = pid
    words[OWNER_START] = process_start_time(pid) or 0
    words[MINUTE] = minute
    words[CAPACITY] = slots
    words[0] = kind.magic
    os.rename(temporary, final)
    return owned


class Writer:
    """What a worker-side writer of any kind holds: its current segment
    (`_segment`, with `path` and `_words`) and the bounds it works within."""

    def __init__(self, directory, slots: int, max_bytes: int, clock=time.time):
        self.directory = str(directory)
        self.slots = slots
        self.max_bytes = max_bytes
        self.clock = clock
        self.path = None
        self._segment = None
        self._words = None

    def _create(self, minute: int, kind: Kind):
        """A new segment of `kind` owned by this process, or None when the
        memory bound (SHM_MAX_BYTES over all segment files) or the tmpfs
        leaves no room for it."""
        try:
            if segment_bytes(self.directory) + file_size(self.slots, kind.record_words) > self.max_bytes:
                return None
            return create(self.directory, minute, self.slots, kind)
        except OSError:
            return None

    def _switch_to(self, segment: "Owned"):
        """Seal the current segment (if any) and make `segment` current."""
        self.close()
        self._segment, self.path, self._words = segment, segment.path, segment.words

    def close(self):
        """Seal the current segment: the flusher drains it once more and removes it."""
        if self._segment is not None:
            self._segment.seal()
            self._segment = self.path = self._words = None


class SegmentWriter(Writer):
    """The worker side: counts clicks into this process's current segment.

    Only the owning worker's single thread may call ``add`` (one writer per
    field; ``words[i] += 1`` is a read, an add and a store, not atomic).
    """

    def __init__(self, directory, slots: int, max_bytes: int, clock=time.time):
        super().__init__(directory, slots, max_bytes, clock)
        self._index = {}  # banner id -> word index of its count
        self._used = 0
        self._minute_start = 0.0
        self._minute_end = 0.0  # the current segment counts clicks in [start, end)
        self._retry_at = 0.0  # while out of memory, when to look again

    def add(self, banner_id: int) -> bool:
        """Count one click now; False when it cannot be stored (memory bound)."""
        now = self.clock()
        if not self._minute_start <= now < self._minute_end:
            if not self._start_segment(now):
                return False
        word = self._index.get(banner_id)
        if word is None:
            word = self._publish(banner_id, now)
            if word is None:
                return False
        self._words[word] += 1
        return True

    def _publish(self, banner_id, now):
        if self._used == self.slots and not self._start_segment(now):
            return None
        first = HEADER_WORDS + RECORD_WORDS * self._used
        self._words[first + BANNER] = banner_id
        self._used += 1
        self._words[USED] = self._used  # publish only after the record is written
        self._index[banner_id] = first + COUNT
        return first + COUNT

    def _start_segment(self, now) -> bool:
        """Seal the current segment and open a fresh one for now's minute.

        Fails (and keeps the current one) when the memory bound leaves no room.
        """
        minute = int(now // 60)
        retry = time.monotonic()
        if retry < self._retry_at:
            return False
        segment = self._create(minute, CLICKS)
        if segment is None:
            self._retry_at = retry + 0.25
            if self._words is not None and self._words[MINUTE] != minute:
                self.close()  # its minute is over; nothing may count into it now
            return False
        self._switch_to(segment)
        self._index = {}
        self._used = 0
        self._minute_start = minute * 60.0
        self._minute_end = self._minute_start + 60.0
        return True

    def close(self):
        super().close()
        self._index = {}
        self._minute_start = self._minute_end = 0.0


class MappedSegment:
    """The flusher side of a segment file of any kind: the owner's fields are
    read, the flusher's own written. Subclasses say how to stage and confirm."""

    kind = CLICKS

    def __init__(self, path):
        self.path = path
        self.id = os.path.basename(path)[: -len(self.kind.suffix)]
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._mapping = mmap.mmap(self._fd, 0)
        except (OSError, ValueError):
            os.close(self._fd)
            raise ValueError(f"{path} cannot be mapped")
        self.words = memoryview(self._mapping).cast("q")
        w = self.words
        if (len(w) < HEADER_WORDS or w[0] != self.kind.magic or not 0 <= w[USED] <= w[CAPACITY]
                or len(w) < HEADER_WORDS + self.kind.record_words * w[CAPACITY]):
            self.close()
            raise ValueError(f"{path} is not a click-counter {self.kind.suffix} segment")
        self.minute = self.words[MINUTE]
        self._owner_gone = False

    def close(self):
        self.words.release()
        self._mapping.close()
        os.close(self._fd)

    def finished(self) -> bool:
        """True once nothing more can arrive: sealed, or its owner is gone
        (its shared lock is released: the exclusive one can be had)."""
        if self.words[SEALED] or self._owner_gone:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._owner_gone = True  # kept locked: nobody can own it again
        return True

    @property
    def settled(self) -> bool:
        return self.words[PENDING_SEQ] == self.words[FLUSHED_SEQ]

    def discard_pending(self):
        """The pending values never reached the database: forget them."""
        self.words[PENDING_SEQ] = self.words[FLUSHED_SEQ]


class SegmentFile(MappedSegment):
    """The flusher side of a click segment.

    Each record field is read or written as one column: a strided slice of
    the word view (``_column``). Reading a column with ``tolist`` loads every
    word whole, just as indexing does, at a fraction of the cost of a Python
    loop over 100,000 records.
    """

    def _column(self, field: int, start: int, stop: int) -> slice:
        """The words of `field` in records [start, stop)."""
        first = HEADER_WORDS + field
        return slice(first + RECORD_WORDS * start, first + RECORD_WORDS * stop, RECORD_WORDS)

    def stage(self, start=0, end=None, limit=None):
        """Record the current counts of records [start, stop) as pending;
        return the deltas {banner_id: count - flushed} of those with new clicks.

        The range ends at `end` (default: USED), or before it, right after the
        `limit`-th record with new clicks (one part's worth). If there are new
        clicks, the range goes into PENDING_START and PENDING_USED and
        PENDING_SEQ is left one ahead of FLUSHED_SEQ. The pending values and
        the range are written before PENDING_SEQ, so a crash in between leaves
        the segment settled (nothing pending) and loses nothing.
        """
        w = self.words
        stop = w[USED] if end is None else end
        # One read of each count: the same snapshot becomes pending and gives the delta.
        counts = w[self._column(COUNT, start, stop)].tolist()
        flushed = w[self._column(FLUSHED, start, stop)].tolist()
        banners = w[self._column(BANNER, start, stop)].tolist()
        deltas = {banner: count - done
                  for banner, count, done in zip(banners, counts, flushed) if count != done}
        if limit is not None and len(deltas) > limit:  # a backlog: cut the range short
            changed = [i for i, (count, done) in enumerate(zip(counts, flushed)) if count != done]
            kept = changed[limit - 1] + 1
            stop = start + kept
            del counts[kept:], flushed[kept:], banners[kept:]
            deltas = {banner: count - done
                      for banner, count, done in zip(banners, counts, flushed) if count != done}
        w[self._column(PENDING, start, stop)] = array.array("q", counts)
        if deltas:
            w[PENDING_START] = start
            w[PENDING_USED] = stop
            w[PENDING_SEQ] = w[FLUSHED_SEQ] + 1
        return deltas

    def _total(self, field: int, start: int, stop: int) -> int:
        return sum(self.words[self._column(field, start, stop)].tolist())

    def _pending_range(self):
        return self.words[PENDING_START], self.words[PENDING_USED]

    def pending_total(self) -> int:
        """Clicks staged as pending and not yet flushed."""
        start, stop = self._pending_range()
        return self._total(PENDING, start, stop) - self._total(FLUSHED, start, stop)

    def commit_pending(self):
        """The pending values are in the database: make them the flushed ones."""
        w = self.words
        start, stop = self._pending_range()
        w[self._column(FLUSHED, start, stop)] = w[self._column(PENDING, start, stop)]
        w[FLUSHED_SEQ] = w[PENDING_SEQ]

    def unflushed(self) -> int:
        """Clicks counted here and not yet flushed (for health and the final drain)."""
        used = self.words[USED]
        return self._total(COUNT, 0, used) - self._total(FLUSHED, 0, used)


_NAME = re.compile(r"^(\d+)-\d+-[0-9a-f]{16}\.\w+$")


def list_segments(directory, suffix=SUFFIX):
    """Paths of the published segment files of a kind, oldest minute first
    (files not named the way create() names them are left alone)."""
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and name.endswith(suffix):
            found.append((int(match[1]), name))
    return [os.path.join(directory, name) for _, name in sorted(found)]
