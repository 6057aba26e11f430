//! The door (issue #12, items 1–3): what one upload may make the server
//! decode, write and hold, and that uploads stalled on the network take
//! no thread another tenant needs.
//!
//! Each test runs the real server with local storage and watches the
//! staging directory, where verified NAR bytes land as they are decoded.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use larder_api::v1::{UploadPathResult, UploadPathResultKind};
use larder_nix::nar::NarEncoder;
use larder_nix::Sha256Hash;
use larder_token::Permission;
use larder_verify::{RATIO_ALLOWANCE, XZ_MEMORY_LIMIT};
use reqwest::{Response, StatusCode};
use tests::prometheus;
use tests::server::{pseudo_random, TestServer, TestServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::push::{attic_info, upload, Form};
use crate::server::{api_error, fake_store_path, file_nar, get, ok_json, plain_metadata, HOUR};

const ATTACKER: &str = "attacker";
const VICTIM: &str = "victim";

/// A hang guard: far longer than anything here takes.
const PATIENCE: Duration = Duration::from_secs(120);

async fn token_for(server: &TestServer, cache: &str) -> String {
    server
        .mint(
            cache,
            HOUR,
            &[(cache, &[Permission::Pull, Permission::Push])],
        )
        .await
}

/// The server's staging directory.
fn staging(server: &TestServer) -> PathBuf {
    server.dir().join("storage").join("staging")
}

/// The bytes of every file under `dir`, temporary files of writes in
/// progress included.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// Samples the staging directory's size every millisecond until dropped,
/// keeping the largest seen.
struct StagingWatch {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StagingWatch {
    fn start(server: &TestServer) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let dir = staging(server);
        let task = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(bytes_under(&dir), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        Self { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for StagingWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A NAR of one file of `size` zero bytes, compressed as it is written.
fn zeros_nar_into<W: Write>(size: u64, out: W) -> W {
    let mut encoder = NarEncoder::new(out).expect("a writer");
    encoder
        .regular_from_reader(false, size, &mut std::io::repeat(0).take(size))
        .expect("a file");
    encoder.finish().expect("a NAR")
}

/// `PUT /attacker/nar/<FileHash>.nar.<extension>` with the body's real
/// file hash, as `nix copy` sends it.
async fn put_nar_file(
    server: &TestServer,
    token: &str,
    extension: &str,
    body: Vec<u8>,
) -> Response {
    let file_hash = Sha256Hash::digest(&body).to_base32();
    server
        .http()
        .put(server.url_of(&format!("/{ATTACKER}/nar/{file_hash}.nar.{extension}")))
        .basic_auth("", Some(token))
        .body(body)
        .send()
        .await
        .expect("sending a PUT")
}

/// A decompression bomb: 1 GiB of zeros in a NAR that compresses to a few
/// dozen KB. Before the door bounded the ratio it was answered 204 after
/// writing the whole GiB to staging.
async fn bomb_is_refused_and_staging_stays_small(extension: &str, bomb: Vec<u8>) {
    let server = TestServer::sqlite().await;
    server.create_cache(ATTACKER, false).await;
    let token = token_for(&server, ATTACKER).await;
    let ratio = u64::from(server.config().ingest.max_decompression_ratio);
    let sent = bomb.len() as u64;
    let bound = ratio * sent + RATIO_ALLOWANCE;
    assert!(
        bound < (1 << 30) / 4,
        "the bomb is too weak to test the bound"
    );

    let watch = StagingWatch::start(&server);
    let response = tokio::time::timeout(PATIENCE, put_nar_file(&server, &token, extension, bomb))
        .await
        .expect("the bomb is answered");
    let (error, _) = api_error(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(
        error.message.contains("max-decompression-ratio"),
        "{}",
        error.message
    );
    // Staging never held more than the ratio allows for the bytes sent;
    // without the bound it held the whole GiB.
    let peak = watch.peak();
    assert!(
        peak <= bound,
        "staging reached {peak} bytes for {sent} sent (bound {bound})"
    );
    drop(watch);
    assert_eq!(
        bytes_under(&staging(&server)),
        0,
        "the rejected NAR is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_zstd_bomb_is_refused_and_staging_stays_small() {
    let bomb = zeros_nar_into(
        1 << 30,
        zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd"),
    )
    .finish()
    .expect("zstd");
    bomb_is_refused_and_staging_stays_small("zst", bomb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_an_xz_bomb_is_refused_and_staging_stays_small() {
    let bomb = zeros_nar_into(1 << 30, liblzma::write::XzEncoder::new(Vec::new(), 0))
        .finish()
        .expect("xz");
    bomb_is_refused_and_staging_stays_small("xz", bomb).await;
}

/// An xz stream whose LZMA2 dictionary property says `dictionary` (40 is
/// 4 GiB - 1), the block header's CRC-32 fixed to match; the data is as a
/// small-dictionary encoder wrote it.
fn xz_declaring_dictionary(data: &[u8], dictionary: u8) -> Vec<u8> {
    let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 0);
    encoder.write_all(data).expect("xz");
    let mut stream = encoder.finish().expect("xz");
    // After the 12-byte stream header: the block header's size, its flags
    // (one filter, no sizes), the LZMA2 filter ID and 1-byte properties.
    let header_len = (usize::from(stream[12]) + 1) * 4;
    assert_eq!(stream[13..16], [0x00, 0x21, 0x01], "a simple block header");
    stream[16] = dictionary;
    let crc_at = 12 + header_len - 4;
    let crc = crc32fast::hash(&stream[12..crc_at]);
    stream[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    stream
}

/// A stream declaring a 4 GiB dictionary was accepted (and its decoder
/// could hold that much) before the decoders had memory limits; a zstd
/// window past what Nix writes is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoder_memory_past_what_nix_writes_is_refused() {
    let server = TestServer::sqlite().await;
    server.create_cache(ATTACKER, false).await;
    let token = token_for(&server, ATTACKER).await;
    // Contents that compress to a body of a few hundred bytes, sent whole
    // before the server reads the header it refuses: a longer body raced
    // the refusal, the server closing its end while the client still wrote
    // (a broken pipe instead of the answer).
    let nar = file_nar(&[0; 50_000]);

    let response = put_nar_file(&server, &token, "xz", xz_declaring_dictionary(&nar, 40)).await;
    let (error, _) = api_error(response, StatusCode::BAD_REQUEST).await;
    assert!(
        error
            .message
            .contains(&format!("limit of {XZ_MEMORY_LIMIT} bytes")),
        "{}",
        error.message
    );

    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    encoder
        .set_parameter(zstd::stream::raw::CParameter::WindowLog(28))
        .expect("a window log");
    encoder.write_all(&nar).expect("zstd");
    let wide = encoder.finish().expect("zstd");
    let response = put_nar_file(&server, &token, "zst", wide).await;
    let (error, _) = api_error(response, StatusCode::BAD_REQUEST).await;
    assert!(
        error.message.contains("limit of 134217728 bytes"),
        "{}",
        error.message
    );
    assert_eq!(bytes_under(&staging(&server)), 0);

    // What Nix writes at its defaults still goes through.
    let response = put_nar_file(&server, &token, "xz", xz_declaring_dictionary(&nar, 28)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// Writes an HTTP/1.1 request head for `path` announcing a body of
/// `content_length` bytes.
fn request_head(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: usize,
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {content_length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Reads one response (head and Content-Length body) off `reader`.
async fn read_response(reader: &mut (impl AsyncReadExt + Unpin)) -> (u16, String) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        let n = reader
            .read(&mut buffer)
            .await
            .expect("reading the response");
        assert!(n > 0, "the connection closed without a response");
        received.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while received.len() < head_end + length {
        let n = reader.read(&mut buffer).await.expect("reading the body");
        assert!(n > 0, "the connection closed inside the body");
        received.extend_from_slice(&buffer[..n]);
    }
    let body = String::from_utf8_lossy(&received[head_end..head_end + length]).into_owned();
    (status, body)
}

/// An Attic upload whose body runs past the `nar_size` it declared is
/// refused at the first byte past it, which is never written: staging
/// holds at most the declared size. Before, the whole body was spooled
/// first and only its size compared at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_its_declared_nar_size_stops_there() {
    let server = TestServer::sqlite().await;
    server.create_cache(ATTACKER, false).await;
    let token = token_for(&server, ATTACKER).await;
    let nar = file_nar(&pseudo_random(8 << 20, 11));
    let declared: u64 = 1 << 20;
    let mut info = attic_info(ATTACKER, &fake_store_path("long"), &nar);
    info["nar_size"] = declared.into();

    let watch = StagingWatch::start(&server);
    let stream = TcpStream::connect(server.address())
        .await
        .expect("connecting");
    let (mut reader, mut writer) = stream.into_split();
    let head = request_head(
        server.address(),
        "PUT",
        "/_api/v1/upload-path",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("X-Attic-Nar-Info", &info.to_string()),
            ("X-Larder-Wait", "0"),
        ],
        nar.len(),
    );
    // Half the body, then nothing more: the server must answer from what
    // it has, without waiting for the rest.
    let half = nar[..nar.len() / 2].to_vec();
    let sender = tokio::spawn(async move {
        writer.write_all(&head).await.expect("the head");
        // The server stops reading once it refused the body.
        let _ = writer.write_all(&half).await;
        writer
    });
    let answered = async {
        tokio::select! {
            response = read_response(&mut reader) => response,
            () = async {
                while watch.peak() <= declared {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            } => panic!("staging grew past the declared NarSize to {} bytes", watch.peak()),
        }
    };
    let (status, body) = tokio::time::timeout(PATIENCE, answered)
        .await
        .expect("the upload is answered without the rest of its body");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("NarSize declares"), "{body}");
    assert!(watch.peak() <= declared, "staging reached {}", watch.peak());
    drop(watch);
    sender.abort();
    // The refused bytes are gone from staging (deleted before the answer).
    assert_eq!(bytes_under(&staging(&server)), 0);
}

/// Opens an upload of a NAR file that sends its head and the first bytes
/// of `body`, announcing all of it, and then stalls.
async fn stalled_upload(address: SocketAddr, token: &str, body: &[u8]) -> TcpStream {
    let path = format!(
        "/{ATTACKER}/nar/{}.nar.zst",
        Sha256Hash::digest(body).to_base32()
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(":{token}"));
    let mut stream = TcpStream::connect(address).await.expect("connecting");
    let head = request_head(
        address,
        "PUT",
        &path,
        &[("Authorization", &format!("Basic {basic}"))],
        body.len(),
    );
    stream.write_all(&head).await.expect("the head");
    stream
        .write_all(&body[..STALLED_BYTES])
        .await
        .expect("the first bytes");
    stream
}

/// What each stalled upload sends of its body.
const STALLED_BYTES: usize = 64;

/// More stalled uploads than the runtime has blocking threads: before the
/// door received asynchronously, each parked a blocking thread, which
/// local storage I/O also needs, so another tenant's NAR download and
/// upload got no answer at all.
#[test]
fn heavy_stalled_uploads_do_not_starve_other_tenants() {
    const BLOCKING_THREADS: usize = 8;
    const STALLED: usize = 40;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        // Upload slots for all of them: the point is uploads the door is
        // reading, not ones waiting for a slot (the limits have their own
        // tests in `abuse::http`).
        let server = TestServer::start(TestServerOptions {
            edit_config: Some(Arc::new(|config| {
                config.http.max_concurrent_uploads_per_token = 2 * STALLED as u32;
                config.http.max_concurrent_uploads = 4 * STALLED as u32;
            })),
            ..TestServerOptions::default()
        })
        .await;
        server.create_cache(ATTACKER, false).await;
        server.create_cache(VICTIM, false).await;
        let attacker = token_for(&server, ATTACKER).await;
        let victim = token_for(&server, VICTIM).await;
        let stored_nar = file_nar(&pseudo_random(300_000, 3));
        let stored = server
            .seed_path(
                VICTIM,
                plain_metadata(&fake_store_path("stored")),
                &stored_nar,
            )
            .await;

        let body = zstd::bulk::compress(&file_nar(&pseudo_random(1 << 20, 5)), 3).expect("zstd");
        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            stalled.push(stalled_upload(server.address(), &attacker, &body).await);
        }
        // Every stalled upload's first bytes have been read by the server:
        // all of them are inside the door.
        let route = [("route", "/{cache}/nar/{file}"), ("method", "PUT")];
        let inside = async {
            loop {
                let text = get(&server, "/metrics", None)
                    .await
                    .text()
                    .await
                    .expect("/metrics");
                let page = prometheus::parse(&text).expect("a metrics page");
                if page.get("larder_http_request_body_bytes_total", &route)
                    >= Some((STALLED * STALLED_BYTES) as f64)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, inside)
            .await
            .expect("the server reads every stalled upload's first bytes");

        // The victim's NAR download.
        let download = async {
            let response = get(
                &server,
                &format!("/{VICTIM}/{}", stored.nar_url()),
                Some(&victim),
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK);
            response.bytes().await.expect("the NAR")
        };
        let served = tokio::time::timeout(PATIENCE, download)
            .await
            .expect("another tenant's NAR download completes beside the stalled uploads");
        assert_eq!(
            zstd::stream::decode_all(served.as_ref()).expect("zstd frames"),
            stored_nar
        );

        // The victim's upload, acknowledged, then visible.
        let pushed_path = fake_store_path("pushed");
        let pushed_nar = file_nar(&pseudo_random(200_000, 9));
        let info = attic_info(VICTIM, &pushed_path, &pushed_nar);
        let pushed = async {
            ok_json::<UploadPathResult>(
                upload(&server, Some(&victim), &info, &pushed_nar, Form::Header).await,
            )
            .await
        };
        let result = tokio::time::timeout(PATIENCE, pushed)
            .await
            .expect("another tenant's upload completes beside the stalled uploads");
        assert_eq!(result.kind, UploadPathResultKind::Uploaded);
        let narinfo = format!("/{VICTIM}/{}.narinfo", &pushed_path[11..43]);
        let visible = async {
            while get(&server, &narinfo, Some(&victim)).await.status() != StatusCode::OK {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(PATIENCE, visible)
            .await
            .expect("the pipeline makes the upload visible beside the stalled uploads");

        // The stalled uploads were open all along, and still are: no
        // answer, no close, and each one's staged object still being
        // written.
        for stream in &stalled {
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("a stalled upload was answered or closed: {other:?}"),
            }
        }
        let in_progress = std::fs::read_dir(staging(&server))
            .expect("the staging directory")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(in_progress, STALLED);
        drop(stalled);
        drop(server);
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
}
