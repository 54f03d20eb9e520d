"""The click routes as a bare WSGI callable in front of the Falcon app.

A valid click (`GET`/`POST /counter/{id}` or `/v1/banners/counter/{id}`) is
answered here: a prefix test, a digit test, one add into the worker's segment,
and the same status and headers Falcon would send. Everything else -- other
routes, bad ids, other methods, and a full memory (503) -- goes to the Falcon
app, which renders every error, so answers stay identical either way.
"""

from counter.stats_request import MAX_BANNER_ID

_OK = ("200 OK", [("Content-Length", "0"), ("Content-Type", "application/json")])
_NO_CONTENT = ("204 No Content", [])


class ClickRoute:
    def __init__(self, clicks, app):
        self._add = clicks.add
        self._app = app

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/counter/"):
            banner, answer = path[9:], _OK
        elif path.startswith("/v1/banners/counter/"):
            banner, answer = path[20:], _NO_CONTENT
        else:
            return self._app(environ, start_response)
        # 19 digits or fewer: longer ids (leading zeros) go the long way
        if (len(banner) < 20 and banner.isdigit() and banner.isascii()
                and environ["REQUEST_METHOD"] in ("GET", "POST")):
            value = int(banner)
            try:  # free in 3.11 when nothing is raised
                counted = 0 < value <= MAX_BANNER_ID and self._add(value)
            except Exception:  # noqa: BLE001 -- Falcon renders it as a JSON 500
                counted = False
            if counted:
                start_response(*answer)
                return []
        return self._app(environ, start_response)
