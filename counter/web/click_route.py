"""The click routes as a bare WSGI callable in front of the Falcon app.

A valid click (`GET`/`POST /counter/{id}` or `/v1/banners/counter/{id}`) is
answered here: one dict lookup of the path, one add into the worker's
segment, and the same status and headers Falcon would send. Everything else
-- other routes, bad ids, other methods, and a full memory (503) -- goes to
the Falcon app, which renders every error, so answers stay identical either
way.

The worker's time per click is mostly the kernel's and meinheld's; what
Python adds runs with cold caches, so every step left out shows (see
README "Performance"). Hence a memo of parsed click paths: a path is parsed
once, and later clicks on it are a lookup.
"""

from counter.web.stats_request import MAX_BANNER_ID

# (prefix, status, headers) of each click route
ROUTES = (
    ("/counter/", "200 OK", [("Content-Length", "0"), ("Content-Type", "application/json")]),
    ("/v1/banners/counter/", "204 No Content", []),
)
MEMO_SIZE = 16_384  # click paths remembered per worker (~3 MiB); emptied when full
_MAX_DIGITS = 32  # the same bound as stats_request.banner_id: int() stays cheap


def click_route(clicks, app):
    """A WSGI callable: valid clicks are counted into `clicks` (``add(banner_id)
    -> bool``) and answered; every other request goes to `app`.
    DESIGN invariant 1: a click touches only its worker's memory -- a memo
    lookup here and SegmentWriter.add; no lock, no syscall of ours, no database."""
    add = clicks.add
    memo = {}  # click path -> (banner id, status, headers)
    remembered = memo.get

    def parse(path):
        """(banner id, status, headers) of a valid click path, else None."""
        for prefix, status, headers in ROUTES:
            if path.startswith(prefix):
                digits = path[len(prefix):]
                if (len(digits) <= _MAX_DIGITS and digits.isdigit() and digits.isascii()
                        and 0 < int(digits) <= MAX_BANNER_ID):
                    if len(memo) >= MEMO_SIZE:
                        memo.clear()  # bounded: any number of distinct ids may come
                    click = memo[path] = (int(digits), status, headers)
                    return click
                return None
        return None

    def route(environ, start_response):
        path = environ["PATH_INFO"]
        click = remembered(path) or parse(path)
        if click is not None:
            method = environ["REQUEST_METHOD"]
            if method == "GET" or method == "POST":
                banner, status, headers = click
                try:  # free in 3.11 when nothing is raised
                    counted = add(banner)
                except Exception:  # noqa: BLE001 -- Falcon renders it as a JSON 500
                    counted = False
                if counted:
                    start_response(status, headers)
                    return []
        return app(environ, start_response)

    route.memo = memo  # for tests
    return route
