"""The file format of everything in SHM_DIR, in one place.

Every file is a header of 16 little-endian int64 words, then fixed-size
records. Every word has exactly one writer (DESIGN invariant 2):

  word  click segment (.seg)     impression log (.imp)   worker counters (.wst)  writer
     0  MAGIC "CLCKSEG1"         MAGIC "CIMPLOG1"        MAGIC "CLCKWTS1"        creator, before the file is visible
     1  OWNER_PID   (reserved)   same                    same                    creator
     2  OWNER_START (reserved)   same                    same                    creator
     3  MINUTE (unix time // 60) same                    -                       creator
     4  CAPACITY (records)       same                    0                       creator
     5  USED (published records) same                    -                       worker
     6  SEALED (1 = done)        same                    -                       worker
     7  FLUSHED_SEQ              same                    -                       flusher
     8  PENDING_SEQ              same                    -                       flusher
     9  PENDING_USED             same (pending mark)     -                       flusher
    10  -                        FLUSHED_USED            -                       flusher
    11  PENDING_START            -                       REJECTED_CLICKS         flusher / worker (.wst)
    12  -                        -                       REJECTED_IMPRESSIONS    worker
    13  -                        -                       LAST_REFUSAL_AT         worker
    14  -                        -                       -                       (free)
    15  MOVED (1 = republished)  same                    -                       whoever republished it

  records (click segment, 4 words): BANNER, COUNT (worker); FLUSHED, PENDING (flusher)
  records (impression log, 5 words): campaign UUID (2), user hash (2), time in µs (worker)

OWNER_PID and OWNER_START are reserved: written for people reading a file,
never read by the service. Whether a file's owner lives is decided by its
flock (segment.py, "Owner liveness"); the words stay so that files written by
earlier versions keep their layout and stay readable.

A word is a 64-bit aligned value written through memoryview.cast('q'): a
reader sees the old or the new value, never a torn one.
"""

import collections

HEADER_WORDS = 16

# header words of click segments and impression logs (shared meaning)
MAGIC, OWNER_PID, OWNER_START, MINUTE, CAPACITY, USED, SEALED = 0, 1, 2, 3, 4, 5, 6
FLUSHED_SEQ, PENDING_SEQ, PENDING_USED = 7, 8, 9
FLUSHED_USED = 10  # impression logs only: everything below it is in the database
PENDING_START = 11  # click segments only: the first record of the staged range
MOVED = 15  # 1 = republished elsewhere (the copy is the live file)
# header words of the worker counters file
REJECTED_CLICKS, REJECTED_IMPRESSIONS, LAST_REFUSAL_AT = 11, 12, 13
# record words of a click segment, relative to the record's first word
BANNER, COUNT, FLUSHED, PENDING = 0, 1, 2, 3

# A kind of file: its magic number, file suffix and record size in words.
Kind = collections.namedtuple("Kind", "magic suffix record_words")


def magic(name: bytes) -> int:
    """The MAGIC word of a kind of file: its 8-byte name read as a little-endian int64."""
    assert len(name) == 8
    return int.from_bytes(name, "little")


CLICKS = Kind(magic(b"CLCKSEG1"), ".seg", 4)
IMPRESSIONS = Kind(magic(b"CIMPLOG1"), ".imp", 5)
WORKER_COUNTERS = Kind(magic(b"CLCKWTS1"), ".wst", 0)


def file_size(slots: int, record_words: int = CLICKS.record_words) -> int:
    return 8 * (HEADER_WORDS + record_words * slots)
