-- The `.ls` listing of each NAR, computed once by the chunker while it cuts
-- the NAR and served from here, never recomputed from the chunks: a zstd
-- frame of the JSON Nix writes. Written before the chunk list is recorded,
-- so it exists before its NAR can become valid; absent for NARs stored
-- before this migration and for NARs whose listing exceeded the chunker's
-- budget (those answer 404, which Nix reads as "no listing"). It goes with
-- its NAR.
CREATE TABLE nar_listings (
    nar_id INTEGER PRIMARY KEY REFERENCES nars (id) ON DELETE CASCADE,
    listing BLOB NOT NULL
);
