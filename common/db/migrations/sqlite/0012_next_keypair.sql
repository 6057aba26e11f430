-- The key a cache is rotating to (issue #18): while set, every narinfo and
-- realisation the cache serves carries this key's signature beside the
-- current key's, so that clients can trust the new public key before the
-- old one stops signing. NULL when no rotation is in progress.
ALTER TABLE caches ADD COLUMN next_keypair TEXT;
