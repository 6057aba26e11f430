//! Fuzzes the join a narinfo PUT makes (`larder_nix::nar_file`): any
//! bytes, parsed as a narinfo PUT to a cache under a store-path hash, must
//! be taken or refused cleanly; one taken names exactly the NAR file its
//! URL spells, for the path it was PUT under, and matches a staged file
//! exactly when the staged file's NarHash and NarSize are its own.
//!
//! Input: one mode byte, then the narinfo text. Bit 0 picks the cache's
//! store directory (`/nix/store` or `/gnu/store`); bit 1 whether the
//! staged file to match holds the narinfo's own NAR or a NAR derived from
//! the input.
#![no_main]

use larder_nix::nar_file::{NarFileName, PushedNarInfo};
use larder_nix::{NarHash, Sha256Hash, StoreDir, StorePathHash};
use libfuzzer_sys::fuzz_target;

/// The hash the seeds' store paths have, so that mutations of them reach
/// the checks past the first.
const PATH_HASH: &str = "42nz3hhz98ii98b2d6ri24navmv57jpg";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    let store_dir = if mode & 1 == 0 {
        StoreDir::default()
    } else {
        StoreDir::new("/gnu/store").expect("a valid store directory")
    };
    let path_hash = StorePathHash::parse(PATH_HASH).expect("a valid store-path hash");
    let Ok(pushed) = PushedNarInfo::parse(text, &store_dir, &path_hash) else {
        return;
    };
    let narinfo = &pushed.narinfo;
    assert_eq!(*narinfo.store_path.hash(), path_hash);
    // The file is the one the URL spells, and its name has one spelling.
    let name = pushed.file.to_string();
    assert_eq!(narinfo.url, format!("nar/{name}"));
    assert_eq!(NarFileName::parse(&name), Ok(pushed.file));

    let (staged_hash, staged_size) = if mode & 2 == 0 {
        (narinfo.nar_hash, narinfo.nar_size)
    } else {
        (
            NarHash::new(Sha256Hash::digest(text)),
            text.len() as u64,
        )
    };
    let matches = staged_hash == narinfo.nar_hash && staged_size == narinfo.nar_size;
    match pushed.check_staged(&staged_hash, staged_size) {
        Ok(()) => assert!(matches),
        Err(mismatch) => {
            assert!(!matches);
            // The message names the file and both sides.
            let message = mismatch.to_string();
            assert!(message.contains(&name), "{message}");
            assert!(message.contains(&staged_size.to_string()), "{message}");
        }
    }
});
