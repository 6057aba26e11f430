//! The S3 storage backend, for the distributed topology: AWS S3 itself, R2,
//! and self-hosted services such as Garage and MinIO.
//!
//! Every key lives under a configurable prefix, so staging and chunks can
//! share one bucket. Small bodies are one `PutObject`; a streamed body larger
//! than one part becomes a multipart upload whose parts are read one at a
//! time and sent a few at once, so memory stays bounded whatever the object's
//! size, and a failed or abandoned upload is aborted so it leaves neither an
//! object nor orphaned parts (a bucket lifecycle rule that aborts incomplete
//! multipart uploads remains the backstop for a process killed midway). S3 makes a completed `PutObject` or multipart upload
//! visible atomically, which is the overwrite guarantee the [`Storage`] trait
//! asks for.
//!
//! # Reaching the service
//!
//! HTTPS goes through rustls on ring (no C toolchain or cmake, which the
//! SDK's default aws-lc needs), trusting the system's roots (`SSL_CERT_FILE`
//! replaces them, as for every rustls-native-certs client) plus the
//! `[storage] ca-file` certificates, checked when the storage opens.
//! Addressing is path-style or virtual-hosted ([`S3Config::path_style`]).
//! Without a configured key, credentials come from the AWS SDK's default
//! chain (environment, profile, web identity, container or instance
//! metadata) and are fetched once at open, so that a missing one stops the
//! service at start with the reason; the region likewise.

use std::error::Error as StdError;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::config::{Credentials, ProvideCredentials, Region, SharedHttpClient};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinSet;

use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};

use super::{ListedObject, ObjectKey, ObjectListing, ObjectReader, Storage, StorageError};
use larder_config::S3Config;
use larder_tls::{untrusted_certificate_hint, CaFile};

/// Size of each part of a multipart upload, and the largest body sent as a
/// single `PutObject`. Above S3's 5 MiB minimum part size; with S3's limit
/// of 10 000 parts it caps an object at 80 000 MiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploaded at once. With the part being read, a streamed upload holds
/// at most `(PARTS_IN_FLIGHT + 1) * PART_SIZE` bytes (24 MiB) in memory.
pub const PARTS_IN_FLIGHT: usize = 2;

/// S3's limit on the number of parts of one multipart upload.
const MAX_PARTS: i32 = 10_000;

/// How long a request waits for the service's answer when `[storage]
/// request-timeout` is unset.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The slowest upload allowed for: a request with a body may also take the
/// time its body needs at this rate (8 s more for a part, 32 s for a pack).
const SLOWEST_UPLOAD_BYTES_PER_SECOND: u64 = 1024 * 1024;

/// How many request timeouts `CompleteMultipartUpload` may take: the
/// service assembles the whole object before it answers.
const COMPLETION_TIMEOUTS: u32 = 10;

/// The time a TCP (and TLS) connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Objects in one S3 bucket, under one key prefix.
#[derive(Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    /// Empty, or ending with `/`.
    prefix: String,
    /// The configured endpoint, or none for AWS's own.
    endpoint: Option<String>,
    region: String,
    path_style: bool,
    /// The configured key's id; none when the SDK's chain provides them.
    access_key_id: Option<String>,
    /// How long a request waits for an answer (see [`S3Config`]).
    request_timeout: Duration,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client and the credentials are left out on purpose: a secret
        // must never reach a log.
        f.debug_struct("S3Storage")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Builds the client from `config`: reads and checks its CA file, and
    /// resolves the region and, without a configured key, the credentials
    /// through the SDK's chains. No request reaches S3 yet: an unreachable
    /// service or a refused key shows on the first one (or in
    /// [`Storage::check`]).
    pub async fn new(config: &S3Config) -> Result<Self, StorageError> {
        let prefix = normalise_prefix(&config.prefix)?;
        let open_error = |message: String| StorageError::Backend {
            operation: "opening S3 storage",
            key: format!("bucket {}", config.bucket),
            message,
        };
        let ca_file = CaFile::read_optional(config.ca_file.as_deref())
            .map_err(|error| open_error(error_chain(&error)))?;
        let http_client = https_client(ca_file.as_ref());
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).http_client(http_client.clone());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some((access_key_id, secret_access_key)) = config.static_key() {
            loader = loader.credentials_provider(Credentials::new(
                access_key_id,
                secret_access_key.expose(),
                None,
                None,
                "larder-config",
            ));
        }
        let shared = loader.load().await;
        let region = shared.region().cloned().ok_or_else(|| {
            open_error(
                "no region: set [storage] region, or AWS_REGION, or a profile's region".to_owned(),
            )
        })?;
        let credentials = shared
            .credentials_provider()
            .ok_or_else(|| open_error("no credentials provider".to_owned()))?;
        // Asked now, so that a deployment without any credentials fails at
        // start with the chain's reason rather than on its first upload; the
        // SDK caches them and refreshes them before they expire.
        credentials.provide_credentials().await.map_err(|error| {
            open_error(format!(
                "no credentials: [storage] access-key-id and secret-access-key are unset, \
                 and the AWS SDK's chain found none: {}",
                one_line(&error_chain(&error))
            ))
        })?;
        let path_style = config.path_style();
        let request_timeout = config
            .request_timeout
            .map_or(DEFAULT_REQUEST_TIMEOUT, |timeout| timeout.as_duration());
        // Every attempt is bounded, so that a request the service never
        // answers fails and is retried (the SDK's standard retries count a
        // timeout as transient) instead of holding its caller forever. A
        // streamed GET's body is not covered: its reader's errors are the
        // caller's to handle.
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(path_style)
            .timeout_config(attempt_timeouts(request_timeout));
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix,
            endpoint: config.endpoint.clone(),
            region: region.to_string(),
            path_style,
            access_key_id: config.access_key_id.clone(),
            request_timeout,
        })
    }

    /// The S3 key `key` is stored under: the prefix, then the key.
    pub fn object_name(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    /// The bucket objects are stored in.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Sends `body` as one `PutObject`.
    async fn put_object(&self, key: &ObjectKey, body: Bytes) -> Result<(), StorageError> {
        let length = body.len();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_name(key))
            .body(ByteStream::from(body))
            .customize()
            .config_override(sending_timeouts(self.request_timeout, length))
            .send()
            .await
            .map_err(|error| backend_error("S3 PutObject", key, &error))?;
        Ok(())
    }

    /// Streams `reader` as a multipart upload whose first parts, already
    /// read, are `first_parts`; aborts the upload on any failure, and when
    /// the returned future is dropped before it finishes.
    async fn put_multipart(
        &self,
        key: &ObjectKey,
        first_parts: [Bytes; 2],
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        let name = self.object_name(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&name)
            // Declared up front so the service keeps each part's checksum and
            // can check the list sent on completion against them.
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|error| backend_error("S3 CreateMultipartUpload", key, &error))?;
        let Some(upload_id) = created.upload_id else {
            return Err(StorageError::Backend {
                operation: "S3 CreateMultipartUpload",
                key: key.to_string(),
                message: "the response has no upload id".to_owned(),
            });
        };
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            name: name.clone(),
            upload_id: Some(upload_id.clone()),
        };
        let mut parts = JoinSet::new();
        let result = self
            .upload_parts(key, &name, &upload_id, first_parts, reader, &mut parts)
            .await;
        if result.is_err() {
            // Parts still in flight are cancelled and waited for first, so
            // none lands after the abort.
            parts.shutdown().await;
            // Awaited here rather than left to the guard, so that the upload
            // is gone when the error is returned.
            guard.abort().await;
        }
        guard.disarm();
        result
    }

    /// The body of [`Self::put_multipart`]: reads parts, keeps at most
    /// [`PARTS_IN_FLIGHT`] uploading, then completes the upload.
    async fn upload_parts(
        &self,
        key: &ObjectKey,
        name: &str,
        upload_id: &str,
        first_parts: [Bytes; 2],
        reader: &mut (dyn AsyncRead + Send + Unpin),
        parts: &mut JoinSet<Result<CompletedPart, StorageError>>,
    ) -> Result<u64, StorageError> {
        let mut completed = Vec::new();
        let mut written = 0u64;
        let mut part_number = 0;
        let mut first_parts = first_parts.into_iter();
        loop {
            let part = match first_parts.next() {
                Some(part) => part,
                None => read_part(key, reader).await?,
            };
            if part.is_empty() {
                break;
            }
            part_number += 1;
            if part_number > MAX_PARTS {
                return Err(StorageError::Backend {
                    operation: "S3 multipart upload",
                    key: key.to_string(),
                    message: format!("the object exceeds {MAX_PARTS} parts of {PART_SIZE} bytes"),
                });
            }
            // The part just read waits here: with the parts in flight, that
            // is the memory bound of `PARTS_IN_FLIGHT + 1` parts.
            while parts.len() >= PARTS_IN_FLIGHT {
                completed.push(join_part(key, parts).await?);
            }
            written += part.len() as u64;
            // Spawned, so parts upload while the next one is read.
            parts.spawn(upload_part(
                self.clone(),
                name.to_owned(),
                upload_id.to_owned(),
                key.clone(),
                part_number,
                part,
            ));
        }
        while !parts.is_empty() {
            completed.push(join_part(key, parts).await?);
        }
        // Parts finish in any order; S3 wants them ascending.
        completed.sort_by_key(|part| part.part_number);
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(name)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::new()
                    .timeout_config(attempt_timeouts(self.request_timeout * COMPLETION_TIMEOUTS)),
            )
            .send()
            .await
            .map_err(|error| backend_error("S3 CompleteMultipartUpload", key, &error))?;
        Ok(written)
    }
}

/// Aborts a multipart upload that was neither completed nor aborted, for
/// when a caller drops a `put_reader` future midway (a client that hung up):
/// the dropped future cannot clean up after itself, so a task does.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    name: String,
    /// `None` once aborted or disarmed.
    upload_id: Option<String>,
}

impl AbortOnDrop {
    /// Aborts the upload now. Best effort: the error that led here is the one
    /// worth reporting, and an upload left behind holds no visible object (a
    /// lifecycle rule on the bucket removes it in the end).
    async fn abort(&mut self) {
        if let Some(upload_id) = self.upload_id.take() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.name)
                .upload_id(upload_id)
                .send()
                .await;
        }
    }

    /// The upload completed or was aborted: nothing to do on drop.
    fn disarm(&mut self) {
        self.upload_id = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.upload_id.is_none() {
            return;
        }
        // Without a runtime (the process is exiting) there is nobody to send
        // the request; the lifecycle rule remains.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut this = AbortOnDrop {
                client: self.client.clone(),
                bucket: std::mem::take(&mut self.bucket),
                name: std::mem::take(&mut self.name),
                upload_id: self.upload_id.take(),
            };
            runtime.spawn(async move { this.abort().await });
        }
    }
}

/// The HTTP client of every S3 request: HTTP/1.1 or HTTP/2 over TLS with
/// rustls on ring, trusting the system's roots and `ca_file`, or plain HTTP
/// for an `http://` endpoint.
fn https_client(ca_file: Option<&CaFile>) -> SharedHttpClient {
    let mut trust_store = TrustStore::default();
    if let Some(ca_file) = ca_file {
        trust_store.add_pem_certificate(ca_file.pem().as_bytes());
    }
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(trust_store)
                .build()
                // Building a context only stores what it is given.
                .expect("a TLS context from a trust store"),
        )
        .build_https()
}

/// Every request's timeouts: opening a connection, and one attempt, from
/// sending to the whole answer (for a streamed GET, to its headers).
fn attempt_timeouts(attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(attempt)
        .build()
}

/// The config override for a request sending `body_bytes`: the answer's
/// wait plus the body's time at [`SLOWEST_UPLOAD_BYTES_PER_SECOND`]. (The
/// connect timeout stays as it was, so the SDK keeps using one connection
/// pool.)
fn sending_timeouts(request_timeout: Duration, body_bytes: usize) -> aws_sdk_s3::config::Builder {
    let sending =
        Duration::from_secs_f64(body_bytes as f64 / SLOWEST_UPLOAD_BYTES_PER_SECOND as f64);
    aws_sdk_s3::config::Builder::new().timeout_config(attempt_timeouts(request_timeout + sending))
}

/// Uploads one part and returns what `CompleteMultipartUpload` needs of it.
async fn upload_part(
    storage: S3Storage,
    name: String,
    upload_id: String,
    key: ObjectKey,
    part_number: i32,
    body: Bytes,
) -> Result<CompletedPart, StorageError> {
    let length = body.len();
    let output = storage
        .client
        .upload_part()
        .bucket(storage.bucket)
        .key(name)
        .upload_id(upload_id)
        .part_number(part_number)
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(ByteStream::from(body))
        .customize()
        .config_override(sending_timeouts(storage.request_timeout, length))
        .send()
        .await
        .map_err(|error| backend_error("S3 UploadPart", &key, &error))?;
    Ok(CompletedPart::builder()
        .set_e_tag(output.e_tag)
        .set_checksum_crc32(output.checksum_crc32)
        .part_number(part_number)
        .build())
}

/// Waits for the next part upload to finish.
async fn join_part(
    key: &ObjectKey,
    parts: &mut JoinSet<Result<CompletedPart, StorageError>>,
) -> Result<CompletedPart, StorageError> {
    match parts.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(join_error)) => Err(StorageError::Backend {
            operation: "S3 UploadPart",
            key: key.to_string(),
            message: format!("the upload task ended abnormally: {join_error}"),
        }),
        None => Err(StorageError::Backend {
            operation: "S3 UploadPart",
            key: key.to_string(),
            message: "no part upload was in flight".to_owned(),
        }),
    }
}

/// Reads up to [`PART_SIZE`] bytes; fewer only at the end of the stream.
async fn read_part(
    key: &ObjectKey,
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<Bytes, StorageError> {
    // Allocated once at its final size: growing a Vec by doubling would
    // briefly hold twice the part.
    let mut buffer = vec![0u8; PART_SIZE];
    let mut filled = 0;
    while filled < PART_SIZE {
        let n = reader
            .read(&mut buffer[filled..])
            .await
            .map_err(|source| StorageError::Io {
                key: key.to_string(),
                source,
            })?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buffer.truncate(filled);
    Ok(Bytes::from(buffer))
}

/// Where [`S3Storage::list`] is: the objects of the page fetched last,
/// and how to ask for the next one.
struct ListPages {
    storage: S3Storage,
    /// The listed prefix as an S3 key prefix: the storage's prefix, the
    /// caller's, and a `/`.
    prefix: String,
    /// The caller's prefix, for error messages.
    key: ObjectKey,
    page: std::collections::VecDeque<ListedObject>,
    /// `None` before the first page; `Some(None)` after the last.
    next: Option<Option<String>>,
}

impl ListPages {
    async fn next_object(&mut self) -> Result<Option<ListedObject>, StorageError> {
        loop {
            if let Some(object) = self.page.pop_front() {
                return Ok(Some(object));
            }
            let token = match &self.next {
                None => None,
                Some(None) => return Ok(None),
                Some(Some(token)) => Some(token.clone()),
            };
            let output = self
                .storage
                .client
                .list_objects_v2()
                .bucket(&self.storage.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|error| backend_error("S3 ListObjectsV2", &self.key, &error))?;
            self.next = Some(
                output
                    .next_continuation_token
                    .filter(|_| output.is_truncated == Some(true)),
            );
            for object in output.contents.unwrap_or_default() {
                // Keys outside the storage's prefix or not valid keys were
                // not written through this trait.
                let Some(key) = object
                    .key
                    .as_deref()
                    .and_then(|name| name.strip_prefix(&self.storage.prefix))
                    .and_then(|name| ObjectKey::new(name).ok())
                else {
                    continue;
                };
                let incomplete = |what: &str| StorageError::Backend {
                    operation: "S3 ListObjectsV2",
                    key: key.to_string(),
                    message: format!("the listing has no usable {what}"),
                };
                let size = object
                    .size
                    .and_then(|size| u64::try_from(size).ok())
                    .ok_or_else(|| incomplete("size"))?;
                let last_modified = object
                    .last_modified
                    .and_then(|time| SystemTime::try_from(time).ok())
                    .ok_or_else(|| incomplete("modification time"))?;
                self.page.push_back(ListedObject {
                    key,
                    size,
                    last_modified,
                });
            }
        }
    }
}

/// Checks the prefix's segments like a key's and gives it a trailing `/`.
fn normalise_prefix(prefix: &str) -> Result<String, StorageError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let checked = ObjectKey::new(trimmed)?;
    Ok(format!("{checked}/"))
}

/// The HTTP status of a failed request, when a response came back.
fn status_of<E>(error: &SdkError<E, HttpResponse>) -> Option<u16> {
    error
        .raw_response()
        .map(|response| response.status().as_u16())
}

/// A [`StorageError::Backend`] whose message says what S3 answered (its
/// error code, message and HTTP status) or, when no answer came, the chain of
/// causes, each once.
fn backend_error<E>(
    operation: &'static str,
    key: &ObjectKey,
    error: &SdkError<E, HttpResponse>,
) -> StorageError
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    let message = match (error.code(), status_of(error)) {
        (Some(code), status) => {
            let mut message = code.to_owned();
            if let Some(text) = error.message() {
                message.push_str(": ");
                message.push_str(text);
            }
            if let Some(status) = status {
                message.push_str(&format!(" (HTTP {status})"));
            }
            message
        }
        (None, Some(status)) => format!("HTTP {status}"),
        (None, None) => transport_error(error),
    };
    // 507 Insufficient Storage (MinIO's `XMinioStorageFull` comes with it):
    // the server has no room, which the push endpoints report as such.
    if status_of(error) == Some(507) {
        return StorageError::OutOfSpace {
            key: key.to_string(),
            message,
        };
    }
    StorageError::Backend {
        operation,
        key: key.to_string(),
        message,
    }
}

/// `error: cause: cause...`, skipping a cause that repeats the text before it
/// (the SDK's wrappers often display their source's message themselves).
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// `text` on one line: the SDK lists what its credentials chain tried on
/// lines of their own, which a log line or a CLI error should not split.
fn one_line(text: &str) -> String {
    let mut joined = String::new();
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if !joined.is_empty() {
            joined.push_str(if joined.ends_with(':') { " " } else { "; " });
        }
        joined.push_str(line);
    }
    joined
}

/// The causes of a request that got no answer, with a hint when the
/// server's certificate was not trusted.
fn transport_error(error: &(dyn StdError + 'static)) -> String {
    let chain = error_chain(error);
    let hint = untrusted_certificate_hint(&chain, "[storage] ca-file");
    chain + &hint
}

/// An empty object body, for reads that start at or past the end.
fn empty_reader() -> ObjectReader {
    Box::pin(tokio::io::empty())
}

#[async_trait]
impl Storage for S3Storage {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StorageError> {
        self.put_object(key, data).await
    }

    async fn put_file(
        &self,
        key: &ObjectKey,
        path: &Path,
        size: u64,
        crc32: u32,
    ) -> Result<(), StorageError> {
        // A body streamed from disk is not signed up front, so the request
        // carries the file's CRC-32 in a header for the service to check
        // (left to itself, the SDK would send it as the trailer of a
        // chunked body, which Garage refuses as an invalid signature).
        // Read from the path again for each attempt, so a retry resends it.
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .build()
            .await
            .map_err(|error| StorageError::io(key, std::io::Error::other(error)))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_name(key))
            .body(body)
            .checksum_crc32(BASE64_STANDARD.encode(crc32.to_be_bytes()))
            .customize()
            .config_override(
                sending_timeouts(
                    self.request_timeout,
                    usize::try_from(size).unwrap_or(usize::MAX),
                )
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired),
            )
            .send()
            .await
            .map_err(|error| backend_error("S3 PutObject", key, &error))?;
        Ok(())
    }

    async fn put_reader(
        &self,
        key: &ObjectKey,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, StorageError> {
        let first_part = read_part(key, reader).await?;
        // A short part is the whole body; otherwise a second read tells
        // whether a body of exactly one part ended there.
        let second_part = if first_part.len() < PART_SIZE {
            Bytes::new()
        } else {
            read_part(key, reader).await?
        };
        if second_part.is_empty() {
            // One request, and no upload state to clean up.
            let written = first_part.len() as u64;
            self.put_object(key, first_part).await?;
            return Ok(written);
        }
        self.put_multipart(key, [first_part, second_part], reader)
            .await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ObjectReader, StorageError> {
        let range = match length {
            // S3 would ignore the invalid range `bytes=N-(N-1)` and send the
            // whole object; an empty read only has to prove the object exists.
            Some(0) => {
                return match self.size(key).await? {
                    Some(_) => Ok(empty_reader()),
                    None => Err(StorageError::NotFound(key.clone())),
                }
            }
            Some(length) => Some(format!(
                "bytes={offset}-{}",
                offset.saturating_add(length - 1)
            )),
            None if offset == 0 => None,
            None => Some(format!("bytes={offset}-")),
        };
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_name(key))
            .set_range(range)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Box::pin(output.body.into_async_read())),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                Err(StorageError::NotFound(key.clone()))
            }
            Err(error) => match status_of(&error) {
                Some(404) => Err(StorageError::NotFound(key.clone())),
                // The range starts at or past the end of an existing object:
                // like reading a file past its end, that is no bytes.
                Some(416) => Ok(empty_reader()),
                _ => Err(backend_error("S3 GetObject", key, &error)),
            },
        }
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StorageError> {
        let result = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_name(key))
            .send()
            .await;
        match result {
            Ok(output) => output
                .content_length
                .and_then(|length| u64::try_from(length).ok())
                .map(Some)
                .ok_or_else(|| StorageError::Backend {
                    operation: "S3 HeadObject",
                    key: key.to_string(),
                    message: format!(
                        "the answer has no usable content length ({:?})",
                        output.content_length
                    ),
                }),
            Err(error)
                if error.as_service_error().is_some_and(|e| e.is_not_found())
                    || status_of(&error) == Some(404) =>
            {
                Ok(None)
            }
            Err(error) => Err(backend_error("S3 HeadObject", key, &error)),
        }
    }

    /// A `HeadBucket`: the endpoint answers, the credentials are accepted
    /// and the bucket exists.
    async fn check(&self) -> Result<(), StorageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(error) => {
                let message = match status_of(&error) {
                    // HeadBucket answers carry no body, so no error code.
                    Some(status) => format!("HTTP {status}"),
                    None => transport_error(&error),
                };
                Err(StorageError::Backend {
                    operation: "S3 HeadBucket",
                    key: format!("bucket {}", self.bucket),
                    message,
                })
            }
        }
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let result = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_name(key))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // S3 answers 204 for a missing key; some services say 404.
            Err(error) if status_of(&error) == Some(404) => Ok(()),
            Err(error) => Err(backend_error("S3 DeleteObject", key, &error)),
        }
    }

    /// `ListObjectsV2` pages of up to 1000 keys, fetched as the stream is
    /// read.
    fn list(&self, prefix: &ObjectKey) -> ObjectListing {
        let pages = ListPages {
            storage: self.clone(),
            prefix: format!("{}{prefix}/", self.prefix),
            key: prefix.clone(),
            page: std::collections::VecDeque::new(),
            next: None,
        };
        Box::pin(futures::stream::try_unfold(pages, |mut pages| async move {
            Ok(pages.next_object().await?.map(|object| (object, pages)))
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};

    use super::*;
    use larder_config::Secret;

    fn config(prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some("http://127.0.0.1:1".to_owned()),
            region: Some("garage".to_owned()),
            bucket: "b".to_owned(),
            access_key_id: Some("GKexample".to_owned()),
            secret_access_key: Some(Secret::new("very-secret-value")),
            prefix: prefix.to_owned(),
            force_path_style: None,
            ca_file: None,
            staging_path: None,
            request_timeout: None,
        }
    }

    #[tokio::test]
    async fn prefixes_are_checked_and_end_with_a_slash() {
        let key = ObjectKey::new("chunks/ab/c.zst").expect("key");
        for (prefix, name) in [
            ("", "chunks/ab/c.zst"),
            ("/", "chunks/ab/c.zst"),
            ("larder", "larder/chunks/ab/c.zst"),
            ("larder/x/", "larder/x/chunks/ab/c.zst"),
        ] {
            let storage = S3Storage::new(&config(prefix)).await.expect(prefix);
            assert_eq!(storage.object_name(&key), name);
        }
        for bad in ["../x", "a//b", "a b/"] {
            assert!(matches!(
                S3Storage::new(&config(bad)).await,
                Err(StorageError::InvalidKey { .. })
            ));
        }
    }

    /// Records each request's URI and stops it before it is sent.
    #[derive(Debug, Default)]
    struct RecordUri(Arc<Mutex<Vec<String>>>);

    impl Intercept for RecordUri {
        fn name(&self) -> &'static str {
            "RecordUri"
        }

        fn read_before_transmit(
            &self,
            context: &BeforeTransmitInterceptorContextRef<'_>,
            _runtime_components: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), aws_sdk_s3::error::BoxError> {
            let mut uris = self.0.lock().expect("an unpoisoned lock");
            uris.push(context.request().uri().to_owned());
            Err("recorded, not sent".into())
        }
    }

    /// The URI the storage's client would send a `HeadObject` of `key` to.
    async fn uri_of_a_request(config: &S3Config) -> String {
        let storage = S3Storage::new(config).await.expect("storage");
        let uris = Arc::new(Mutex::new(Vec::new()));
        let client = Client::from_conf(
            storage
                .client
                .config()
                .to_builder()
                .interceptor(RecordUri(uris.clone()))
                .build(),
        );
        let stopped = client
            .head_object()
            .bucket(&storage.bucket)
            .key("k")
            .send()
            .await;
        assert!(stopped.is_err(), "the interceptor stops every request");
        let uris = uris.lock().expect("an unpoisoned lock");
        uris.first().cloned().expect("one request was recorded")
    }

    #[tokio::test]
    async fn addressing_is_path_style_with_an_endpoint_and_virtual_hosted_on_aws() {
        // A name that can be a host name's label: S3's rules send others
        // path-style whatever the setting.
        let mut s3 = S3Config {
            bucket: "larder-bucket".to_owned(),
            ..config("")
        };
        s3.endpoint = Some("https://s3.example.com".to_owned());
        assert_eq!(
            uri_of_a_request(&s3).await,
            "https://s3.example.com/larder-bucket/k"
        );
        s3.force_path_style = Some(false);
        assert_eq!(
            uri_of_a_request(&s3).await,
            "https://larder-bucket.s3.example.com/k"
        );

        let mut aws = s3.clone();
        aws.force_path_style = None;
        aws.endpoint = None;
        aws.region = Some("eu-west-3".to_owned());
        assert_eq!(
            uri_of_a_request(&aws).await,
            "https://larder-bucket.s3.eu-west-3.amazonaws.com/k"
        );
        aws.force_path_style = Some(true);
        assert_eq!(
            uri_of_a_request(&aws).await,
            "https://s3.eu-west-3.amazonaws.com/larder-bucket/k"
        );
    }

    #[tokio::test]
    async fn an_unusable_ca_file_stops_the_opening() {
        let mut s3 = config("");
        s3.endpoint = Some("https://s3.example.com".to_owned());
        s3.ca_file = Some("/nonexistent/ca.pem".into());
        let error = S3Storage::new(&s3).await.expect_err("no such CA file");
        let shown = error.to_string();
        assert!(shown.contains("/nonexistent/ca.pem"), "{shown}");
        assert!(shown.contains("No such file"), "{shown}");
    }

    #[test]
    fn multi_line_causes_become_one_line() {
        assert_eq!(
            one_line("no credentials. Attempted:\n  Environment: not set\n  Profile: none\n"),
            "no credentials. Attempted: Environment: not set; Profile: none"
        );
    }

    #[tokio::test]
    async fn debug_never_shows_the_secret() {
        let storage = S3Storage::new(&config("p")).await.expect("storage");
        let shown = format!("{storage:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(shown.contains("GKexample"), "{shown}");
    }
}
