-- Build logs Nix uploads (`nix store copy-log --to`, `PUT log/<drv>`), one
-- per cache and derivation (`<hash>-<name>.drv`), as one zstd frame of the
-- log; a PUT again replaces it. `uploaded_at` (Unix milliseconds) is what
-- retention measures a log's age from. They go with their cache.
CREATE TABLE build_logs (
    cache_id INTEGER NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    drv_name TEXT NOT NULL,
    log BLOB NOT NULL,
    log_size INTEGER NOT NULL CHECK (log_size >= 0),
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, drv_name)
);
CREATE INDEX build_logs_by_age ON build_logs (cache_id, uploaded_at);

-- The debug-info index Nix writes with `index-debug-info=true`
-- (`PUT debuginfo/<build id>`): small JSON documents naming the NAR and
-- member that hold an ELF build id's debug file, kept as sent (checked) per
-- cache, aged and deleted like build logs.
CREATE TABLE debug_infos (
    cache_id INTEGER NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    build_id TEXT NOT NULL,
    info TEXT NOT NULL,
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, build_id)
);
CREATE INDEX debug_infos_by_age ON debug_infos (cache_id, uploaded_at);
