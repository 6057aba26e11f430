//! Nix formats checked against the real Nix client.
//!
//! `larder_nix` claims to write and read NARs, `.ls` listings, narinfos and
//! signatures exactly as Nix 2.8 does; these tests hold it to that by
//! comparing with what the real `nix-store`, `nix copy` and
//! `nix store verify` produce and accept. Every test makes its own isolated
//! Nix environment (`tests::nix::NixEnv`) and fails if `nix` is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use larder_nix::nar::{self, NarReader};
use larder_nix::{
    Compression, NarHash, NarInfo, PublicKey, SecretKey, Sha256Hash, StoreDir, StorePath,
};
use tests::nix::{
    cache_files, file_cache_url, physical_path, symlink, write_file, NixEnv, NixVersion, TestStore,
};

/// Just over 16 MiB, so the NAR holds a file larger than any buffer.
const BIG_FILE_LEN: usize = 16 * 1024 * 1024 + 5;

/// A tree with every kind of node Nix knows: regular, executable and
/// empty files, relative and absolute symlinks, nested and empty
/// directories, names that are not ASCII or that test the bytewise sort,
/// and a file over 16 MiB; with `non_utf8_name`, a name that is not UTF-8.
fn make_fixture_tree(root: &Path, non_utf8_name: bool) -> Result<()> {
    std::fs::create_dir_all(root.join("nested/deeper/deepest"))?;
    std::fs::create_dir_all(root.join("empty-dir"))?;
    std::fs::create_dir_all(root.join("sorting"))?;
    write_file(&root.join("regular.txt"), b"hello, nix\n", false)?;
    write_file(&root.join("script.sh"), b"#!/bin/sh\necho hi\n", true)?;
    write_file(&root.join("empty"), b"", false)?;
    write_file(&root.join("eight-bytes"), b"12345678", false)?;
    write_file(&root.join("nested/deeper/deepest/leaf"), b"leaf", true)?;
    write_file(
        &root.join("ünïcødé-名前.txt"),
        "non-ASCII ✓".as_bytes(),
        false,
    )?;
    for name in ["a", "a.b", "a-b", "aa", "B", "Z", "_", "~"] {
        write_file(&root.join("sorting").join(name), name.as_bytes(), false)?;
    }
    symlink("regular.txt", &root.join("link-relative"))?;
    symlink(
        "/nix/store/00000000000000000000000000000000-missing",
        &root.join("link-absolute"),
    )?;
    symlink("../../regular.txt", &root.join("nested/deeper/up"))?;
    // Names and targets that need JSON escapes in the listing, and a name
    // that is not UTF-8 (Nix copies such bytes raw; Nix 2.8 writes them raw
    // into a listing too, a current Nix cannot list them at all).
    std::fs::create_dir_all(root.join("escapes"))?;
    for name in [
        "tab\there",
        "new\nline",
        "quote\"back\\slash",
        "ctl\u{1}\u{1f}\u{7f}",
    ] {
        write_file(&root.join("escapes").join(name), b"x", false)?;
    }
    if non_utf8_name {
        use std::os::unix::ffi::OsStrExt;
        let latin1 = std::ffi::OsStr::from_bytes(b"latin1-\xe9");
        write_file(&root.join("escapes").join(latin1), b"not UTF-8", false)?;
    }
    symlink("tar\"get\\\u{1}/\u{e9}", &root.join("escapes/odd-link"))?;
    write_file(
        &root.join("big.bin"),
        &tests::server::pseudo_random(BIG_FILE_LEN, 0x5eed),
        false,
    )?;
    Ok(())
}

/// Reads a whole NAR with our strict reader.
fn read_nar(bytes: &[u8], with_listing: bool) -> Result<nar::NarSummary> {
    let mut reader = if with_listing {
        NarReader::with_listing()
    } else {
        NarReader::new()
    };
    // Odd-sized chunks, as an upload would arrive.
    for chunk in bytes.chunks(65_537) {
        reader.update(chunk)?;
    }
    Ok(reader.finish()?)
}

fn ensure_same_bytes(ours: &[u8], theirs: &[u8], what: &str) -> Result<()> {
    if ours != theirs {
        let first_difference = ours.iter().zip(theirs).position(|(a, b)| a != b);
        bail!(
            "{what}: ours is {} bytes, Nix's {} bytes, first difference at {first_difference:?}",
            ours.len(),
            theirs.len()
        );
    }
    Ok(())
}

fn store_dir() -> StoreDir {
    StoreDir::default()
}

fn parse_store_path(full: &str) -> Result<StorePath> {
    Ok(store_dir().parse_path(full)?)
}

/// The narinfo file of `path` in a `file://` cache directory.
fn narinfo_file(cache: &Path, path: &str) -> Result<PathBuf> {
    Ok(cache.join(format!("{}.narinfo", parse_store_path(path)?.hash())))
}

fn read_narinfo(cache: &Path, path: &str) -> Result<(String, NarInfo)> {
    let file = narinfo_file(cache, path)?;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let info = NarInfo::parse(&text, &store_dir())
        .with_context(|| format!("parsing {}", file.display()))?;
    Ok((text, info))
}

/// Decompresses a cached NAR file with the system tool for `compression`.
fn decompress(file: &Path, compression: &Compression) -> Result<Vec<u8>> {
    let tool = match compression {
        Compression::None => return Ok(std::fs::read(file)?),
        Compression::Xz => "xz",
        Compression::Zstd => "zstd",
        other => bail!("no decompressor for {other}"),
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("running {tool}"))?;
    ensure!(
        output.status.success(),
        "{tool} -dc {} failed",
        file.display()
    );
    Ok(output.stdout)
}

tests::under_each_nix! {
    #[test]
    fn nix_our_nar_of_a_fixture_tree_is_byte_identical_to_nix_store_dump(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let tree = env.path("fixture");
        make_fixture_tree(&tree, true)?;

        let theirs = env.dump(&tree)?;
        let ours = nar::dump_path(&tree, Vec::new())?;
        ensure_same_bytes(&ours, &theirs, "NAR of the fixture tree")?;
        ensure!(theirs.len() > BIG_FILE_LEN, "the NAR holds the big file");

        // Nix's own NAR hash of the tree is what our reader computes.
        let nix_hash = env.run_text(
            "nix-hash",
            &[
                "--type",
                "sha256",
                "--base32",
                tree.to_str().context("UTF-8")?,
            ],
        )?;
        let summary = read_nar(&theirs, false)?;
        assert_eq!(summary.nar_hash.to_string(), format!("sha256:{nix_hash}"));
        assert_eq!(summary.nar_size, theirs.len() as u64);

        // Roots that are not directories.
        for root in [
            "regular.txt",
            "script.sh",
            "empty",
            "link-relative",
            "big.bin",
        ] {
            let path = tree.join(root);
            let theirs = env.dump(&path)?;
            ensure_same_bytes(&nar::dump_path(&path, Vec::new())?, &theirs, root)?;
            read_nar(&theirs, true)?;
        }
        Ok(())
    }
}

tests::under_each_nix! {
    #[test]
    fn nix_our_listing_equals_the_ls_nix_writes(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let tree = env.path("fixture");
        make_fixture_tree(&tree, version == NixVersion::Debian)?;
        let store_root = env.path("store");
        let fixture_path = env.add_path(&store_root, &tree)?;
        let store = env.make_store(&store_root, 6, "listing")?;
        let mut paths = store.paths.clone();
        paths.push(fixture_path);

        let cache = env.path("cache");
        env.copy_to(
            &store_root,
            &file_cache_url(&cache, "compression=none&write-nar-listing=true"),
            &paths,
        )?;
        let listings = cache_files(&cache, ".ls")?;
        let closure = env.closure(&store_root, &paths)?;
        ensure!(
            listings.len() == closure.len(),
            "Nix wrote {} listings for {} paths",
            listings.len(),
            closure.len()
        );
        for ls_file in listings {
            let nix_listing = std::fs::read(&ls_file)?;
            let narinfo_path = ls_file.with_extension("narinfo");
            let info = NarInfo::parse(&std::fs::read_to_string(&narinfo_path)?, &store_dir())?;
            let nar_bytes = std::fs::read(cache.join(&info.url))?;
            let listing = read_nar(&nar_bytes, true)?
                .listing
                .context("a listing was asked for")?;
            let ours = listing.to_json();
            ensure!(
                tests::nix::same_listing(version, &ours, &nix_listing),
                "listing {}: ours is {}, Nix wrote {}",
                ls_file.display(),
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&nix_listing)
            );
        }
        Ok(())
    }
}

tests::under_each_nix! {
    #[test]
    fn nix_reader_accepts_every_nar_nix_produces(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let store = env.make_store(&env.path("store"), 12, "reader")?;
        let closure = env.closure(&store.root, &store.paths)?;
        ensure!(closure.len() >= 12, "closure of {} paths", closure.len());
        for path in &closure {
            let physical = store.physical_path(path);
            let theirs = env.dump(&physical)?;
            let summary =
                read_nar(&theirs, true).with_context(|| format!("reading the NAR of {path}"))?;
            assert_eq!(
                summary.nar_hash.to_string(),
                env.nar_hash(&store.root, path)?,
                "{path}"
            );
            assert_eq!(summary.nar_size, env.nar_size(&store.root, path)?, "{path}");
            // And our serialiser agrees on the store's own files.
            ensure_same_bytes(&nar::dump_path(&physical, Vec::new())?, &theirs, path)?;
        }
        Ok(())
    }
}

tests::under_each_nix! {
    #[test]
    fn nix_narinfos_written_by_nix_copy_parse_and_render_identically(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let store = env.make_store(&env.path("store"), 9, "narinfo")?;
        let closure = env.closure(&store.root, &store.paths)?;
        for (query, compression) in [
            ("compression=none", Compression::None),
            ("compression=xz", Compression::Xz),
            ("compression=zstd", Compression::Zstd),
        ] {
            let cache = env.path(&format!("cache-{compression}"));
            env.copy_to(&store.root, &file_cache_url(&cache, query), &store.paths)?;
            assert_eq!(
                std::fs::read_to_string(cache.join("nix-cache-info"))?,
                "StoreDir: /nix/store\n"
            );
            ensure!(cache_files(&cache, ".narinfo")?.len() == closure.len());
            for path in &closure {
                let (text, info) = read_narinfo(&cache, path)?;
                assert_eq!(info.render(&store_dir()), text, "{path} ({compression})");
                assert_eq!(info.store_path.to_full_path(&store_dir()), *path);
                assert_eq!(info.compression, compression);

                // The file Nix wrote is the one the narinfo describes.
                let file = cache.join(&info.url);
                let file_bytes =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                assert_eq!(info.file_size, Some(file_bytes.len() as u64));
                assert_eq!(info.file_hash, Some(Sha256Hash::digest(&file_bytes)));
                assert_eq!(
                    info.url,
                    format!(
                        "nar/{}{}",
                        info.file_hash.context("FileHash")?.to_base32(),
                        compression.nar_extension()
                    )
                );

                // The NAR inside is valid and matches NarHash and NarSize.
                let summary = read_nar(&decompress(&file, &compression)?, false)?;
                assert_eq!(summary.nar_hash, info.nar_hash, "{path}");
                assert_eq!(summary.nar_size, info.nar_size, "{path}");
                assert_eq!(info.nar_hash.to_string(), env.nar_hash(&store.root, path)?);

                let references: Vec<String> = info
                    .references
                    .iter()
                    .map(|r| r.to_full_path(&store_dir()))
                    .collect();
                assert_eq!(references, env.references(&store.root, path)?, "{path}");
                if store.built.contains(path) {
                    ensure!(
                        info.deriver.is_some() && info.ca.is_none(),
                        "{path} is input-addressed"
                    );
                } else {
                    ensure!(info.ca.is_some(), "{path} is content-addressed");
                }
            }
        }
        Ok(())
    }
}

/// Runs `nix store verify --sigs-needed 1` on `path` in a `file://` cache,
/// trusting only `public_key`; returns whether Nix accepted it and what it
/// said.
fn nix_verify(env: &NixEnv, cache: &Path, public_key: &str, path: &str) -> Result<(bool, String)> {
    let output = env.store_verify(&file_cache_url(cache, ""), public_key, &[path.to_owned()])?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A store whose only built output is `store.built[0]`, copied unsigned
/// to a `file://` cache.
fn unsigned_cache(env: &NixEnv, salt: &str) -> Result<(TestStore, PathBuf, String)> {
    let store = env.make_store(&env.path("store"), 3, salt)?;
    let built = store
        .built
        .first()
        .context("make_store(3) builds one output")?
        .clone();
    let cache = env.path("cache");
    env.copy_to(
        &store.root,
        &file_cache_url(&cache, "compression=none"),
        &store.paths,
    )?;
    Ok((store, cache, built))
}

tests::under_each_nix! {
    #[test]
    fn nix_narinfo_signed_by_us_passes_nix_store_verify(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let keys = env.keygen("larder-test-1")?;
        let secret = SecretKey::parse(&keys.secret_key)?;
        let public = PublicKey::parse(&keys.public_key)?;
        assert_eq!(
            secret.to_public(),
            public,
            "our public key is the one Nix derives"
        );

        let (_store, cache, built) = unsigned_cache(&env, "our-signature")?;
        let (_, mut info) = read_narinfo(&cache, &built)?;
        ensure!(info.signatures.is_empty() && info.ca.is_none() && !info.references.is_empty());

        // Unsigned, an input-addressed path fails: the check below means something.
        let (accepted, said) = nix_verify(&env, &cache, &keys.public_key, &built)?;
        ensure!(!accepted, "Nix accepted an unsigned path: {said}");

        info.sign(&secret, &store_dir());
        assert!(info.verify(std::slice::from_ref(&public), &store_dir()));
        std::fs::write(narinfo_file(&cache, &built)?, info.render(&store_dir()))?;
        let (accepted, said) = nix_verify(&env, &cache, &keys.public_key, &built)?;
        ensure!(accepted, "Nix rejected our signature: {said}");
        // And a client that trusts only our key substitutes the whole closure.
        env.copy_from(
            &file_cache_url(&cache, ""),
            &env.path("pulled"),
            &keys.public_key,
            std::slice::from_ref(&built),
        )?;
        ensure!(
            physical_path(&env.path("pulled"), &built).exists(),
            "{built} was pulled"
        );

        // Tampered: the signed references no longer match.
        let mut tampered = info.clone();
        tampered.references.clear();
        assert!(!tampered.verify(&[public], &store_dir()));
        std::fs::write(narinfo_file(&cache, &built)?, tampered.render(&store_dir()))?;
        let (accepted, said) = nix_verify(&env, &cache, &keys.public_key, &built)?;
        ensure!(!accepted, "Nix accepted a tampered narinfo: {said}");
        ensure!(
            said.contains("untrusted"),
            "Nix rejected it for the signature: {said}"
        );
        Ok(())
    }
}

tests::under_each_nix! {
    #[test]
    fn nix_signature_made_by_nix_verifies_with_our_code(version: NixVersion) -> Result<()> {
        let env = NixEnv::with_version(version)?;
        let keys = env.keygen("nix-made-1")?;
        let public = PublicKey::parse(&keys.public_key)?;
        let secret = SecretKey::parse(&keys.secret_key)?;
        let store = env.make_store(&env.path("store"), 6, "nix-signature")?;
        let cache = env.path("cache");
        let query = format!(
            "compression=none&secret-key={}",
            keys.secret_key_file.display()
        );
        env.copy_to(&store.root, &file_cache_url(&cache, &query), &store.paths)?;

        for path in env.closure(&store.root, &store.paths)? {
            let (text, info) = read_narinfo(&cache, &path)?;
            assert_eq!(info.signatures.len(), 1, "{path}");
            assert!(
                info.verify(std::slice::from_ref(&public), &store_dir()),
                "{path}"
            );
            // ed25519 is deterministic: we sign exactly as Nix did.
            let mut ours = info.clone();
            ours.signatures.clear();
            ours.sign(&secret, &store_dir());
            assert_eq!(ours.render(&store_dir()), text, "{path}");

            // Tampered fields the fingerprint covers fail.
            let mut tampered = info.clone();
            tampered.nar_size += 1;
            assert!(!tampered.verify(std::slice::from_ref(&public), &store_dir()));
            let mut tampered = info.clone();
            tampered.nar_hash = NarHash::new(Sha256Hash::digest(b"something else"));
            assert!(!tampered.verify(std::slice::from_ref(&public), &store_dir()));
            let mut tampered = info.clone();
            tampered.store_path = parse_store_path(&store.paths[0])?;
            if tampered.store_path != info.store_path {
                assert!(!tampered.verify(std::slice::from_ref(&public), &store_dir()));
            }
        }

        // Nix also refuses its own signature once the narinfo is tampered with.
        let built = store.built.first().context("a built output")?;
        let (accepted, said) = nix_verify(&env, &cache, &keys.public_key, built)?;
        ensure!(accepted, "Nix rejected its own signature: {said}");
        let (text, _) = read_narinfo(&cache, built)?;
        let tampered = text
            .lines()
            .map(|line| {
                if line.starts_with("References: ") {
                    "References: ".to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        ensure!(tampered != text);
        std::fs::write(narinfo_file(&cache, built)?, &tampered)?;
        assert!(!NarInfo::parse(&tampered, &store_dir())?.verify(&[public], &store_dir()));
        let (accepted, said) = nix_verify(&env, &cache, &keys.public_key, built)?;
        ensure!(!accepted, "Nix accepted a tampered narinfo: {said}");
        Ok(())
    }
}

tests::under_each_nix! {
    /// The first end-to-end check of the Nix recipe every later test builds
    /// on: a chroot store with a source path, `toFile` texts that reference it
    /// and a real `/bin/sh` build, exported with `nix copy --to file://`.
    #[test]
    fn nix_chroot_store_with_references_exports_with_nix_copy(version: NixVersion) -> Result<()> {
        let mut env = NixEnv::with_version(version)?;
        let store = env.make_store(&env.path("store"), 6, "first")?;
        assert_eq!(store.paths.len(), 6);
        assert_eq!(
            (store.sources.len(), store.texts.len(), store.built.len()),
            (2, 2, 2)
        );
        for path in &store.paths {
            ensure!(
                store.physical_path(path).exists(),
                "{path} is in the chroot store"
            );
            ensure!(
                path.starts_with("/nix/store/"),
                "{path} is a logical /nix/store path"
            );
        }

        // The references are what the recipe promises.
        let (source, text, built) = (&store.paths[0], &store.paths[1], &store.paths[2]);
        assert!(env.references(&store.root, source)?.is_empty());
        assert_eq!(env.references(&store.root, text)?, vec![source.clone()]);
        let built_references = env.references(&store.root, built)?;
        ensure!(
            built_references.contains(text) && built_references.contains(source),
            "{built} references {built_references:?}"
        );

        // Different salts make disjoint stores.
        let other = env.make_store(&env.path("other-store"), 3, "second")?;
        ensure!(
            other.paths.iter().all(|p| !store.paths.contains(p)),
            "salts separate paths"
        );

        let cache = env.path("cache");
        env.copy_to(
            &store.root,
            &file_cache_url(&cache, "compression=zstd"),
            &store.paths,
        )?;
        let closure = env.closure(&store.root, &store.paths)?;
        assert_eq!(closure.len(), 6, "the six paths form their own closure");
        for path in &closure {
            let (_, info) = read_narinfo(&cache, path)?;
            let references: Vec<String> = info
                .references
                .iter()
                .map(|r| r.to_full_path(&store_dir()))
                .collect();
            assert_eq!(
                references,
                env.references(&store.root, path)?,
                "References of {path}"
            );
            if store.built.contains(path) {
                let deriver = info.deriver.context("a built output names its deriver")?;
                ensure!(deriver.name().as_str().ends_with(".drv"));
                ensure!(info.ca.is_none());
            } else if store.texts.contains(path) {
                ensure!(info
                    .ca
                    .as_deref()
                    .is_some_and(|ca| ca.starts_with("text:sha256:")));
            } else {
                ensure!(info
                    .ca
                    .as_deref()
                    .is_some_and(|ca| ca.starts_with("fixed:r:sha256:")));
            }
        }

        // Signing in the local store carries the signatures into the next copy.
        let keys = env.keygen("local-sign-1")?;
        env.sign(&store.root, &keys.secret_key_file, &store.built)?;
        let signed_cache = env.path("signed-cache");
        env.copy_to(
            &store.root,
            &file_cache_url(&signed_cache, "compression=none"),
            &store.built,
        )?;
        let public = PublicKey::parse(&keys.public_key)?;
        for built in &store.built {
            let (_, info) = read_narinfo(&signed_cache, built)?;
            ensure!(
                info.verify(std::slice::from_ref(&public), &store_dir()),
                "{built} is signed"
            );
        }

        // Settings added later reach every command (server tests use netrc).
        let netrc = env.use_netrc("127.0.0.1", "TOKEN")?;
        let config = env.run_text("nix", &["show-config"])?;
        ensure!(
            config.contains(&format!("netrc-file = {}", netrc.display())),
            "netrc-file is set"
        );
        ensure!(
            config.contains("substituters = \n")
                || config.lines().any(|l| l.trim_end() == "substituters =")
        );
        Ok(())
    }
}
