"""The shared-memory segment: one file in a tmpfs directory, mapped with mmap.

A segment belongs to one worker process and holds the clicks of one minute.
Its words and who writes each (DESIGN invariant 2) are in layout.py, with
the other kinds of files in SHM_DIR.

Publish order (invariant 4): the worker writes a record's banner id first and
only then raises USED; readers never look at or past USED. A new file is
fully initialised under a temporary name and renamed into place, so a reader
never sees a half-written header. (The order of plain stores is kept by x86's
memory model; other architectures would need barriers.)

Owner liveness: the writing process holds a shared flock on its segment for
as long as it may write, and after sealing it until the flusher has drained
it. The flusher knows the owner is gone -- killed, exited, in whatever pid
namespace -- when it can take an exclusive lock. (OWNER_PID and OWNER_START
are reserved: written for people reading a file, never read; see layout.py.)

Unlinked is not gone (invariant 11): a tmp cleaner or systemd-logind's
RemoveIPC may delete the directory while the service runs. The mappings
still hold the counts, so whoever holds a mapping puts the file back: the
flusher holds a record lock (FLUSHER_HOLDS, an open-file-description lock:
no other descriptor's close drops it, and threads contend for it as
processes do) on every file it has mapped; a writer finds its unlinked files at its once-a-second housekeeping
and, once no flusher holds one, republishes it whole -- flusher fields and
all, under the same name -- in the recreated directory (``republish``). The
flusher republishes the unlinked files whose owner is gone. Both sides'
fields travel together, so the exactly-once protocol goes on as if nothing
happened: the sequence row in the database is keyed by the same name.
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
import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import time

from counter.shm.directory import note_removal, process_start_time  # noqa: F401 (re-exported)
from counter.shm.layout import (  # noqa: F401 (the words, as segment.X for its readers)
    BANNER,
    CAPACITY,
    CLICKS,
    COUNT,
    FLUSHED,
    FLUSHED_SEQ,
    HEADER_WORDS,
    MINUTE,
    MOVED,
    OWNER_PID,
    OWNER_START,
    PENDING,
    PENDING_SEQ,
    PENDING_START,
    PENDING_USED,
    SEALED,
    USED,
    Kind,
    file_size,
)

log = logging.getLogger("counter.segment")

HOUSEKEEPING_INTERVAL = 1.0  # seconds between a writer's checks, made off the per-click path
# A byte range (past any file's end) that a flusher read-locks on each file it
# maps: a writer republishes an unlinked file only when nobody holds it.
FLUSHER_HOLDS = (1 << 40, 1)


def _hold(fd, kind, wait=False) -> bool:
    """An open-file-description record lock on FLUSHER_HOLDS: kind is
    fcntl.F_RDLCK (a flusher), F_WRLCK (a writer deciding) or F_UNLCK.
    False when another holder is in the way and `wait` is off."""
    start, length = FLUSHER_HOLDS
    lock = struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, lock)
    except (BlockingIOError, PermissionError):
        return False
    return True

# Files of every kind count toward the memory bound (segment_bytes) but the
# refusal counters' (worker_counters.STATS, a few words per worker): so a new
# kind of events is measured without being named here.
UNMEASURED_SUFFIXES = (".wst",)
_NAME = re.compile(r"^(\d+)-\d+-[0-9a-f]{16}\.\w+$")  # a published file, as create() names it

RECORD_WORDS = CLICKS.record_words
SUFFIX = CLICKS.suffix



def segment_bytes(directory) -> int:
    """Bytes taken by all segment files of a directory (the memory bound's
    measure): published files of any kind but UNMEASURED_SUFFIXES."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if _NAME.match(entry.name) and not entry.name.endswith(UNMEASURED_SUFFIXES):
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
        """No more writes. The file stays mapped and locked until released."""
        self.words[SEALED] = 1

    def release(self):
        """Unmap it and drop the owner's lock (the flusher may retire it then)."""
        self.words.release()
        self._mapping.close()
        os.close(self._fd)

    def unlinked(self) -> bool:
        return os.fstat(self._fd).st_nlink == 0



def create(directory, minute: int, slots: int, kind: Kind = CLICKS) -> Owned:
    """Create, initialise and publish a segment file owned by this process.
    Raises OSError (e.g. ENOSPC when the tmpfs is full), leaving nothing behind."""
    pid = os.getpid()
    name = f"{minute}-{pid}-{secrets.token_hex(8)}{kind.suffix}"

    def fill(words):
        words[OWNER_PID] = pid
        words[OWNER_START] = process_start_time(pid) or 0
        words[MINUTE] = minute
        words[CAPACITY] = slots
        words[0] = kind.magic

    return _publish(directory, name, file_size(slots, kind.record_words), fill)


def republish(owned: Owned, directory) -> Owned:
    """Copy an unlinked segment whole -- both sides' fields, same name -- into
    `directory`, and return the copy (owned by this process, as the old one
    was). The caller makes sure nobody writes the old one meanwhile: it is
    sealed or its owner gone, and no flusher holds it."""
    old = owned.words

    def fill(words):
        words[1:] = old[1:]
        words[0] = old[0]  # the magic last: a reader takes the file only whole

    return _publish(directory, os.path.basename(owned.path), len(old) * 8, fill)


def _publish(directory, name, size, fill) -> Owned:
    """Make a file of `size` bytes under a temporary name, share-lock and map
    it, let `fill` write its words, then rename it to `name`: a reader never
    sees a half-written header. Raises OSError, leaving nothing behind."""
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, "." + name.rsplit(".", 1)[0] + ".tmp")
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
    try:
        fill(owned.words)
        os.rename(temporary, final)
    except BaseException:
        owned.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return owned


class Writer:
    """What a worker-side writer of any kind holds: its current segment
    (`_segment`, with `path` and `_words`), the sealed ones it keeps mapped
    until the flusher has drained them, and the bounds it works within.

    Subclasses call ``_tick(now)`` off their per-record path at least once a
    second (see SegmentWriter.add) and say how much of a segment is unflushed.
    """

    kind = CLICKS

    def __init__(self, directory, slots: int, max_bytes: int, clock=time.time):
        self.directory = str(directory)
        self.slots = slots
        self.max_bytes = max_bytes
        self.clock = clock
        self.path = None
        self._segment = None
        self._words = None
        self._sealed = []  # sealed segments, kept mapped until drained (invariant 11)
        self._housekeeping_at = 0.0

    def _create(self, minute: int, kind: Kind):
        """A new segment of `kind` owned by this process, or None when the
        memory bound (SHM_MAX_BYTES over all segment files) or the tmpfs
        leaves no room for it. Invariant 8: None becomes a 503 with
        Retry-After (web/app.py); nothing is dropped silently."""
        for _ in range(2):
            try:
                if segment_bytes(self.directory) + file_size(self.slots, kind.record_words) > self.max_bytes:
                    return None
                return create(self.directory, minute, self.slots, kind)
            except FileNotFoundError:  # the directory was removed: make it, try once more
                note_removal(self.directory, f"worker {os.getpid()}")
            except OSError:
                return None
        return None

    def _switch_to(self, segment: "Owned"):
        """Seal the current segment (if any) and make `segment` current."""
        self._seal_current()
        self._segment, self.path, self._words = segment, segment.path, segment.words

    def _seal_current(self):
        """No more writes to the current segment; the flusher drains it once
        more and removes it. It stays mapped until then."""
        if self._segment is not None:
            self._segment.seal()
            self._sealed.append(self._segment)
            self._segment = self.path = self._words = None

    def _tick(self, now: float):
        """Housekeeping, at most once a second: notice that the current
        segment's file was removed (then seal it, so that the next record
        starts a new file in the recreated directory), and look after the
        sealed ones."""
        if now < self._housekeeping_at:
            return
        self._housekeeping_at = now + HOUSEKEEPING_INTERVAL
        if self._segment is not None and self._segment.unlinked():
            note_removal(self.directory, f"worker {os.getpid()}")
            self._seal_current()
        self._sealed = [kept for owned in self._sealed
                        for kept in [self._look_after(owned)] if kept is not None]

    def tick(self):
        """Housekeeping now, if due: for a worker that gets no records to
        write (an idle one), called from its server's loop."""
        self._tick(self.clock())

    def _look_after(self, owned: Owned):
        """A sealed segment once more: released when drained, republished
        when its file was removed and no flusher has it mapped. Returns what
        is to be kept (the segment, its copy) or None."""
        # held while deciding: no flusher may take the file up meanwhile
        if not _hold(owned._fd, fcntl.F_WRLCK):
            return owned  # a flusher has it mapped: it drains it
        w = owned.words
        if w[PENDING_SEQ] == w[FLUSHED_SEQ] and self._unflushed(w) == 0:
            owned.release()
            return None
        if not owned.unlinked():
            _hold(owned._fd, fcntl.F_UNLCK)
            return owned  # the flusher has not taken it up yet
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            copy = republish(owned, self.directory)
        except OSError as exc:
            log.error("cannot put segment %s back in %s (%s); trying again",
                      os.path.basename(owned.path), self.directory, exc)
            _hold(owned._fd, fcntl.F_UNLCK)
            return owned
        w[MOVED] = 1  # a flusher that opened the old file meanwhile leaves it
        owned.release()
        log.warning("segment %s put back in %s", os.path.basename(copy.path), self.directory)
        return copy

    def _unflushed(self, words) -> int:
        """Records (clicks, impressions) counted in `words` and not yet flushed."""
        raise NotImplementedError

    def adopt(self, orphan: "Writer"):
        """Take over the segments of a writer whose thread is gone (see
        counter/thread_writers.py): its current one is sealed, and all of them
        are looked after by this writer's housekeeping until drained. Only
        the adopting thread touches `orphan` from now on."""
        orphan._seal_current()
        self._sealed.extend(orphan._sealed)
        orphan._sealed = []

    def close(self):
        """At exit: seal the current segment, put back what was removed, and
        let go of everything (the flusher drains and removes the files)."""
        self._seal_current()
        self._housekeeping_at = 0.0
        self._tick(self.clock())
        for owned in self._sealed:
            owned.release()
        self._sealed = []


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
        self._check_at = 0.0  # the minute's end, or the next housekeeping if sooner
        self._retry_at = 0.0  # while out of memory, when to look again

    def add(self, banner_id: int) -> bool:
        """Count one click now; False when it cannot be stored (memory bound).
        Invariant 1: a clock read, a dict lookup, one add into our own mapping."""
        now = self.clock()
        if not self._minute_start <= now < self._check_at:
            if not self._next(now):
                return False
        word = self._index.get(banner_id)
        if word is None:
            word = self._publish(banner_id, now)
            if word is None:
                return False
        self._words[word] += 1
        return True

    def _next(self, now) -> bool:
        """Off the per-click path: housekeeping, then a new segment if the
        minute is over or the current one was sealed."""
        self._tick(now)
        if self._segment is not None and self._minute_start <= now < self._minute_end:
            self._check_at = min(self._minute_end, self._housekeeping_at)
            return True
        return self._start_segment(now)

    def _publish(self, banner_id, now):
        if self._used == self.slots and not self._start_segment(now):
            return None
        first = HEADER_WORDS + RECORD_WORDS * self._used
        self._words[first + BANNER] = banner_id
        self._used += 1
        self._words[USED] = self._used  # publish only after the record is written (invariant 4)
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
                self._seal_current()  # its minute is over; nothing may count into it now
                self._reset()
            return False
        self._switch_to(segment)
        self._reset()
        self._minute_start = minute * 60.0
        self._minute_end = self._minute_start + 60.0
        self._check_at = min(self._minute_end, self._housekeeping_at)
        return True

    def _seal_current(self):
        super()._seal_current()
        self._reset()

    def _reset(self):
        self._index = {}
        self._used = 0
        self._minute_start = self._minute_end = self._check_at = 0.0

    def _unflushed(self, words) -> int:
        return unflushed_clicks(words)


def _column(field: int, start: int, stop: int) -> slice:
    """The words of a click segment's `field` in records [start, stop): a
    strided slice of the word view (see SegmentFile)."""
    first = HEADER_WORDS + field
    return slice(first + RECORD_WORDS * start, first + RECORD_WORDS * stop, RECORD_WORDS)


def _total(words, field: int, start: int, stop: int) -> int:
    return sum(words[_column(field, start, stop)].tolist())


def unflushed_clicks(words) -> int:
    """Clicks counted in a click segment's words and not yet flushed."""
    used = words[USED]
    return _total(words, COUNT, 0, used) - _total(words, FLUSHED, 0, used)


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
        """True once nothing more can arrive: sealed, or its owner is gone."""
        return bool(self.words[SEALED]) or self.owner_gone()

    def owner_gone(self) -> bool:
        """True once no process holds the owner's shared lock (the exclusive
        one can be had). It is then kept: nobody can own the file again."""
        if self._owner_gone:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._owner_gone = True
        return True

    def hold(self) -> bool:
        """Tell writers this flusher has the file mapped (see FLUSHER_HOLDS).
        False while a writer is deciding whether to republish it (try again
        next round). Check ``moved`` afterwards."""
        return _hold(self._fd, fcntl.F_RDLCK)

    @property
    def moved(self) -> bool:
        """Republished elsewhere (by its writer, before this flusher held it):
        the copy is the live file, this one must be left."""
        return bool(self.words[MOVED])

    def unlink_if_mine(self):
        """Remove the file at `path` only if it is this very file (after a
        removal, the path may name a copy)."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def unlinked(self) -> bool:
        return os.fstat(self._fd).st_nlink == 0

    def put_back(self, directory):
        """Republish this unlinked file, whose owner is gone, in `directory`;
        the caller closes this one and maps the copy."""
        republish(self, directory).release()  # the copy has no owner, as this one had none
        self.words[MOVED] = 1

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

    def stage(self, start=0, end=None, limit=None):
        """Record the current counts of records [start, stop) as pending;
        return the deltas {banner_id: count - flushed} of those with new clicks
        (invariant 3: counts only go up; the flusher writes deltas, resets nothing).

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
        counts = w[_column(COUNT, start, stop)].tolist()
        flushed = w[_column(FLUSHED, start, stop)].tolist()
        banners = w[_column(BANNER, start, stop)].tolist()
        deltas = {banner: count - done
                  for banner, count, done in zip(banners, counts, flushed) if count != done}
        if limit is not None and len(deltas) > limit:  # a backlog: cut the range short
            changed = [i for i, (count, done) in enumerate(zip(counts, flushed)) if count != done]
            kept = changed[limit - 1] + 1
            stop = start + kept
            del counts[kept:], flushed[kept:], banners[kept:]
            deltas = {banner: count - done
                      for banner, count, done in zip(banners, counts, flushed) if count != done}
        w[_column(PENDING, start, stop)] = array.array("q", counts)
        if deltas:
            w[PENDING_START] = start
            w[PENDING_USED] = stop
            w[PENDING_SEQ] = w[FLUSHED_SEQ] + 1
        return deltas

    def _pending_range(self):
        return self.words[PENDING_START], self.words[PENDING_USED]

    def pending_total(self) -> int:
        """Clicks staged as pending and not yet flushed."""
        start, stop = self._pending_range()
        return _total(self.words, PENDING, start, stop) - _total(self.words, FLUSHED, start, stop)

    def commit_pending(self):
        """The pending values are in the database: make them the flushed ones."""
        w = self.words
        start, stop = self._pending_range()
        w[_column(FLUSHED, start, stop)] = w[_column(PENDING, start, stop)]
        w[FLUSHED_SEQ] = w[PENDING_SEQ]

    def unflushed(self) -> int:
        """Clicks counted here and not yet flushed (for health and the final drain)."""
        return unflushed_clicks(self.words)


def list_segments(directory, suffix=SUFFIX):
    """Paths of the published segment files of a kind, oldest minute first
    (files not named the way create() names them are left alone)."""
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and name.endswith(suffix):
            found.append((int(match[1]), name))
    return [os.path.join(directory, name) for _, name in sorted(found)]
