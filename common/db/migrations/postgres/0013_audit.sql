-- The audit log (issue #18): who (a token's subject and id) did what to
-- which cache, when. A row keeps its cache's id and name but no foreign
-- key, so that a cache's record outlives the cache: a destroyed cache's
-- history is the operator's to read until the retention setting
-- (`[gc] audit-retention`) removes it. Token changes have no cache.
CREATE TABLE audit_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_id BIGINT,
    cache_name TEXT,
    at BIGINT NOT NULL,
    subject TEXT,
    jti TEXT,
    action TEXT NOT NULL,
    -- JSON object: what the action was about (a store path, the settings
    -- changed, a token's id).
    detail TEXT NOT NULL
);
-- A cache's events, newest first, a page at a time.
CREATE INDEX audit_events_cache_id ON audit_events (cache_id, id);
-- Retention.
CREATE INDEX audit_events_at ON audit_events (at);

-- The id of the token that pushed a path or an upload, beside its subject,
-- so that everything a leaked token pushed can be found and purged. NULL
-- for rows written before this column.
ALTER TABLE uploads ADD COLUMN created_by_jti TEXT;
ALTER TABLE objects ADD COLUMN created_by_jti TEXT;
