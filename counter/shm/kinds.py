"""Every kind of segment file in SHM_DIR, with its flusher-side reader."""

from counter.shm import impressions, segment

SEGMENT_KINDS = ((segment.CLICKS, segment.SegmentFile),
                 (impressions.IMPRESSIONS, impressions.ImpressionLogFile))
