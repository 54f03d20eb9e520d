"""/metrics: Prometheus exposition (prometheus_client), built at scrape time
from the flusher's status file. Nothing is counted per click: the flusher
already knows what it wrote, and workers count only their refusals."""

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from counter.flush.status import StatusFile
from counter.kinds.registry import REGISTRY
from counter.shm import segment

_COUNTERS = {  # status total -> (metric name, help); each kind's total first
    **{kind.name: (f"click_counter_{kind.name}_flushed", kind.flushed_help) for kind in REGISTRY},
    "rows": ("click_counter_rows_written", "(banner, minute) rows written by flushes."),
    "flushes": ("click_counter_flushes", "Successful flush transactions."),
    "flush_failures": ("click_counter_flush_failures", "Flushes that failed (database errors)."),
    "retired_segments": ("click_counter_segments_retired", "Shared-memory segments drained and removed."),
}
_REJECTIONS = {
    "rejected_clicks": ("click_counter_clicks_rejected", "Clicks refused with 503 (memory bound)."),
    "rejected_impressions": ("click_counter_impressions_rejected", "Impressions refused with 503 (memory bound)."),
}


class _StatusCollector:
    def __init__(self, shm_dir):
        self.shm_dir = shm_dir

    def collect(self):
        status = StatusFile.read(self.shm_dir) or {}
        totals = status.get("totals", {})
        for key, (name, text) in _COUNTERS.items():
            yield CounterMetricFamily(name, text, value=totals.get(key, 0))
        live = status.get("live_rejections", {})
        for key, (name, text) in _REJECTIONS.items():
            yield CounterMetricFamily(name, text, value=totals.get(key, 0) + live.get(key, 0))
        pending = status.get("unflushed", 0)
        # What waits in shared memory, by kind, only while the flusher's last
        # cycle failed: then nothing is being committed, so the segments'
        # counts and the file's totals add up. After a success it is zero, as
        # in the file. (A recovering flush that commits between the file read
        # and the scan can make one scrape low; the file holds no split.)
        waiting = _unflushed_by_kind(self.shm_dir) if pending else {}
        for kind in REGISTRY:
            yield CounterMetricFamily(
                f"click_counter_{kind.name}_accepted",
                f"{kind.title} answered 2xx: flushed, plus those waiting while flushes fail.",
                value=totals.get(kind.name, 0) + waiting.get(kind.name, 0))
        yield GaugeMetricFamily("click_counter_pending", "Clicks and impressions not yet in PostgreSQL "
                                "(as the flusher last counted).", value=pending)
        last = status.get("last_flush_at")
        lag = GaugeMetricFamily("click_counter_flush_lag_seconds", "Seconds since the last successful flush.")
        if last:
            lag.add_metric([], time.time() - last)
        yield lag
        duration = GaugeMetricFamily("click_counter_flush_duration_seconds", "Duration of the last flush cycle.")
        if status.get("last_duration") is not None:
            duration.add_metric([], status["last_duration"])
        yield duration
        yield GaugeMetricFamily("click_counter_segments", "Segment files in shared memory.",
                                value=status.get("segments", 0))
        yield GaugeMetricFamily("click_counter_segments_live", "Segments still owned by a live process.",
                                value=status.get("live_segments", 0))
        yield GaugeMetricFamily("click_counter_flusher_up", "1 while the flusher process lives.",
                                value=int(StatusFile.flusher_alive(status)))
        yield GaugeMetricFamily("click_counter_database_up", "1 if the flusher's last database contact worked.",
                                value=int(StatusFile.database_reachable(status)))


def _unflushed_by_kind(shm_dir) -> dict:
    """{"clicks": n, "impressions": m, ...} not yet in the database, read from the segments."""
    counts = {}
    for kind in REGISTRY:
        counts[kind.name] = 0
        for path in segment.list_segments(shm_dir, kind.segment_kind.suffix):
            try:
                seg = kind.reader(path)
            except (ValueError, OSError):
                continue  # retired meanwhile
            try:
                counts[kind.name] += seg.unflushed()
            finally:
                seg.close()
    return counts


def exposition(shm_dir):
    """(content type, body) of the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(shm_dir))
    return CONTENT_TYPE_LATEST, generate_latest(registry)
