-- Pins (issue #18): a named pin per cache keeps the closure of its
-- revisions' root paths, in that cache, from retention GC and quota
-- eviction. A pin goes with its cache; its revisions go with the pin.
-- Numbered 0014: 0012 and 0013 belong to work on other branches.
CREATE TABLE pins (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_id BIGINT NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    -- Which revisions are kept: 'forever', the newest `keep_value`
    -- ('revisions'), or those younger than `keep_value` days ('days'); the
    -- newest is always kept.
    keep_kind TEXT NOT NULL CHECK (keep_kind IN ('forever', 'revisions', 'days')),
    keep_value BIGINT CHECK (keep_value > 0),
    created_at BIGINT NOT NULL,
    CHECK ((keep_kind = 'forever') = (keep_value IS NULL)),
    UNIQUE (cache_id, name)
);

-- One pinning of a root path under a pin's name. Revisions are numbered
-- from 1 in the order they were made; pruning drops the oldest.
CREATE TABLE pin_revisions (
    pin_id BIGINT NOT NULL REFERENCES pins (id) ON DELETE CASCADE,
    revision BIGINT NOT NULL CHECK (revision > 0),
    -- The root's hash (what GC's closure starts from) and its full path,
    -- kept for listings after the path itself has gone.
    store_path_hash TEXT NOT NULL,
    store_path TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- The `sub` of the token that pinned it.
    created_by TEXT,
    PRIMARY KEY (pin_id, revision)
);
