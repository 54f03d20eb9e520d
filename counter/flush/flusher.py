"""The flusher: moves counts from shared-memory segments into PostgreSQL.

Exactly once (DESIGN invariant 5), in one place:

1. settle: a segment whose PENDING_SEQ is ahead of FLUSHED_SEQ was caught by a
   crash or a failed commit. The database knows whether that sequence was
   committed: if so the pending values become flushed, if not they are dropped.
2. stage: settled segments store the counts of a range of their records as
   PENDING, then set PENDING_SEQ = FLUSHED_SEQ + 1 (see SegmentFile.stage).
3. commit: one transaction adds the staged deltas (count - flushed),
   pre-aggregated per minute and banner, and stores each staged segment's
   PENDING_SEQ.
4. confirm: PENDING becomes FLUSHED in the segments.

A flush is a series of parts (DESIGN invariant 10): steps 2-4 repeat, each
part holding at most `part_rows` rows, until every record the flush began
with is written. Usually that is one part. Each part is exactly-once on its
own: it has its own sequence step. A statement timeout (or a batch the server
cannot take) halves the part size down to `min_part_rows`; the next flush
that needs no halving doubles it again, up to `max_part_rows`.

A crash before 3 commits leaves step 1 to drop the pending values; a crash
after it leaves step 1 to confirm them. Either way no click is lost or added
twice. Only one flusher may work a directory at a time (an flock guards it).

The flusher names no kind of event and no database: it works the segment
files of every kind in its registry (counter/kinds/), each part's records
collected into one batch per kind, and hands them to its store
(counter/storage/store.py), which writes a part in one transaction.
"""

import fcntl
import logging
import os
import random
import signal
import time

from counter.flush.status import StatusFile
from counter.kinds.registry import REGISTRY
from counter.shm import directory, segment, worker_counters
from counter.storage.store import PostgresStore

log = logging.getLogger("counter.flusher")

LOCK_FILE = "flusher.lock"
STALE_TEMPORARY = 60.0  # seconds; a half-made segment file older than this is abandoned

# Rows (records with new clicks, impressions) one flush transaction carries at
# most: 100k distinct rows, a busy flush, still go in one transaction.
MAX_PART_ROWS = 100_000
# The smallest part a statement timeout may shrink a part to: a few
# milliseconds of writing. Failing even at this size is not about size: the
# flusher backs off as in an outage and says so.
MIN_PART_ROWS = 256


class Flusher:
    """store: a PostgresStore (or its URL); kinds: the registry of event kinds
    whose segments it drains; options: what the kinds' writes read
    (dedup_ttl), each kind's default when not given."""

    def __init__(self, shm_dir, store, *, kinds=REGISTRY, fault=None,
                 max_part_rows=MAX_PART_ROWS, **options):
        self.shm_dir = str(shm_dir)
        self.store = PostgresStore(store) if isinstance(store, str) else store
        self.kinds = kinds
        self.options = kinds.options()
        unknown = options.keys() - self.options.keys()
        if unknown:
            raise TypeError(f"no kind reads the options {sorted(unknown)}")
        self.options.update(options)
        self.max_part_rows = max_part_rows
        self.min_part_rows = min(MIN_PART_ROWS, max_part_rows)
        self.part_rows = max_part_rows  # the next part's bound: adapts to timeouts
        # what committed parts and settlements wrote since the last reported
        # flush: a flush that fails after some parts reports them with the next
        self._written = dict.fromkeys(("rows",) + kinds.names, 0)
        # called after every committed part: a long catch-up is progress (health)
        self._on_commit = lambda: None
        self.segments = {}  # path -> a reader (MappedSegment) of its kind
        self.retired_ids = []  # sequence rows to delete in the next transaction
        self._registered = set()  # segment ids whose sequence row exists
        # A fault-injection hook for the crash tests: fault("before_commit") etc.
        self._fault = fault or (lambda point: None)

    # -- one cycle ---------------------------------------------------------

    def flush_once(self) -> dict:
        """Settle, then stage, commit and confirm part by part, then retire.
        Raises on database errors; whatever was staged is then settled by the
        next call."""
        self._refresh()
        try:
            # every cycle, idle or not: an outage is noticed (and /health says
            # so) and the migrations go in before the first click needs them
            self.store.connect()
            self._register()
            self._settle()
            finished = {s.path for s in self.segments.values() if s.finished()}
            self._write_parts()
        except self.store.Error:
            self._drop_connection()
            raise
        removed = self._retire(finished)
        result, self._written = self._written, dict.fromkeys(self._written, 0)
        result.update(segments=len(self.segments), retired=removed,
                      live_segments=len(self.segments) - (len(finished) - removed))
        return result

    def _write_parts(self):
        """Write every record the segments hold now, in parts of at most
        `part_rows` rows, each one transaction with its own sequence steps."""
        ends = {path: seg.words[segment.USED] for path, seg in self.segments.items()}
        cursors = dict.fromkeys(ends, 0)  # where each segment's next range starts
        batch_makers = self._batch_makers()
        halved = False
        while True:
            batches, seqs, staged, stops = self._stage(cursors, ends, self.part_rows, batch_makers)
            retired = list(self.retired_ids)
            if batches or retired:
                try:
                    self._fault("before_commit")
                    self.store.write_part(batches, seqs, retired)
                except self.store.PartTooLarge as exc:
                    self._settle()  # the database says what became of the part
                    self._halve_part(sum(batch.size for batch in batches.values()), exc)
                    halved = True
                    continue  # the same records again, in a smaller part
                self._fault("after_commit")
                self._on_commit()
                for seg in staged:
                    seg.commit_pending()
                del self.retired_ids[: len(retired)]
                for kind, batch in batches.items():
                    batch.committed()
                    self._written["rows"] += batch.rows
                    self._written[kind.name] += batch.events
            cursors.update(stops)
            if all(cursors[path] >= end for path, end in ends.items()):
                break
            self._fault("between_parts")
        if not halved:
            self.part_rows = min(self.max_part_rows, self.part_rows * 2)

    def _halve_part(self, rows, exc):
        """After a part of `rows` rows failed for its size: half of it next,
        or, if it was no larger than the smallest part, the error for run()
        to back off on."""
        message = self.store.describe_error(exc)
        if rows <= self.min_part_rows:
            log.error("a flush part of %d rows (the smallest is %d) failed too; backing off error=%r",
                      rows, self.min_part_rows, message)
            raise exc
        self.part_rows = max(self.min_part_rows, min(self.part_rows, rows) // 2)
        log.warning("flush part of %d rows failed; retrying at once with part_rows=%d error=%r",
                    rows, self.part_rows, message)

    def _register(self):
        """Give every new segment its sequence row (seq 0) in a transaction of
        its own, before anything of it is flushed: the flush transaction then
        updates an existing row, holding its lock until the commit is done --
        which is what lets _settle wait for a commit still in flight."""
        new = [s.id for s in self.segments.values() if s.id not in self._registered]
        if new:
            self.store.register(new)
            self._registered.update(new)

    def _settle(self):
        """Decide every unsettled segment; count what it finds committed in
        the running totals."""
        unsettled = [s for s in self.segments.values() if not s.settled]
        if not unsettled:
            return
        # FOR UPDATE: if our previous connection's COMMIT is still being
        # processed by the server, this waits for it instead of reading the
        # old sequence and dropping values that are about to be committed.
        committed = self.store.committed([s.id for s in unsettled])
        for seg in unsettled:
            if committed.get(seg.id, -1) >= seg.words[segment.PENDING_SEQ]:
                self._written[self.kinds.of(seg).name] += seg.pending_total()
                seg.commit_pending()
                log.info("settled segment=%s outcome=committed", seg.id)
            else:
                seg.discard_pending()
                log.info("settled segment=%s outcome=not_committed", seg.id)

    def _batch_makers(self) -> dict:
        """{kind: what makes its batch of each part} for one flush."""
        return {kind: kind.flush([s for s in self.segments.values() if self.kinds.of(s) is kind],
                                 self.options)
                for kind in self.kinds}

    def _stage(self, cursors, ends, budget, batch_makers=None):
        """Stage the next part: from each segment, the records from its cursor
        on, below its end, at most `budget` rows in all. Returns the batches
        {kind: batch}, in the registry's order, each staged segment's pending
        sequence, the staged segments, and where each segment's next range
        would start if this part is committed."""
        batch_makers = batch_makers or self._batch_makers()
        batches, seqs, staged, stops = {}, {}, [], {}
        for path, seg in self.segments.items():
            start, end = cursors.get(path, 0), ends.get(path, 0)
            if start >= end:
                continue
            if budget <= 0:
                break
            staged_data = seg.stage(start, end, budget)
            if not staged_data:
                stops[path] = end  # nothing new in the whole range
                continue
            stops[path] = seg.words[segment.PENDING_USED]
            budget -= len(staged_data)
            staged.append(seg)
            seqs[seg.id] = seg.words[segment.PENDING_SEQ]
            kind = self.kinds.of(seg)
            if kind not in batches:
                batches[kind] = batch_makers[kind]()
            batches[kind].add(seg, staged_data)
        # one order of kinds in every transaction of every node (no deadlocks)
        batches = {kind: batches[kind] for kind in self.kinds if kind in batches}
        return batches, seqs, staged, stops

    def _retire(self, finished) -> int:
        """Remove segments that can take no more clicks and are fully flushed.
        `finished` was taken before staging, so their counts were final then.
        Invariant 7: retired (sealed, or owner gone), drained, then unlinked:
        the number of files stays bounded."""
        removed = 0
        for path in finished:
            seg = self.segments[path]
            if seg.settled and seg.unflushed() == 0:
                self.retired_ids.append(seg.id)
                self._registered.discard(seg.id)
                seg.unlink_if_mine()  # after a removal the path may name another file
                seg.close()
                del self.segments[path]
                removed += 1
        return removed

    def _refresh(self):
        """Open segment files that appeared; put back removed ones whose owner
        is gone; clean abandoned temporary files. Invariant 6: every file in
        the directory is drained, whoever wrote it and whether or not its
        writer (or the flusher before us) still lives."""
        self._put_back_removed()
        if not os.path.isdir(self.shm_dir):
            return  # removed under us: the next round makes it again (see _relock)
        for kind in self.kinds:
            for path in segment.list_segments(self.shm_dir, kind.segment_kind.suffix):
                if path not in self.segments:
                    try:
                        seg = kind.reader(path)
                    except (ValueError, OSError) as exc:
                        log.error("unreadable segment path=%s error=%s", path, exc)
                        continue
                    if not seg.hold() or seg.moved:
                        # a writer is deciding about it, or republished it
                        # between our open and our hold: not ours (this round)
                        seg.close()
                        continue
                    self.segments[path] = seg
        now = time.time()
        for name in os.listdir(self.shm_dir):
            if name.endswith(".tmp"):
                path = os.path.join(self.shm_dir, name)
                try:
                    if now - os.stat(path).st_mtime > STALE_TEMPORARY:
                        os.unlink(path)
                except FileNotFoundError:
                    pass

    def _put_back_removed(self):
        """Mapped segments whose files were removed (DESIGN invariant 11): one
        that its writer already republished is left (the copy is live); one
        whose owner is gone is republished here, its copy mapped next; one
        with a live owner is drained as usual -- its owner republishes it
        only if this flusher dies first."""
        for path, seg in list(self.segments.items()):
            if not seg.unlinked():
                continue
            if not seg.moved:
                if not seg.owner_gone():
                    continue
                try:
                    directory.note_removal(self.shm_dir, f"flusher {os.getpid()}")
                    seg.put_back(self.shm_dir)
                except OSError as exc:  # e.g. a full tmpfs: drain it here meanwhile
                    log.error("cannot put segment %s back in %s (%s); draining it from "
                              "memory, trying again next round", seg.id, self.shm_dir, exc)
                    continue
                log.warning("segment %s put back in %s", seg.id, self.shm_dir)
            seg.close()
            del self.segments[path]

    def unflushed(self) -> int:
        return sum(s.unflushed() for s in self.segments.values())

    def _rejections(self, totals) -> dict:
        """Workers' refusal (503) counts. A gone worker's file is folded into
        `totals` and removed; the counts of live workers are returned."""
        live = {name: 0 for name in worker_counters.FIELDS}
        if not os.path.isdir(self.shm_dir):
            return live  # removed under us: the next round makes it again
        for path in segment.list_segments(self.shm_dir, worker_counters.STATS.suffix):
            try:
                stats = worker_counters.WorkerStatsFile(path)
            except (ValueError, OSError):
                continue
            try:
                finished = stats.finished()
                for name, value in stats.values().items():
                    if finished:
                        totals[name] += value
                    else:
                        live[name] += value
            finally:
                stats.close()
            if finished:
                os.unlink(path)
        return live

    # -- database connection -------------------------------------------------

    def _drop_connection(self):
        """After a database error: the store connects again when next used."""
        self.store.disconnect()

    def close(self):
        self._drop_connection()
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()

    # -- the loop ------------------------------------------------------------

    def run(self, stop: "StopSignal", interval: float, max_backoff=10.0):
        """Flush every `interval` seconds until `stop` is set; then keep
        flushing until no segment has a live owner (or the stop deadline
        passes). True if it ended with everything flushed. Invariant 9: a
        failed flush leaves the counts in the segments and is retried with
        backoff; the workers never notice."""
        lock = self._lock(stop)
        if lock is None:
            return False
        node = directory.read_node(self.shm_dir)
        status = StatusFile(self.shm_dir, self.kinds.names)
        self._on_commit = status.committed
        failures = 0
        try:
            while True:
                started = time.monotonic()
                stopping = stop.is_set()
                if not self._lock_is_current(lock):
                    lock = self._relock(lock, node)
                    if lock is None:
                        return False
                try:
                    result = self.flush_once()
                except (self.store.Error, OSError) as exc:
                    failures += 1
                    delay = min(interval * 2 ** min(failures, 10), max_backoff)
                    message = self.store.describe_error(exc)
                    unflushed = self.unflushed()  # the database is away: time to spare
                    log.error("flush failed attempt=%d retry_in=%.1fs unflushed=%d error=%r",
                              failures, delay, unflushed, message)
                    status.failed(message, unflushed, self._rejections(status.totals))
                    if stopping:
                        if stop.deadline_passed():
                            log.error("giving up at shutdown; %d clicks stay in %s for the next start",
                                      unflushed, self.shm_dir)
                            return False
                        time.sleep(min(delay, stop.time_left()))
                    else:
                        stop.wait(delay)
                    continue
                if failures:
                    log.info("flush recovered after_failures=%d", failures)
                    failures = 0
                status.flushed(result, time.monotonic() - started,
                               self._rejections(status.totals))
                if stopping:
                    if result["live_segments"] == 0 and not self.retired_ids:
                        log.info("final flush done %s",
                                 " ".join(f"{name}={result[name]}" for name in self.kinds.names))
                        return True
                    if stop.deadline_passed():
                        log.warning("stopping with %d segments still owned by live processes",
                                    result["live_segments"])
                        return True
                    time.sleep(0.05)  # owners are on their way out; flush again
                    continue
                stop.wait(max(0.0, interval - (time.monotonic() - started)))
        finally:
            self.close()
            if lock is not None:
                os.close(lock)

    def _lock_is_current(self, lock) -> bool:
        """False if the directory's lock file is gone or was replaced: the
        directory was removed (and maybe made again) under us."""
        try:
            return os.fstat(lock).st_ino == os.stat(os.path.join(self.shm_dir, LOCK_FILE)).st_ino
        except FileNotFoundError:
            return False

    def _relock(self, old_lock, node):
        """After the directory was removed: make it again with its node file,
        and take the new lock. The segments mapped here are drained as usual
        (see _put_back_removed). Returns the new lock, or None when another
        flusher already has it: then the segments whose owner is gone are put
        back for it, the rest are let go (their owners put them back), and
        this flusher stops."""
        directory.note_removal(self.shm_dir, f"flusher {os.getpid()}")
        directory.restore_node(self.shm_dir, node)
        fd = os.open(os.path.join(self.shm_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.warning("another flusher works the recreated %s; handing over to it", self.shm_dir)
            self._put_back_removed()
            os.close(old_lock)
            return None
        os.close(old_lock)
        return fd

    def _lock(self, stop):
        """Take the directory's flusher lock, waiting while another flusher has it."""
        os.makedirs(self.shm_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.shm_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        waiting_logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._lock_is_current(fd):
                    return fd
                # the directory was removed while we waited: wait on the new lock file
                os.close(fd)
                os.makedirs(self.shm_dir, mode=0o700, exist_ok=True)
                fd = os.open(os.path.join(self.shm_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
            except BlockingIOError:
                if not waiting_logged:
                    log.warning("another flusher works %s; waiting for it", self.shm_dir)
                    waiting_logged = True
                if stop.wait(0.1):
                    os.close(fd)
                    return None


class StopSignal:
    """A stop flag safe to set from a signal handler, with a deadline for the
    final flush. (threading.Event takes a lock in set(), which a handler
    interrupting the same thread's wait() could find held.) With a parent pid
    it also sets itself when that process is no longer our parent."""

    def __init__(self, grace: float, parent_pid=None):
        self.grace = grace
        self.parent_pid = parent_pid
        self._deadline = None

    def set(self):
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace

    def is_set(self) -> bool:
        if self._deadline is None and self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %s is gone; final flush and exit", self.parent_pid)
            self.set()
        return self._deadline is not None

    def wait(self, timeout: float) -> bool:
        until = time.monotonic() + timeout
        while not self.is_set() and time.monotonic() < until:
            time.sleep(min(0.05, max(0.0, until - time.monotonic())))
        return self.is_set()

    def deadline_passed(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def time_left(self) -> float:
        return max(0.0, self._deadline - time.monotonic()) if self._deadline is not None else 0.0


def fault_from_env(spec):
    """Test-only crash points: COUNTER_TEST_FAULT="before_commit:0.1,after_commit:0.1"
    makes the flusher SIGKILL itself at those points with those probabilities
    (points: before_commit and after_commit of each part, between_parts)."""
    if not spec:
        return None
    chances = {}
    for item in spec.split(","):
        point, _, chance = item.strip().partition(":")
        chances[point] = float(chance or 1)

    def fault(where):
        if random.random() < chances.get(where, 0.0):
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def main(settings, parent_pid=None, drain=False) -> int:
    """Run the flusher until SIGTERM/SIGINT (with `drain`: until what the
    directory holds is flushed); the process's exit status."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    stop = StopSignal(settings.graceful_timeout, parent_pid)
    if drain:
        stop.set()  # the final flush at once: it ends when no segment has a live owner
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
    for signum in stop_signals:
        signal.signal(signum, lambda *_: stop.set())
    # the supervisor starts us with these blocked: a stop that came early waits till now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    os.makedirs(settings.shm_dir, mode=0o700, exist_ok=True)
    flusher = Flusher(
        settings.shm_dir, PostgresStore(settings.database_url),
        fault=fault_from_env(os.environ.get("COUNTER_TEST_FAULT")),
        max_part_rows=settings.flush_max_rows, **REGISTRY.options(settings),
    )
    log.info("flusher started pid=%d shm_dir=%s interval=%.2fs",
             os.getpid(), settings.shm_dir, settings.flush_interval)
    ok = flusher.run(stop, settings.flush_interval)
    return 0 if ok else 1
