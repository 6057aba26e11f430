//! The push endpoints' wire types, as the push contract fixes them
//! (Attic's field names): `get-missing-paths`, `upload-path` and
//! `uploads/{id}`.
//!
//! They belong in `common::api` beside the cache-config types, where the
//! server's push endpoints define them too; they live here only until the
//! push branch that adds them there is merged, and then this module should
//! re-export those instead.

use common::cache_name::CacheName;
use common::nix::StorePathHash;
use serde::{Deserialize, Serialize};

/// `POST /_api/v1/get-missing-paths`.
#[derive(Debug, Clone, Serialize)]
pub struct GetMissingPathsRequest {
    pub cache: CacheName,
    pub store_path_hashes: Vec<StorePathHash>,
}

/// The answer: the hashes the cache holds neither as objects nor as
/// uploads in flight.
#[derive(Debug, Clone, Deserialize)]
pub struct GetMissingPathsResponse {
    pub missing_paths: Vec<StorePathHash>,
}

/// The JSON of the `X-Attic-Nar-Info` header of `PUT /_api/v1/upload-path`.
#[derive(Debug, Clone, Serialize)]
pub struct UploadPathNarInfo {
    pub cache: CacheName,
    pub store_path_hash: StorePathHash,
    /// The full store path.
    pub store_path: String,
    /// Full store paths.
    pub references: Vec<String>,
    pub system: Option<String>,
    /// The full path of the deriver, if any.
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// `sha256:<hex>`.
    pub nar_hash: String,
    pub nar_size: u64,
}

/// The answer to `upload-path`.
#[derive(Debug, Clone, Deserialize)]
pub struct UploadPathResult {
    /// `Uploaded` or `Deduplicated`.
    pub kind: String,
    #[serde(default)]
    pub upload_id: Option<String>,
    /// The upload's phase when the server answered; `done` means visible.
    #[serde(default)]
    pub phase: Option<String>,
}

/// `GET /_api/v1/uploads/{id}` (the fields the client reads).
#[derive(Debug, Clone, Deserialize)]
pub struct UploadStatus {
    pub phase: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// The header carrying [`UploadPathNarInfo`].
pub const NAR_INFO_HEADER: &str = "X-Attic-Nar-Info";
/// The request header that makes `upload-path` answer once the upload is
/// acknowledged rather than visible.
pub const WAIT_HEADER: &str = "X-Larder-Wait";
/// The phase in which an upload is visible to Nix.
pub const PHASE_DONE: &str = "done";
/// The phase of an upload the pipeline gave up on.
pub const PHASE_FAILED: &str = "failed";
