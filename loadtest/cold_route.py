"""The click route's own time per click with cold caches, in one process:
fine enough to compare two versions of the route's code, where the
requests/s benchmark's noise hides a tenth of a microsecond. It overstates
what reaches a server: a native add 330-430 ns faster here saved nothing
the ablation could see (docs/performance.md), so a gain here is a lead for
loadtest.ablation and loadtest.bench, not a result.

    python -m loadtest.cold_route [--clicks 40000] [--rounds 3] [--evict-kib 256]

Before each call a memset of --evict-kib KiB pushes the route's data and
code out of the L1 and L2 caches, as a request's trip through the kernel
and the server does; then one call is timed alone (perf_counter_ns). The
variants take turns call by call, so the machine's drift hits all alike:
an app that does nothing (the baseline), the click route on one
SegmentWriter (gunicorn's worker), and on ThreadWriters (granian's). It
prints each one's median and quartiles over the baseline, in ns. Clicks go
over 1,000 banners into segments in a scratch directory of /dev/shm, all in
the current minute (a new minute adds one slow click); nothing else runs.
Pin it to one CPU (taskset -c 0) for steadier figures.
"""

import argparse
import random
import shutil
import statistics
import tempfile
import time

from counter.shm import segment, thread_writers
from counter.web.click_route import click_route

SLOTS, MAX_BYTES = 16_384, 1 << 30


def _nothing(environ, start_response):
    return []


def _answer(status, headers):
    pass


def measure(apps, clicks=40_000, rounds=3, evict_bytes=256 << 10, seed=1):
    """{name: sorted per-call ns} for each of `apps` ({name: WSGI app})."""
    randomly = random.Random(seed)
    environs = [{"PATH_INFO": f"/counter/{randomly.randint(1, 1000)}", "REQUEST_METHOD": "GET"}
                for _ in range(clicks)]
    evicted, zeros = bytearray(evict_bytes), bytes(evict_bytes)
    named = list(apps.items())
    for _, app in named:  # warm up: every path parsed, every banner in the segment
        for environ in environs[:5000]:
            app(environ, _answer)
    times = [[] for _ in named]
    clock = time.perf_counter_ns
    for i, environ in enumerate(environs * rounds):
        which = i % len(named)
        app = named[which][1]
        evicted[:] = zeros
        started = clock()
        app(environ, _answer)
        times[which].append(clock() - started)
    return {name: sorted(calls) for (name, _), calls in zip(named, times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=40_000, help="distinct calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--evict-kib", type=int, default=256, help="memset before each call")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="cc-cold-", dir="/dev/shm")
    try:
        apps = {
            "nothing": _nothing,
            "click route, one writer (gunicorn)": click_route(
                segment.SegmentWriter(directory, SLOTS, MAX_BYTES), _nothing),
            "click route, thread writers (granian)": click_route(
                thread_writers.ThreadWriters(directory, SLOTS, MAX_BYTES), _nothing),
        }
        times = measure(apps, args.clicks, args.rounds, args.evict_kib << 10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    baseline = statistics.median(times["nothing"])
    for name, calls in times.items():
        quartile = len(calls) // 4
        print(f"{name:40} median {statistics.median(calls) - baseline:6.0f} ns"
              f"  (quartiles {calls[quartile] - baseline:.0f} to {calls[3 * quartile] - baseline:.0f})")


if __name__ == "__main__":
    main()
