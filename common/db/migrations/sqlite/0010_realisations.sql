-- Realisations of content-addressed derivations (issue #15), per cache:
-- which store path a derivation output (`sha256:<hex>!<output>`) built to,
-- as Nix up to 2.34 uploads them (`realisations/<id>.doi`). Served, signed
-- by the cache's key like narinfos, while the cache holds the output path;
-- GC deletes the ones whose path the cache no longer has.
CREATE TABLE realisations (
    cache_id INTEGER NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    drv_output TEXT NOT NULL,
    -- The output's store path hash and base name.
    store_path_hash TEXT NOT NULL,
    out_path TEXT NOT NULL,
    -- JSON object of the realisations it depended on (empty from Nix 2.33).
    dependent TEXT NOT NULL DEFAULT '{}',
    -- JSON list of the pusher's signatures; the cache's is added when served.
    sigs TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, drv_output)
);
