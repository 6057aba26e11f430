-- Garbage collection (gc-scheduler; see gc-scheduler/src/gc.rs for the
-- protocol against concurrent uploads).

-- When a chunker last looked this chunk up or created it: GC leaves an
-- unreferenced chunk alone for a grace period after that, because the
-- chunker that found it lists it in its NAR only once the whole NAR is cut.
-- (Correctness does not rest on it: recording a chunk list refuses chunks
-- GC has claimed.) 0 for the rows that existed before.
ALTER TABLE chunks ADD COLUMN linked_at INTEGER NOT NULL DEFAULT 0;

-- NAR GC: an upload in flight protects the NAR of its hash, linked or not.
CREATE INDEX uploads_nar_hash ON uploads (nar_hash);
-- Chunk GC resumes claimed chunks (state 'deleting') left by a crashed run.
CREATE INDEX chunks_deleting ON chunks (id) WHERE state = 'deleting';
-- Orphan sweep: is a chunk object found in storage named by a row?
CREATE INDEX chunks_object_key ON chunks (object_key);
-- Orphan sweep of staging: is a staged NAR found in storage named by a row?
CREATE INDEX uploads_staged_key ON uploads (staged_key);
CREATE INDEX staged_files_staged_key ON staged_files (staged_key);
