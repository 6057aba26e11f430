-- Larder's metadata schema, PostgreSQL dialect. The SQLite file of the same
-- number holds the same tables; see ../README.md for the dialect rules.
--
-- Integer ids are identity columns, which never reuse an id after a
-- delete: batched access-time flushes and queue messages carry ids, and a
-- reused id would make them touch an unrelated row.

-- A cache: one tenant's restricted view of the global store.
CREATE TABLE caches (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_public BOOLEAN NOT NULL DEFAULT FALSE,
    store_dir TEXT NOT NULL DEFAULT '/nix/store',
    priority BIGINT NOT NULL DEFAULT 41,
    -- JSON list of key names.
    upstream_cache_key_names TEXT NOT NULL DEFAULT '["cache.nixos.org-1"]',
    -- NULL: the global default retention applies.
    retention_period_secs BIGINT CHECK (retention_period_secs >= 0),
    -- Nix-format ed25519 secret key `name:base64`.
    keypair TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- A NAR of the global store, by the SHA-256 of its uncompressed bytes.
CREATE TABLE nars (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Canonical `sha256:<nix-base32>`.
    nar_hash TEXT NOT NULL UNIQUE,
    nar_size BIGINT NOT NULL CHECK (nar_size >= 0),
    state TEXT NOT NULL CHECK (state IN ('pending', 'valid', 'deleting')),
    -- 0 until the chunker has recorded the chunk list.
    n_chunks BIGINT NOT NULL DEFAULT 0 CHECK (n_chunks >= 0),
    -- The size of the NAR as served (its compressed chunks); set when valid.
    file_size BIGINT CHECK (file_size >= 0),
    created_at BIGINT NOT NULL
);

-- A chunk of the global store, by the SHA-256 (hex) of its uncompressed bytes.
CREATE TABLE chunks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_hash TEXT NOT NULL UNIQUE,
    chunk_size BIGINT NOT NULL CHECK (chunk_size > 0),
    state TEXT NOT NULL CHECK (state IN ('pending', 'valid', 'deleting')),
    -- Where its compressed bytes live: a byte range of a storage object, so
    -- that packing many chunks into one object needs no schema change.
    object_key TEXT,
    object_offset BIGINT CHECK (object_offset >= 0),
    object_length BIGINT CHECK (object_length > 0),
    created_at BIGINT NOT NULL,
    CHECK (state <> 'valid' OR (object_key IS NOT NULL AND object_offset IS NOT NULL AND object_length IS NOT NULL))
);

-- A NAR is the concatenation of its chunks in `seq` order. A chunk that a
-- NAR lists cannot be deleted (no cascade from chunks).
CREATE TABLE nar_chunks (
    nar_id BIGINT NOT NULL REFERENCES nars (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL CHECK (seq >= 0),
    chunk_id BIGINT NOT NULL REFERENCES chunks (id),
    PRIMARY KEY (nar_id, seq)
);
-- Chunk GC ("no NAR points here") and finalisation ("NARs waiting on this chunk").
CREATE INDEX nar_chunks_chunk_id ON nar_chunks (chunk_id);

-- A store path in one cache, pointing at a global NAR. A NAR that an object
-- points at cannot be deleted (no cascade from nars).
CREATE TABLE objects (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_id BIGINT NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    store_path_hash TEXT NOT NULL,
    -- The full path, in the store directory it was pushed from.
    store_path TEXT NOT NULL,
    nar_id BIGINT NOT NULL REFERENCES nars (id),
    -- JSON list of store path base names (`references` is an SQL keyword).
    path_references TEXT NOT NULL DEFAULT '[]',
    deriver TEXT,
    system TEXT,
    -- JSON list of the pusher's signatures; the server adds its own when serving.
    sigs TEXT NOT NULL DEFAULT '[]',
    ca TEXT,
    created_at BIGINT NOT NULL,
    last_accessed_at BIGINT NOT NULL,
    -- The `sub` of the token that pushed it.
    created_by TEXT,
    -- Also the index of narinfo lookups.
    UNIQUE (cache_id, store_path_hash)
);
-- NAR GC ("no object points here").
CREATE INDEX objects_nar_id ON objects (nar_id);
-- Retention GC: a cache's objects not accessed since a cutoff.
CREATE INDEX objects_cache_id_last_accessed_at ON objects (cache_id, last_accessed_at);

-- The ingest pipeline's state for one pushed path; the database is the truth.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    cache_id BIGINT NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    store_path_hash TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size BIGINT NOT NULL CHECK (nar_size >= 0),
    -- JSON: the object row to create when the NAR is finalised.
    object_metadata TEXT NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN ('spooled', 'chunking', 'compressing', 'done', 'failed')),
    -- Where the spooled NAR sits in staging storage.
    staged_key TEXT NOT NULL,
    nar_id BIGINT REFERENCES nars (id) ON DELETE SET NULL,
    error TEXT,
    attempts BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    trace_id TEXT,
    created_by TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- The reconciler and the reaper: uploads in a phase for too long.
CREATE INDEX uploads_phase_updated_at ON uploads (phase, updated_at);
-- Missing-paths: paths in flight in a cache.
CREATE INDEX uploads_cache_id_store_path_hash ON uploads (cache_id, store_path_hash);

-- Minted tokens, for listing and revocation by `jti`.
CREATE TABLE tokens (
    jti TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    -- JSON: the token's claims as minted.
    claims TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
-- The revocation cache reloads only revoked tokens, every few seconds.
CREATE INDEX tokens_revoked_at ON tokens (revoked_at) WHERE revoked_at IS NOT NULL;
