"""The impressions kind: campaign impressions appended to impression logs
(counter/shm/impressions.py) and counted once per user and DEDUP_TTL window
into `campaign_impressions` (DESIGN "Storage")."""

from counter.kinds.base import Batch, EventKind
from counter.shm import impressions


class ImpressionBatch(Batch):
    """A part's impressions: [(impression id, campaign UUID, user hash, time in µs)]."""

    def __init__(self, options):
        super().__init__(options)
        self.records = []

    def add(self, seg, staged):
        self.records.extend(staged)

    @property
    def size(self) -> int:
        return len(self.records)


def _count_unique_impressions(cur, impressions, ttl):
    """Apply the dedup window rule to a batch and add the counted impressions
    to campaign_impressions.

    Rule: a user's impression of a campaign counts when it opens a window, i.e.
    when there is no window yet or it is at least `ttl` seconds after the
    current window's start; it then becomes the window's start. The upsert
    locks each (campaign, user) row until commit, so flushers of other nodes
    wait for it and the rule holds across nodes. A statement may touch a row
    only once, so the batch goes in rounds: each round takes, per user, the
    earliest impression not yet decided, and the answer tells which of the
    user's later impressions the resulting window covers.
    """
    queues = {}
    for impression_id, campaign, user, micros in sorted(impressions, key=lambda r: r[3]):
        queues.setdefault((str(campaign), bytes(user)), []).append((micros, impression_id))
    ttl_micros = round(ttl * 1_000_000)
    counted = {}
    while queues:
        keys = sorted(queues)
        firsts = [queues[k][0] for k in keys]
        cur.execute(
            "INSERT INTO impression_windows AS w (campaign_id, user_hash, window_start, opened_by)"
            " SELECT c, u, timestamptz 'epoch' + t * interval '1 microsecond', i"
            " FROM unnest(%s::uuid[], %s::bytea[], %s::bigint[], %s::bigint[]) AS x(c, u, t, i)"
            " ON CONFLICT (campaign_id, user_hash) DO UPDATE SET"
            "  window_start = CASE WHEN EXCLUDED.window_start >= w.window_start + %s * interval '1 microsecond'"
            "   THEN EXCLUDED.window_start ELSE w.window_start END,"
            "  opened_by = CASE WHEN EXCLUDED.window_start >= w.window_start + %s * interval '1 microsecond'"
            "   THEN EXCLUDED.opened_by ELSE w.opened_by END"
            " RETURNING campaign_id::text, user_hash,"
            "  (extract(epoch FROM window_start) * 1000000)::bigint, opened_by",
            # bytes go as bytea (the DB-API's binary type)
            ([k[0] for k in keys], [k[1] for k in keys],
             [f[0] for f in firsts], [f[1] for f in firsts], ttl_micros, ttl_micros),
        )
        for campaign, user, window_start, opened_by in cur.fetchall():
            key = (campaign, bytes(user))
            micros, impression_id = queues[key][0]
            if opened_by == impression_id:
                minute = micros // 60_000_000
                counted[campaign, minute] = counted.get((campaign, minute), 0) + 1
            # everything of this user inside the window is decided: not counted
            rest = [q for q in queues[key][1:] if q[0] >= window_start + ttl_micros]
            if rest:
                queues[key] = rest
            else:
                del queues[key]
    if counted:
        keys = sorted(counted)
        cur.execute(
            "INSERT INTO campaign_impressions (campaign_id, ts, count)"
            " SELECT c, to_timestamp(m * 60), n FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS x(c, m, n)"
            " ON CONFLICT (campaign_id, ts) DO UPDATE SET count = campaign_impressions.count + EXCLUDED.count",
            ([k[0] for k in keys], [k[1] for k in keys], [counted[k] for k in keys]),
        )


class Impressions(EventKind):
    name = "impressions"
    title = "Impressions"
    flushed_help = "Impressions given to the dedup rule in PostgreSQL."
    segment_kind = impressions.IMPRESSIONS
    writer = impressions.ImpressionLog
    reader = impressions.ImpressionLogFile
    files = "logs"
    slots = "impression_slots"
    options = {"dedup_ttl": 3600.0}
    Batch = ImpressionBatch

    def write(self, cur, batch):
        _count_unique_impressions(cur, batch.records, batch.options["dedup_ttl"])


KIND = Impressions()
