"""The HTTP side: the bare click route, the Falcon app, request parsing, health
and metrics. Reaches the flusher only through flush.status."""
