"""Event kinds are one registry: a kind the flusher has never heard of --
defined here, in what would be its own module -- is drained exactly once by
the unchanged Flusher into a table of its own, and counted in the memory
bound, because nothing below the registry names a kind."""

import pytest
from conftest import clicks_by_banner, query

from counter import config
from counter.flush.flusher import Flusher
from counter.kinds.base import Batch, EventKind, Registry
from counter.kinds.registry import CLICKS, IMPRESSIONS, REGISTRY
from counter.shm import segment
from counter.shm.segment import SegmentWriter

NOW = 1_700_000_000.0

# -- a third kind: "likes" of items, counted per item and minute --------------------------
# (its module would hold exactly this; its migration is the CREATE TABLE below)

LIKES = segment.Kind(0x31474F4C_454B494C, ".lik", 2)  # "LIKELOG1"
FLUSHED_USED = 10  # the flushed watermark, as in impression logs
LIKES_TABLE = ("CREATE TABLE likes (item_id bigint, ts timestamptz, count bigint NOT NULL,"
               " PRIMARY KEY (item_id, ts))")


class LikeLog(segment.Writer):
    """Worker side: appends (item id, minute) records."""

    def __init__(self, directory, slots, max_bytes, clock):
        super().__init__(directory, slots, max_bytes, clock)
        self._used = 0

    def append(self, item_id) -> bool:
        now = self.clock()
        self._tick(now)
        if self._words is None or self._used == self.slots:
            log = self._create(int(now // 60), LIKES)
            if log is None:
                return False
            self._switch_to(log)
            self._used = 0
        first = segment.HEADER_WORDS + LIKES.record_words * self._used
        self._words[first], self._words[first + 1] = item_id, int(now // 60)
        self._used += 1
        self._words[segment.USED] = self._used  # publish after the record
        return True

    def _unflushed(self, words):
        return words[segment.USED] - words[FLUSHED_USED]


class LikeLogFile(segment.MappedSegment):
    """Flusher side: stages [FLUSHED_USED, end) as pending, one part's worth."""

    kind = LIKES

    def stage(self, start=0, end=None, limit=None):
        w = self.words
        start = max(start, w[FLUSHED_USED])
        stop = w[segment.USED] if end is None else end
        if limit is not None:
            stop = min(stop, start + limit)
        first = segment.HEADER_WORDS + LIKES.record_words * start
        records = list(zip(w[first:first + 2 * (stop - start):2].tolist(),
                           w[first + 1:first + 2 * (stop - start):2].tolist()))
        if records:
            w[segment.PENDING_USED] = stop
            w[segment.PENDING_SEQ] = w[segment.FLUSHED_SEQ] + 1
        return records

    def pending_total(self):
        return self.words[segment.PENDING_USED] - self.words[FLUSHED_USED]

    def commit_pending(self):
        self.words[FLUSHED_USED] = self.words[segment.PENDING_USED]
        self.words[segment.FLUSHED_SEQ] = self.words[segment.PENDING_SEQ]

    def unflushed(self):
        return self.words[segment.USED] - self.words[FLUSHED_USED]


class LikeBatch(Batch):
    def __init__(self, options):
        super().__init__(options)
        self.records = []

    def add(self, seg, staged):
        self.records.extend(staged)

    @property
    def size(self):
        return len(self.records)


class Likes(EventKind):
    name = "likes"
    title = "Likes"
    flushed_help = "Likes written to PostgreSQL."
    segment_kind = LIKES
    writer = LikeLog
    reader = LikeLogFile
    files = "logs"
    slots = "impression_slots"
    Batch = LikeBatch

    def write(self, cur, batch):
        counts = {}
        for key in batch.records:
            counts[key] = counts.get(key, 0) + 1
        keys = sorted(counts)
        cur.execute(
            "INSERT INTO likes (item_id, ts, count)"
            " SELECT i, to_timestamp(m * 60), n FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])"
            " AS x(i, m, n) ON CONFLICT (item_id, ts) DO UPDATE SET count = likes.count + EXCLUDED.count",
            ([k[0] for k in keys], [k[1] for k in keys], [counts[k] for k in keys]))


LIKES_KIND = Likes()
KINDS = Registry(CLICKS, IMPRESSIONS, LIKES_KIND)  # its registration

# -------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at(point):
    def fault(where):
        if where == point:
            raise Crash(where)
    return fault


def likes_by_item(url):
    return dict(query(url, "SELECT item_id, sum(count)::bigint FROM likes GROUP BY item_id"))


@pytest.mark.parametrize("max_part_rows", [100_000, 7])
def test_a_kind_the_flusher_never_named_is_drained_exactly_once(shm, database_url, max_part_rows):
    query(database_url, LIKES_TABLE)
    likes = LIKES_KIND.writer(shm, 64, 1 << 22, clock=lambda: NOW)
    clicks = SegmentWriter(shm, 64, 1 << 22, clock=lambda: NOW)
    for item in [1, 1, 2, 3, 3, 3]:
        assert likes.append(item)
        assert clicks.add(item + 100)
    # a flusher that dies right after its first commit, then the next one
    with pytest.raises(Crash):
        Flusher(shm, database_url, kinds=KINDS, max_part_rows=max_part_rows,
                fault=crash_at("after_commit")).flush_once()
    for item in [2, 4]:  # more, while no flusher runs
        assert likes.append(item)
    f = Flusher(shm, database_url, kinds=KINDS, max_part_rows=max_part_rows)
    result = f.flush_once()
    f.flush_once()
    assert likes_by_item(database_url) == {1: 2, 2: 2, 3: 3, 4: 1}
    assert clicks_by_banner(database_url) == {101: 2, 102: 1, 103: 3}
    assert (result["likes"], result["clicks"]) == (8, 6)  # the settled part counts too
    likes.close()  # sealed: drained once more, then retired like any segment
    clicks.close()
    f.flush_once()
    assert segment.list_segments(shm, LIKES.suffix) == []
    assert likes_by_item(database_url) == {1: 2, 2: 2, 3: 3, 4: 1}
    f.close()


def test_a_new_kinds_files_count_toward_the_memory_bound(shm, monkeypatch):
    likes = LIKES_KIND.writer(shm, 64, 1 << 22, clock=lambda: NOW)
    assert likes.append(1)
    assert segment.segment_bytes(shm) == segment.file_size(64, LIKES.record_words)
    likes.close()
    fields = {"segment_slots": 64, "impression_slots": 64}
    before = config.bytes_per_worker(fields, threads=3)
    monkeypatch.setattr(config, "REGISTRY", KINDS)
    assert config.bytes_per_worker(fields, threads=3) == before + 2 * segment.file_size(64, 2)


def test_the_registry_refuses_two_kinds_with_one_suffix_or_name():
    class Clone(Likes):
        name = "clicks"

    with pytest.raises(ValueError, match="clashes"):
        Registry(CLICKS, Clone())
    assert REGISTRY.names == ("clicks", "impressions")
