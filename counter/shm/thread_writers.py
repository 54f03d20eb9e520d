"""Counting on several threads of one process (granian): a click segment
writer per thread, since one writer per field means one thread per segment
(DESIGN invariant 2, "One writer means one thread").

granian runs the WSGI app on a pool of blocking threads per worker,
DB_WAITERS_PER_WORKER + 1 of them, so that clicks keep a thread while that
many requests wait on the database (invariant 12). Each thread counts into a
SegmentWriter of its own, found through a ``threading.local``: granian
attaches each of its threads to Python once, for the thread's whole life
(its blocking.rs: ``Python::attach`` around the thread's task loop), so the
local lives exactly as long as the thread. Thread idents are no key: a new
thread gets a dead one's ident back; its local starts empty.

granian retires a pool thread idle for --blocking-threads-idle-timeout (30 s
by default; the first thread stays). The writer it leaves behind is adopted at
the next housekeeping (once a second, off the per-click path) of any live
thread's writer: one whose native thread id is gone from /proc/self/task has
its current segment sealed, and its segments are looked after until drained,
so files do not pile up.

Impressions and refusal counters are not the click path: the threads share
the worker's log and counters and write them one at a time (OneAtATime).
"""

import os
import threading

from counter.shm import segment

TASKS = "/proc/self/task"  # one entry per live thread of this process, by native id


class ThreadWriters:
    """``add(banner_id) -> bool``: count a click into the calling thread's
    own writer (made on the thread's first click)."""

    def __init__(self, directory, slots: int, max_bytes: int):
        self._args = (directory, slots, max_bytes)
        self._lock = threading.Lock()  # for _owners: rare (a new thread, housekeeping)
        self._owners = {}  # writer -> native id of the thread that writes it
        local = threading.local()

        def add(banner_id):
            try:  # free in 3.11 when nothing is raised
                own = local.add
            except AttributeError:
                own = local.add = self._new_writer().add
            return own(banner_id)

        self.add = add

    def _new_writer(self):
        writer = _ThreadWriter(self, *self._args)
        with self._lock:
            self._owners[writer] = threading.get_native_id()
        return writer

    def orphans(self) -> list:
        """Writers whose thread is gone; each is handed out once."""
        live = {int(tid) for tid in os.listdir(TASKS)}
        with self._lock:
            gone = [writer for writer, tid in self._owners.items() if tid not in live]
            for writer in gone:
                del self._owners[writer]
        return gone

    def writers(self) -> list:
        with self._lock:
            return list(self._owners)


class _ThreadWriter(segment.SegmentWriter):
    """A thread's writer; its housekeeping also adopts the writers of threads
    that are gone."""

    def __init__(self, family: ThreadWriters, directory, slots: int, max_bytes: int):
        super().__init__(directory, slots, max_bytes)
        self._family = family

    def _tick(self, now: float):
        if now >= self._housekeeping_at:
            for orphan in self._family.orphans():
                self.adopt(orphan)
        super()._tick(now)


class OneAtATime:
    """A writer shared by the threads of a process, called by one of them at
    a time (the impression log, the refusal counters)."""

    def __init__(self, target):
        self._target = target
        self._lock = threading.Lock()

    def __getattr__(self, name):
        method = getattr(self._target, name)
        lock = self._lock

        def locked(*args, **kwargs):
            with lock:
                return method(*args, **kwargs)

        return locked
