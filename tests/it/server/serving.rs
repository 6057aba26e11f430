//! The binary-cache protocol's details that Nix is strict about: narinfo
//! fields and the final newline, HEAD, NAR length and encoding. (A chunk
//! missing from storage is `abuse::reads`'s: the download is cut short.)

use larder_nix::{Compression, NarInfo, PublicKey, StoreDir};
use larder_token::Permission;
use reqwest::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use tests::server::{TestServer, SEED_CHUNK_SIZE};

use super::{api_error, fake_store_path, file_nar, get, ok_bytes, plain_metadata, HOUR};
use tests::server::pseudo_random;

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<&str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[tokio::test]
async fn narinfos_and_nars_are_served_as_nix_expects() {
    let server = TestServer::sqlite().await;
    let cache = server.create_cache("served", false).await;
    let store_path = fake_store_path("big");
    let reference = fake_store_path("dep");
    let nar = file_nar(&pseudo_random(3 * SEED_CHUNK_SIZE + 100, 7));
    let mut metadata = plain_metadata(&store_path);
    metadata.references = vec![reference["/nix/store/".len()..].to_owned()];
    metadata.deriver = Some(format!(
        "{}.drv",
        &fake_store_path("big")["/nix/store/".len()..]
    ));
    metadata.system = Some("x86_64-linux".to_owned());
    let seeded = server.seed_path("served", metadata, &nar).await;
    assert_eq!(seeded.nar.n_chunks, 4);
    let token = server
        .mint("reader", HOUR, &[("served", &[Permission::Pull])])
        .await;
    let narinfo_path = format!("/served/{}.narinfo", seeded.store_path_hash);

    let info = ok_bytes(get(&server, "/served/nix-cache-info", Some(&token)).await).await;
    let info = String::from_utf8(info).expect("text");
    assert!(info.starts_with("StoreDir: /nix/store\n"), "{info}");
    assert!(info.contains("Priority: 41\n"), "{info}");

    let response = get(&server, &narinfo_path, Some(&token)).await;
    assert_eq!(header(&response, CONTENT_TYPE), Some("text/x-nix-narinfo"));
    let text = String::from_utf8(ok_bytes(response).await).expect("a text narinfo");
    assert!(
        text.ends_with('\n'),
        "Nix rejects a narinfo without a final newline: {text:?}"
    );
    assert!(!text.contains('\r'), "{text:?}");
    let store_dir = StoreDir::default();
    let narinfo = NarInfo::parse(&text, &store_dir).expect("a narinfo Nix would read");
    assert_eq!(narinfo.store_path.to_full_path(&store_dir), store_path);
    assert_eq!(narinfo.url, seeded.nar_url());
    assert_eq!(narinfo.compression, Compression::Zstd);
    assert_eq!(narinfo.nar_hash, seeded.nar.nar_hash);
    assert_eq!(narinfo.nar_size, nar.len() as u64);
    assert_eq!(narinfo.references.len(), 1);
    assert!(narinfo.deriver.is_some());
    assert_eq!(narinfo.system.as_deref(), Some("x86_64-linux"));
    let key = larder_nix::SecretKey::parse(cache.keypair.expose_secret()).expect("the cache's key");
    let public: PublicKey = key.to_public();
    assert!(
        narinfo.verify(&[public], &store_dir),
        "signed with the cache's key: {text}"
    );

    // HEAD: the same status and headers, no body.
    let head = server
        .http()
        .head(server.url_of(&narinfo_path))
        .bearer_auth(&token)
        .send()
        .await
        .expect("HEAD narinfo");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, CONTENT_TYPE), Some("text/x-nix-narinfo"));
    assert_eq!(head.bytes().await.expect("the HEAD body").len(), 0);
    let raw_head = server
        .raw_request(
            "HEAD",
            &narinfo_path,
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .await;
    assert_eq!(raw_head.status, 200);
    assert_eq!(
        raw_head.header("content-length"),
        Some(text.len().to_string().as_str())
    );

    // The NAR: its length is the narinfo's FileSize, it carries no
    // Content-Encoding (Nix would decode twice), and it decompresses to
    // the NAR.
    let response = get(&server, &format!("/served/{}", narinfo.url), Some(&token)).await;
    assert_eq!(
        header(&response, CONTENT_ENCODING),
        None,
        "{:?}",
        response.headers()
    );
    let content_length: u64 = header(&response, CONTENT_LENGTH)
        .expect("a Content-Length")
        .parse()
        .expect("a number");
    assert_eq!(Some(content_length), narinfo.file_size);
    let compressed = ok_bytes(response).await;
    assert_eq!(compressed.len() as u64, content_length);
    let decompressed = zstd::stream::decode_all(compressed.as_slice()).expect("zstd frames");
    assert_eq!(decompressed, nar);

    // Unknown NARs and paths in an existing, readable cache are 404s.
    let other_nar = format!(
        "/served/nar/{}.nar.zst",
        larder_nix::Sha256Hash::digest(b"no such NAR").to_base32()
    );
    let (error, _) = api_error(
        get(&server, &other_nar, Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(error.error, "NoSuchPath");
    let missing = format!(
        "/served/{}.narinfo",
        fake_store_path("x")["/nix/store/".len()..][..32].to_owned()
    );
    let (error, _) = api_error(
        get(&server, &missing, Some(&token)).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(error.error, "NoSuchPath");
}

/// `GET /` tells a person who opens the URL what this is and how to use it.
#[tokio::test]
async fn the_landing_page_says_what_this_server_is() {
    let server = TestServer::sqlite().await;
    let response = get(&server, "/", None).await;
    assert_eq!(
        header(&response, CONTENT_TYPE),
        Some("text/html; charset=utf-8")
    );
    let page = String::from_utf8(ok_bytes(response).await).expect("HTML text");
    assert!(page.contains("Nix</a> binary cache"), "{page}");
    assert!(
        page.contains(&format!("larder login myserver {}/", server.url())),
        "{page}"
    );
}
