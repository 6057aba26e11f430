//! Fuzzes the check of Attic upload metadata (the `X-Attic-Nar-Info`
//! header or the `upload-path` preamble): any bytes must be refused with
//! an error or give checked fields, never panic; checked fields written
//! back out in Larder's spelling must check to the same fields, and the
//! store path must parse or fail cleanly against the default store.
//! Inputs are JSON texts, so real headers seed the corpus as they are.
#![no_main]

use larder_nix::StoreDir;
use larder_api::upload_info::CheckedUploadInfo;
use libfuzzer_sys::fuzz_target;

/// A limit the inputs can cross either way.
const MAX_NAR_SIZE: u64 = 1 << 30;

fuzz_target!(|data: &[u8]| {
    let Ok(checked) = CheckedUploadInfo::parse(data, MAX_NAR_SIZE) else {
        return;
    };
    assert!(checked.fields.nar_size <= MAX_NAR_SIZE);
    let json = serde_json::to_vec(&checked.to_wire()).expect("wire types serialise");
    let again = CheckedUploadInfo::parse(&json, MAX_NAR_SIZE).expect("written back, it checks");
    assert_eq!(again, checked);
    if let Ok(path) = StoreDir::default().parse_path(&checked.store_path) {
        assert_eq!(
            StoreDir::default().parse_path(&path.to_full_path(&StoreDir::default())),
            Ok(path)
        );
    }
});
