"""The clicks kind: banner clicks counted per minute into click segments
(counter/shm/segment.py), written as minute rows of `clicks` with upserts
that add deltas (DESIGN "Storage"), or by COPY for a minute's new rows."""

import datetime
import functools

from counter.kinds.base import Batch, EventKind
from counter.shm import segment, thread_writers


def _array(values: list) -> str:
    # A Postgres array literal: far cheaper to build and parse than one
    # bound parameter per element. (A list's repr is the fastest way to
    # render many ints; the array parser ignores the spaces.)
    assert isinstance(values, list)  # a tuple's repr differs: (5,)
    return "{" + repr(values)[1:-1] + "}"


def _add_to_rows(cur, minute, banners, counts):
    """Upsert one minute's rows: add each count to its row, making missing rows."""
    # The minute is a single parameter; only banner ids and counts travel as arrays.
    cur.execute(
        "INSERT INTO clicks (banner_id, ts, count)"
        " SELECT b, to_timestamp(%s::bigint * 60), c"
        " FROM unnest(%s::bigint[], %s::bigint[]) AS u(b, c)"
        " ON CONFLICT (banner_id, ts) DO UPDATE SET count = clicks.count + EXCLUDED.count",
        (minute, _array(banners), _array(counts)),
    )


def _copy_text(minute, banners, counts) -> str:
    """One minute's rows in COPY's text format."""
    ts = datetime.datetime.fromtimestamp(minute * 60, datetime.timezone.utc).isoformat()
    return "".join([f"{banner}\t{ts}\t{count}\n" for banner, count in zip(banners, counts)])


def _insert_new_rows(cur, minute, banners, counts) -> bool:
    """Insert one minute's rows by COPY, for a minute whose rows are likely all
    new (its first flush). COPY is a bulk insert, two to three times faster
    than the upsert, but it cannot add to a row that exists: if one does
    (another node or an earlier flusher wrote it), nothing is written and
    False returned, for the upsert to do it. (So it is when the transaction
    has used up its bulk inserts: see flush_writes.FlushCursor.)"""
    return cur.copy_new("COPY clicks (banner_id, ts, count) FROM STDIN",
                        functools.partial(_copy_text, minute, banners, counts))


class _Flush:
    """One flush of the click segments. A minute's first flush makes its
    rows: they go in by bulk insert. Across parts, a minute stays new for
    the banners no earlier part of the flush wrote."""

    def __init__(self, segments):
        # minutes with rows in the database already, as far as the segments
        # tell: a click segment with a committed flush wrote rows of its minute
        written = {s.minute for s in segments if s.words[segment.FLUSHED_SEQ]}
        self.fresh = {s.minute for s in segments} - written
        self.written_banners = {}  # fresh minute -> banners earlier parts wrote


class ClickBatch(Batch):
    """A part's click deltas, pre-aggregated: {minute: {banner_id: delta}}."""

    def __init__(self, flush: _Flush):
        self._flush = flush
        self.deltas = {}

    def add(self, seg, staged):
        if seg.minute not in self.deltas:
            self.deltas[seg.minute] = staged
        else:  # another worker's segment of the same minute
            deltas = self.deltas[seg.minute]
            for banner_id, delta in staged.items():
                deltas[banner_id] = deltas.get(banner_id, 0) + delta

    @property
    def size(self) -> int:
        return sum(map(len, self.deltas.values()))

    rows = size

    @property
    def events(self) -> int:
        return sum(sum(deltas.values()) for deltas in self.deltas.values())

    def new_minutes(self) -> set:
        """Minutes of which no click row has been written yet, as far as this
        flusher knows: their rows go in by COPY."""
        fresh, written = self._flush.fresh, self._flush.written_banners
        return {m for m in self.deltas if m in fresh and (
            m not in written or written[m].isdisjoint(self.deltas[m]))}

    def committed(self):
        for minute in self.deltas.keys() & self._flush.fresh:
            self._flush.written_banners.setdefault(minute, set()).update(self.deltas[minute])


class Clicks(EventKind):
    name = "clicks"
    title = "Clicks"
    flushed_help = "Clicks written to PostgreSQL."
    segment_kind = segment.CLICKS
    writer = segment.SegmentWriter
    reader = segment.SegmentFile
    slots = "segment_slots"
    per_thread = True  # the click path touches only its own thread's segment
    Batch = ClickBatch

    def flush(self, segments, options):
        state = _Flush(segments)
        return lambda: ClickBatch(state)

    def write(self, cur, batch):
        """Rows in a fixed order (minute, then banner), so concurrent flushers
        of several nodes never deadlock on each other's rows."""
        new_minutes = batch.new_minutes()
        for minute in sorted(batch.deltas):
            deltas = batch.deltas[minute]
            banners = sorted(deltas)
            counts = list(map(deltas.__getitem__, banners))
            if minute in new_minutes and _insert_new_rows(cur, minute, banners, counts):
                continue
            _add_to_rows(cur, minute, banners, counts)

    def open_writer(self, settings, threads: int = 1):
        if threads > 1:  # granian: a segment writer per thread
            return thread_writers.ThreadWriters(settings.shm_dir, settings.segment_slots,
                                                settings.shm_max_bytes)
        return segment.SegmentWriter(settings.shm_dir, settings.segment_slots, settings.shm_max_bytes)


KIND = Clicks()
