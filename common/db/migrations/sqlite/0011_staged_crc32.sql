-- The CRC-32 of a staged NAR's bytes, recorded by the API as it writes them
-- (issue #14). The chunker reads the staged copy back and checks it against
-- this instead of computing the NAR's SHA-256 a second time, which cost as
-- much CPU as cutting the NAR. NULL for rows written before this column:
-- their staged copy is checked against the NAR hash, as before.
ALTER TABLE uploads ADD COLUMN staged_crc32 INTEGER CHECK (staged_crc32 BETWEEN 0 AND 4294967295);
ALTER TABLE staged_files ADD COLUMN staged_crc32 INTEGER CHECK (staged_crc32 BETWEEN 0 AND 4294967295);
