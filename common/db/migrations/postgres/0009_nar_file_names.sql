-- The names Nix gave the NAR files it pushed (issue #15): `nix copy --to`
-- PUTs `nar/<FileHash>.nar.xz` (or .zst, or .nar), then a narinfo naming
-- it, and keeps that narinfo in its own cache for a month. Larder stores
-- NARs its own way and names them by NAR hash, so the pushing machine would
-- ask for a file Larder never serves. A row says which NAR a cache's pushed
-- file name stands for; the name is served (in the compression its
-- extension says) for as long as the cache serves that NAR. Written when a
-- narinfo claims its staged file; GC deletes rows whose NAR the cache no
-- longer has.
CREATE TABLE nar_file_names (
    cache_id BIGINT NOT NULL REFERENCES caches (id) ON DELETE CASCADE,
    file_name TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, file_name)
);
