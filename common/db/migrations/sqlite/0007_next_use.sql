-- Where a NAR's chunk list lists the same chunk again (issue #16): the seq
-- of the next entry with this entry's chunk, NULL when there is none. A
-- download keeps such a frame in memory until then (within a budget), so
-- that a chunk repeated far apart in one NAR (the same file in two
-- toolchains) is not read from its pack a second time, which would also cut
-- the long ranged read of the pack being served in two. Written with the
-- list; lists recorded before this column have NULL throughout and are
-- served as before (their repeats read again).
ALTER TABLE nar_chunks ADD COLUMN next_use INTEGER CHECK (next_use IS NULL OR next_use > seq);
