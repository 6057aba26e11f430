//! What the benchmark drivers (`src/bin/bench_*.rs`) share: pushing a NAR
//! through Attic's `upload-path` until it is visible, and making NARs and
//! store path hashes.

use std::time::Duration;

use larder_api::v1::{UploadPathNarInfo, NAR_INFO_HEADER};
use larder_nix::nar::NarEncoder;
use larder_nix::{NarHash, Sha256Hash};

/// Any error, as a message: a benchmark driver only reports and exits.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Pushes NARs into one cache of a running server.
pub struct Pusher {
    http: reqwest::Client,
    url: String,
    token: String,
    cache: String,
}

impl Pusher {
    pub fn new(url: &str, token: &str, cache: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            url: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            cache: cache.to_owned(),
        })
    }

    /// Downloads `url` (relative to this pusher's cache, such as
    /// `nar/….nar.zst`) once and returns the time to the first byte of its
    /// body, the bytes received and the seconds the whole download took.
    pub async fn download(&self, url: &str) -> Result<(Duration, u64, Duration)> {
        let started = std::time::Instant::now();
        let mut response = self
            .http
            .get(format!("{}/{}/{url}", self.url, self.cache))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        let mut first_byte = None;
        let mut bytes = 0_u64;
        while let Some(chunk) = response.chunk().await? {
            if !chunk.is_empty() && first_byte.is_none() {
                first_byte = Some(started.elapsed());
            }
            bytes += chunk.len() as u64;
        }
        let first_byte = first_byte.ok_or("the download had an empty body")?;
        Ok((first_byte, bytes, started.elapsed()))
    }

    /// The `upload-path` metadata of `nar` as the path named `name` in this
    /// pusher's cache (see [`upload_info`]).
    pub fn info(&self, name: &str, nar: &[u8]) -> UploadPathNarInfo {
        upload_info(&self.cache, name, nar)
    }

    /// Pushes one NAR as the store path `/nix/store/<hash>-<name>` (the
    /// hash from [`store_path_hash_for`]) and returns once the path is
    /// visible.
    pub async fn push(&self, name: &str, nar: Vec<u8>) -> Result<()> {
        self.push_as(&self.info(name, &nar), nar).await
    }

    /// [`push`](Self::push) with the metadata computed beforehand, so that
    /// a timed push does not include hashing the NAR on the client (Nix
    /// and `larder push` know a path's NarHash before they send it).
    pub async fn push_as(&self, info: &UploadPathNarInfo, nar: Vec<u8>) -> Result<()> {
        let name = info.store_path.as_str();
        let (upload_id, phase) = self.upload(info, nar, None).await?;
        match (phase.as_deref(), upload_id) {
            // Answered once visible (or linked at once, on a server
            // without proof of possession).
            (None | Some("done"), _) => Ok(()),
            (Some(_), Some(upload_id)) => self.wait_until_done(name, &upload_id).await,
            (Some(phase), None) => Err(format!("{name} is {phase} without an upload id").into()),
        }
    }

    /// Sends one `upload-path` request (with `X-Larder-Wait` when given)
    /// and returns the upload's id and phase from the answer.
    pub async fn upload(
        &self,
        info: &UploadPathNarInfo,
        nar: Vec<u8>,
        wait: Option<&str>,
    ) -> Result<(Option<String>, Option<String>)> {
        let name = info.store_path.as_str();
        let mut request = self
            .http
            .put(format!("{}/_api/v1/upload-path", self.url))
            .bearer_auth(&self.token)
            .header(NAR_INFO_HEADER, serde_json::to_string(info)?);
        if let Some(wait) = wait {
            request = request.header("X-Larder-Wait", wait);
        }
        let response = request.body(nar).send().await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("pushing {name}: {status}: {answer}").into());
        }
        let text = |key: &str| answer[key].as_str().map(str::to_owned);
        Ok((text("upload_id"), text("phase")))
    }

    async fn wait_until_done(&self, name: &str, upload_id: &str) -> Result<()> {
        loop {
            let status: serde_json::Value = self
                .http
                .get(format!("{}/_api/v1/uploads/{upload_id}", self.url))
                .bearer_auth(&self.token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            match status["phase"].as_str() {
                Some("done") => return Ok(()),
                Some("failed") => {
                    return Err(format!("{name} failed: {}", status["error"]).into());
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// The `upload-path` metadata of `nar` as the store path
/// `/nix/store/<hash>-<name>` in `cache`, without references or signatures.
pub fn upload_info(cache: &str, name: &str, nar: &[u8]) -> UploadPathNarInfo {
    let store_path_hash = store_path_hash_for(name);
    UploadPathNarInfo {
        cache: cache.to_owned(),
        store_path: format!("/nix/store/{store_path_hash}-{name}"),
        store_path_hash,
        references: Vec::new(),
        system: None,
        deriver: None,
        sigs: Vec::new(),
        ca: None,
        nar_hash: NarHash::from(Sha256Hash::digest(nar)).to_string(),
        nar_size: nar.len() as u64,
    }
}

/// A store-path hash (32 Nix base-32 characters) derived from the name, so
/// that reruns push the same paths.
pub fn store_path_hash_for(name: &str) -> String {
    let digest = Sha256Hash::digest(name.as_bytes());
    larder_nix::base32::encode(&digest.as_bytes()[..20])
}

/// A NAR of one regular file.
pub fn single_file_nar(contents: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = NarEncoder::new(Vec::with_capacity(contents.len() + 256))?;
    encoder.regular(false, contents)?;
    Ok(encoder.finish()?)
}
