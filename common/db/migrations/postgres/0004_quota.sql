-- Per-cache storage quotas (see common/src/db/quota.rs for how usage is
-- kept and why it cannot overshoot).

-- The cache's quota: 'default' (the server's `[quota] default-cache-quota`
-- applies), 'unlimited', or 'bytes' (then `quota_bytes` holds it).
ALTER TABLE caches ADD COLUMN quota_kind TEXT NOT NULL DEFAULT 'default'
    CHECK (quota_kind IN ('default', 'unlimited', 'bytes'));
ALTER TABLE caches ADD COLUMN quota_bytes BIGINT CHECK (quota_bytes >= 0);
-- What a push over the quota does: refused, or room made by evicting the
-- least recently accessed paths.
ALTER TABLE caches ADD COLUMN quota_policy TEXT NOT NULL DEFAULT 'refuse'
    CHECK (quota_policy IN ('refuse', 'evict-lru'));
-- Usage in logical bytes, maintained by every transaction that creates or
-- removes what counts (and recomputed by GC): the NarSize of the cache's
-- objects, and of its uploads in flight plus its staged files.
ALTER TABLE caches ADD COLUMN usage_path_bytes BIGINT NOT NULL DEFAULT 0
    CHECK (usage_path_bytes >= 0);
ALTER TABLE caches ADD COLUMN usage_pending_bytes BIGINT NOT NULL DEFAULT 0
    CHECK (usage_pending_bytes >= 0);

-- The usage of the caches that exist already.
UPDATE caches SET
    usage_path_bytes = (SELECT CAST(COALESCE(SUM(n.nar_size), 0) AS BIGINT)
                        FROM objects o JOIN nars n ON n.id = o.nar_id
                        WHERE o.cache_id = caches.id),
    usage_pending_bytes =
        (SELECT CAST(COALESCE(SUM(u.nar_size), 0) AS BIGINT) FROM uploads u
         WHERE u.cache_id = caches.id AND u.phase IN ('spooled', 'chunking', 'compressing'))
        + (SELECT CAST(COALESCE(SUM(s.nar_size), 0) AS BIGINT) FROM staged_files s
           WHERE s.cache_id = caches.id);
