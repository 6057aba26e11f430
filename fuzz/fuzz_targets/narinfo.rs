//! Fuzzes the narinfo parser: any text must parse or fail cleanly, and what
//! parses must render to text that parses to the same value.
#![no_main]

use larder_nix::{NarInfo, StoreDir};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let store_dir = StoreDir::default();
    if let Ok(info) = NarInfo::parse(text, &store_dir) {
        let rendered = info.render(&store_dir);
        let again = NarInfo::parse(&rendered, &store_dir).expect("rendered narinfo parses");
        assert_eq!(again, info);
        assert_eq!(again.render(&store_dir), rendered);
    }
});
