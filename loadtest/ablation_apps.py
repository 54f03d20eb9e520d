"""The WSGI apps that `loadtest/ablation.py` serves side by side: the empty
callable, the service, and steps in between, each adding one part of the
click route's work. `ABLATION_VARIANT` picks one; it is built in the worker,
after the fork, as the service's app is."""

import mmap
import os
import tempfile
import time

from counter.web import click_route
from loadtest.empty_app import application as empty

WORDS = 4096  # 32 KiB of 8-byte words, about what 1,000 banners' records fill
PAGE = mmap.PAGESIZE


def click_answer():
    """The empty callable answering the way a click is answered: the click's
    status and headers, an empty list for a body."""
    _, status, headers = click_route.ROUTES[0]

    def app(environ, start_response):
        start_response(status, headers)
        return []
    return app


def route_counting_nothing():
    """The click route with an `add` that stores nothing."""
    class Nowhere:
        def add(self, banner_id):
            return True
    return click_route.click_route(Nowhere(), empty)


def route():
    """The service's WSGI app: the click route counting into its segment."""
    from counter.wsgi import application
    return application


def least_a_route_can_do():
    """A lower bound for any Python click route: one dict lookup from the path
    of banners 1..1000 straight to its counter's word, the clock read and the
    minute test, one add into a tmpfs file mapping, the click's answer. It
    skips what the route must do and this cannot: the method test, parsing
    unseen paths, new segments, the fallback to Falcon."""
    words = _shared_words()
    _, status, headers = click_route.ROUTES[0]
    counters = {f"/counter/{banner}": (1 + 4 * banner, status, headers) for banner in range(1, 1001)}
    counter_of = counters.get
    clock = time.time
    minute_start, minute_end = clock(), clock() + 365 * 86400

    def app(environ, start_response):
        counter = counter_of(environ["PATH_INFO"])
        if counter is not None:
            now = clock()
            if minute_start <= now < minute_end:
                word, status, headers = counter
                words[word] += 1
                start_response(status, headers)
                return []
        return empty(environ, start_response)
    return app


def _shared_words():
    """WORDS words of a file in the tmpfs directory, mapped shared and
    written through `memoryview.cast('q')`, as a segment is."""
    fd, path = tempfile.mkstemp(dir=os.environ["SHM_DIR"], suffix=".ablation")
    os.unlink(path)  # the mapping keeps it
    os.posix_fallocate(fd, 0, 8 * WORDS)
    return memoryview(mmap.mmap(fd, 8 * WORDS)).cast("q")


def _one_increment(words):
    """The empty callable plus one `words[i] += 1`, i stepping over all of `words`."""
    step = [0]

    def app(environ, start_response):
        i = step[0] = (step[0] + 37) % WORDS
        words[i] += 1
        return empty(environ, start_response)
    return app


def increment_a_list():
    return _one_increment([0] * WORDS)


def increment_shared_memory():
    """The same increment into a file of the tmpfs directory, as a segment is written."""
    return _one_increment(_shared_words())


def _writes(offsets):
    """The empty callable plus one byte written at each offset of a mapping."""
    memory = mmap.mmap(-1, offsets[-1] + 1)
    memory[:] = bytes(len(memory))  # fault every page in before serving

    def app(environ, start_response):
        for offset in offsets:
            memory[offset] = 1
        return empty(environ, start_response)
    return app


def writes_to_one_page():
    return _writes([8 * i for i in range(64)])


def writes_to_64_pages():
    """The same 64 writes, each into a page of its own: if every request
    started with an empty TLB, each page would cost a walk."""
    return _writes([PAGE * i for i in range(64)])


VARIANTS = {app.__name__: app for app in (
    click_answer, route_counting_nothing, route, least_a_route_can_do, increment_a_list,
    increment_shared_memory, writes_to_one_page, writes_to_64_pages)}
VARIANTS["empty"] = lambda: empty

application = VARIANTS[os.environ.get("ABLATION_VARIANT", "empty")]()
