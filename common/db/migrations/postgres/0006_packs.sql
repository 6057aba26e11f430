-- Pack objects (issue #16): many chunks' frames concatenated in one storage
-- object, each chunk row pointing at its byte range (object_key,
-- object_offset, object_length), so that pushing and serving cost a few
-- storage requests per pack instead of one per chunk.
--
-- A row is inserted in the transaction that points chunks into its object,
-- after the object is durable; an object under packs/ without a row is an
-- orphan of a crashed writer, which GC sweeps after orphan-grace. Nothing
-- ever points a chunk into an existing pack, so a pack no chunk row names is
-- empty for good: GC deletes its object, then its row. Compaction moves a
-- pack's live chunks into a new pack and sets retired_at; the old object is
-- deleted only once retired_at is older than orphan-grace, because a reader
-- may still hold a location it read before the move. A per-chunk object of
-- a store written before packs gets a retired row when its chunk is repacked,
-- for the same reason.
CREATE TABLE packs (
    id BIGSERIAL PRIMARY KEY,
    object_key TEXT NOT NULL UNIQUE,
    size BIGINT NOT NULL CHECK (size >= 0),
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);
