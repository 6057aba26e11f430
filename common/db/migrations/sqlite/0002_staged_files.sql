-- NAR files received through Nix's own upload protocol (`PUT nar/<file>`),
-- verified and spooled, waiting for the narinfo that names them. Keyed by
-- the file name Nix chose (`<FileHash>.nar[.zst|.xz]`) within one cache:
-- a file staged by one cache is never visible to another.
CREATE TABLE staged_files (
    cache_id INTEGER NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    file_name TEXT NOT NULL,
    -- Where the verified, uncompressed NAR sits in staging storage.
    staged_key TEXT NOT NULL,
    -- Canonical `sha256:<nix-base32>` of the uncompressed NAR.
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL CHECK (nar_size >= 0),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, file_name)
);
-- The reaper: staged files no narinfo claimed.
CREATE INDEX staged_files_created_at ON staged_files (created_at);
