-- Clicks per banner and minute. The flusher only ever adds to count.
CREATE TABLE clicks (
    banner_id bigint      NOT NULL CHECK (banner_id > 0),
    ts        timestamptz NOT NULL,
    count     bigint      NOT NULL CHECK (count > 0),
    PRIMARY KEY (banner_id, ts)
);

-- The last flush sequence committed for each shared-memory segment. It is
-- written in the same transaction as the clicks it accounts for, so after a
-- crash the flusher can ask whether its pending values were committed.
CREATE TABLE segment_flushes (
    segment_id text        PRIMARY KEY,
    seq        bigint      NOT NULL,
    flushed_at timestamptz NOT NULL DEFAULT now()
);
