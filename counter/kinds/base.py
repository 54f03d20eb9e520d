"""What every kind of counted event provides, and the registry of them.

A kind (clicks, impressions, ...) is everything the service knows of one
sort of event between the request and PostgreSQL:

- its segment files (``segment_kind``: magic, suffix, record words), with the
  worker-side ``writer`` (a segment.Writer) and the flusher-side ``reader``
  (a segment.MappedSegment whose ``stage`` returns one part's records);
- how much shared memory a worker's writers of it may hold (``slots``,
  ``per_thread``: the memory bound, config.bytes_per_worker);
- its ``name`` in the flusher's totals, status file and metrics;
- a ``Batch`` that collects a part's staged records, and ``write``, which
  puts a batch into PostgreSQL inside the flush transaction.

The flusher, the memory bound, /health and /metrics loop over a Registry of
kinds; none of them names a kind. A kind module imports shm and nothing of
storage: ``write`` gets a DB-API cursor from counter.storage (psycopg2's
types stay there) and runs plain SQL on it.
"""

from counter.shm import segment, thread_writers


class Batch:
    """One flush part's records of one kind, collected from every segment of
    the kind staged for that part. Written in one transaction with the other
    kinds' batches and the segments' sequence steps, or not at all."""

    def __init__(self, options):
        self.options = options  # the flusher's kind options (e.g. dedup_ttl)

    def add(self, seg, staged):
        """Take what ``seg.stage`` returned (never empty)."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        """Records in it: what a part's bound (FLUSH_MAX_ROWS) counts."""
        raise NotImplementedError

    @property
    def events(self) -> int:
        """Events it adds to its kind's total (status file, metrics)."""
        return self.size

    @property
    def rows(self) -> int:
        """(banner, minute) rows it writes: the "rows" total. Only clicks have them."""
        return 0

    def committed(self):
        """It is in the database: later parts of the same flush may build on that."""


class EventKind:
    """One kind of counted event; subclasses fill in the class attributes."""

    name = ""  # its total's name in the status file and metrics: "clicks"
    title = ""  # for metric help texts: "Clicks"
    flushed_help = ""  # what click_counter_<name>_flushed counts
    segment_kind = None  # its files: a segment.Kind
    writer = None  # worker side: a segment.Writer subclass (directory, slots, max_bytes)
    reader = None  # flusher side: a segment.MappedSegment subclass (path)
    files = "segments"  # what its files are called in messages: "two logs of ..."
    slots = ""  # the Settings field that sizes one of its files
    per_thread = False  # True: one writer per serving thread (else one per worker)
    options = {}  # flusher options its write reads, with their defaults
    Batch = Batch

    def flush(self, segments, options):
        """What makes one flush's batches, a new one per part. `segments`:
        the flusher's mapped files of this kind as the flush begins."""
        return lambda: self.Batch(options)

    def write(self, cur, batch):
        """Write `batch` with `cur`, a cursor inside the flush transaction
        (DB-API, plus ``copy_new``: see counter/storage/flush_writes.py)."""
        raise NotImplementedError

    def open_writer(self, settings, threads: int = 1):
        """The worker's writer of this kind. A kind not written per thread is
        shared by `threads` threads, one call at a time."""
        writer = self.writer(settings.shm_dir, getattr(settings, self.slots), settings.shm_max_bytes)
        return thread_writers.OneAtATime(writer) if threads > 1 else writer

    def bytes_per_worker(self, slots: int, threads: int = 1) -> int:
        """Shared memory one worker's writers of this kind may hold: at a
        minute change (or when one is full) a writer briefly has two files,
        the sealed one until the flusher has drained it."""
        return 2 * (threads if self.per_thread else 1) * segment.file_size(slots, self.segment_kind.record_words)

    def __repr__(self):
        return f"<event kind {self.name}>"


class Registry:
    """The kinds a service counts, in a fixed order: the order in which the
    flush transaction writes them (one order everywhere, so flushers of
    several nodes never deadlock on each other's rows)."""

    def __init__(self, *kinds: EventKind):
        self.kinds = tuple(kinds)
        self._by_suffix = {}
        for kind in kinds:
            same = [k for k in self.kinds if k is not kind and (
                k.name == kind.name or k.segment_kind.suffix == kind.segment_kind.suffix
                or k.segment_kind.magic == kind.segment_kind.magic)]
            if same:
                raise ValueError(f"{kind!r} clashes with {same[0]!r} (name, suffix or magic)")
            self._by_suffix[kind.segment_kind.suffix] = kind

    def __iter__(self):
        return iter(self.kinds)

    def __getitem__(self, name: str) -> EventKind:
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise KeyError(name)

    @property
    def names(self) -> tuple:
        return tuple(kind.name for kind in self.kinds)

    def of(self, seg) -> EventKind:
        """The kind of a mapped segment (a reader)."""
        return self._by_suffix[seg.kind.suffix]

    def options(self, settings=None) -> dict:
        """The options the kinds' writes read: their defaults, or the values
        of the same-named settings."""
        found = {}
        for kind in self.kinds:
            for name, default in kind.options.items():
                found[name] = default if settings is None else getattr(settings, name)
        return found
