"""The ceiling: a WSGI callable that does nothing, served like the service."""


def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]
