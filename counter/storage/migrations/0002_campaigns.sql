-- Campaigns and their unique impressions.
CREATE TABLE campaigns (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    start_time timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The dedup window of each (campaign, user): the impression that opened it
-- (opened_by) counted; the user's later ones inside DEDUP_TTL did not.
-- user_hash is a keyed hash: user ids are never stored.
CREATE TABLE impression_windows (
    campaign_id  uuid        NOT NULL,
    user_hash    bytea       NOT NULL,
    window_start timestamptz NOT NULL,
    opened_by    bigint      NOT NULL,
    PRIMARY KEY (campaign_id, user_hash)
);

-- Counted (unique) impressions per campaign and minute.
CREATE TABLE campaign_impressions (
    campaign_id uuid        NOT NULL,
    ts          timestamptz NOT NULL,
    count       bigint      NOT NULL CHECK (count > 0),
    PRIMARY KEY (campaign_id, ts)
);

-- Secrets the service makes for itself, e.g. the user-hash key.
CREATE TABLE service_secrets (
    name  text  PRIMARY KEY,
    value bytea NOT NULL
);
