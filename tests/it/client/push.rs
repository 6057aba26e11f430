//! `larder push` end to end (issue #6's first acceptance bullet): login →
//! cache create → push a closure of more than 20 paths, with paths signed
//! by a test "upstream" key left out → `use` → Nix substitutes the closure
//! into a fresh store with exactly the settings `use` wrote → `configure
//! --public` makes it readable without a token.
//!
//! These need the push endpoints and the pipeline (issue #4): the server
//! must accept `upload-path` and make the paths visible.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use larder_token::Permission;
use tests::nix::{NixEnv, NixVersion};
use tests::server::TestServer;

use super::agent::{assert_served, wrap_nar_dumps, Setup};
use super::{assert_substitutes_the_same_nars, blocking, server_view, store_config, Larder, HOUR};
use crate::server::store_with_a_built_path;

tests::under_each_nix! {
    #[tokio::test]
    async fn push_a_closure_then_substitute_it_with_the_settings_use_wrote(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let salt = format!("{:016x}", rand::random::<u64>());
        let (env, main, upstream) = blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            let root = env.path("source");
            let main = env
                .make_store(&root, 21, &format!("main-{salt}"))
                .expect("a closure of 21 paths");
            // A few paths of the same store that "upstream" signed: the push
            // leaves them out.
            let upstream = env
                .make_store(&root, 3, &format!("upstream-{salt}"))
                .expect("three more paths");
            let key = env.keygen("upstream-test-1").expect("an upstream key");
            env.sign(&root, &key.secret_key_file, &upstream.paths)
                .expect("signing the upstream paths");
            (env, main, upstream)
        })
        .await;
        let closure = env.closure(&main.root, &main.paths).expect("the closure");
        assert!(closure.len() >= 20, "{closure:?}");
        let upstream_closure = env
            .closure(&main.root, &upstream.paths)
            .expect("the upstream closure");
        assert!(upstream_closure.iter().all(|path| !closure.contains(path)));

        let root_token = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&main.root));
        larder
            .ok(&["login", "local", &server.url(), &root_token])
            .await;
        larder
            .ok(&[
                "cache",
                "create",
                "pushed",
                "--upstream-cache-key-name",
                "upstream-test-1",
            ])
            .await;

        let mut arguments = vec!["push", "pushed", "-j", "3"];
        arguments.extend(main.paths.iter().map(String::as_str));
        arguments.extend(upstream.paths.iter().map(String::as_str));
        let (output, peak_connections) = peak_open_connections(larder.run(&arguments)).await;
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "larder push: {out}{err}");
        // `-j 3` uploads paths side by side: the server saw a second connection
        // open while one was, which the client opens only for a request sent
        // while its other connections were busy (one upload at a time reuses
        // one connection).
        assert!(
            peak_connections >= 2,
            "at most {peak_connections} connection open at once during `larder push -j 3`"
        );
        assert_progress_lines(&err, &closure);
        assert!(
            out.contains(&format!(
                "pushed {} paths, 0 already cached, {} from upstream",
                closure.len(),
                upstream_closure.len()
            )),
            "{out}"
        );
        // Again: everything is there (and visible: the first push waited).
        let out = larder.ok(&arguments).await;
        assert!(
            out.contains(&format!(
                "pushed 0 paths, {} already cached, {} from upstream",
                closure.len(),
                upstream_closure.len()
            )),
            "{out}"
        );
        for path in &upstream_closure {
            let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
            let response = server
                .http()
                .get(server.cache_url(&format!("pushed/{hash}.narinfo")))
                .bearer_auth(&root_token)
                .send()
                .await
                .expect("GET narinfo");
            assert_eq!(response.status(), 404, "{path} was not pushed");
        }

        // `use` with a pull-only token; Nix reads only the nix.conf it wrote
        // (plus the user's own `substituters =`, to stay offline).
        let pull = server
            .mint("puller", HOUR, &[("pushed", &[Permission::Pull])])
            .await;
        let mut user = Larder::with_nix(version);
        user.set_env("LARDER_TOKEN", &pull);
        user.ok(&["login", "local", &server.url()]).await;
        std::fs::create_dir_all(user.nix_conf().parent().expect("a directory")).expect("mkdir");
        std::fs::write(user.nix_conf(), "substituters =\n").expect("writing nix.conf");
        user.ok(&["use", "pushed"]).await;

        let nix_conf = user.nix_conf();
        let destination = env.path("destination");
        let wanted = main.paths.clone();
        let source_root = main.root.clone();
        // The environment comes back out: dropping it would delete the source
        // store, which the last push below still reads.
        let _env = blocking(move || {
            assert_substitutes_the_same_nars(
                &env,
                &nix_conf,
                &destination,
                &env,
                &source_root,
                &wanted,
            );
            env
        })
        .await;

        // Public: readable without a token.
        let top = &main.built[0];
        let hash = &top["/nix/store/".len().."/nix/store/".len() + 32];
        let narinfo = server.cache_url(&format!("pushed/{hash}.narinfo"));
        let anonymous = server.http().get(&narinfo).send().await.expect("GET");
        assert_eq!(anonymous.status(), 401);
        larder
            .ok(&["cache", "configure", "pushed", "--public"])
            .await;
        let anonymous = server.http().get(&narinfo).send().await.expect("GET");
        assert_eq!(anonymous.status(), 200);
        assert_eq!(
            server_view(&server, "pushed", &root_token).await.is_public,
            Some(true)
        );

        // The filter can be turned off.
        let mut with_upstream = vec!["push", "pushed", "--ignore-upstream-cache-filter"];
        with_upstream.extend(upstream.paths.iter().map(String::as_str));
        let out = larder.ok(&with_upstream).await;
        assert!(
            out.contains(&format!(
                "pushed {} paths, 0 already cached, 0 from upstream",
                upstream_closure.len()
            )),
            "{out}"
        );
    }
}

tests::under_each_nix! {
    /// `larder push` without the closure, then with it; no warning from
    /// Nix, which is asked for the JSON format it documents.
    #[tokio::test]
    async fn push_without_closure_and_without_waiting(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let (_env, store) = store_with_a_built_path(version, "alone").await;
        let root_token = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&store.root));
        // `nix` is a script that writes down its arguments, then runs the
        // version's own: which `path-info` flags the client passed.
        let recorder = tempfile::tempdir().expect("a directory");
        let calls = recorder.path().join("calls");
        let real_nix = match version.bin_dir() {
            Some(dir) => dir.join("nix"),
            None => PathBuf::from("/usr/bin/nix"),
        };
        let shim = recorder.path().join("nix");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
                calls.display(),
                real_nix.display()
            ),
        )
        .expect("writing the recording nix");
        std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("making it executable");
        larder.set_env(
            "PATH",
            &format!("{}:{}", recorder.path().display(), version.path_variable()),
        );
        larder
            .ok(&["login", "local", &server.url(), &root_token])
            .await;
        larder.ok(&["cache", "create", "alone"]).await;
        let top = store.built[0].as_str();
        let output = larder
            .run(&["push", "alone", top, "--no-closure", "--no-wait"])
            .await;
        let (out, err) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "{out}{err}");
        assert!(
            out.contains("pushed 1 paths, 0 already cached, 0 from upstream"),
            "{out}"
        );
        // Format 1 asked for by name where Nix takes the flag (2.33 on, which
        // warn that a bare `--json` will become an error), and not before.
        let path_infos: Vec<String> = std::fs::read_to_string(&calls)
            .expect("the recorded calls")
            .lines()
            .filter(|call| call.contains("path-info"))
            .map(str::to_owned)
            .collect();
        assert!(!path_infos.is_empty(), "no nix path-info call");
        for call in &path_infos {
            assert_eq!(
                call.contains("--json-format 1"),
                version == NixVersion::Current,
                "{call}"
            );
        }
        // The rest of the closure is still missing.
        let out = larder.ok(&["push", "alone", top, "--no-wait"]).await;
        assert!(
            out.contains("pushed 2 paths, 1 already cached, 0 from upstream"),
            "{out}"
        );
    }
}

/// Runs `push` (a `larder push`) while watching the server's open
/// connections (the process-wide `larder_http_open_connections` gauge, which
/// only this test's server moves); returns its output and the most
/// connections seen open at once. Waits first until the connections of
/// earlier commands are closed, so that only the push's count.
async fn peak_open_connections(
    push: impl std::future::Future<Output = std::process::Output>,
) -> (std::process::Output, i64) {
    tests::prometheus::assert_metrics_are_this_tests_own();
    let open = larder_service::metrics::larder()
        .http_open_connections
        .clone();
    let mut polls = 0;
    while open.get() != 0 {
        polls += 1;
        assert!(polls < 3000, "connections of earlier commands never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let peak = Arc::new(AtomicI64::new(0));
    let watcher = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(open.get(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let output = push.await;
    watcher.abort();
    (output, peak.load(Ordering::Relaxed))
}

/// `larder push`'s progress on stderr (a pipe here, so finished lines
/// only): one `[k/N] pushed PATH (…)` line per path uploaded, `k` counting
/// up to `N`, the number of paths to upload, each path of `uploaded` once
/// (by its base name).
fn assert_progress_lines(stderr: &str, uploaded: &[String]) {
    let pushed: Vec<(usize, usize, &str)> = stderr
        .lines()
        .filter_map(|line| {
            let (counter, rest) = line.strip_prefix('[')?.split_once("] pushed ")?;
            let (done, total) = counter.split_once('/')?;
            let (path, _) = rest.split_once(" (")?;
            Some((done.parse().ok()?, total.parse().ok()?, path))
        })
        .collect();
    let counters: Vec<(usize, usize)> = pushed.iter().map(|&(k, n, _)| (k, n)).collect();
    let expected: Vec<(usize, usize)> = (1..=uploaded.len()).map(|k| (k, uploaded.len())).collect();
    assert_eq!(counters, expected, "progress lines:\n{stderr}");
    let mut paths: Vec<&str> = pushed.iter().map(|&(_, _, path)| path).collect();
    paths.sort_unstable();
    let mut wanted: Vec<&str> = uploaded
        .iter()
        .map(|path| path.rsplit('/').next().unwrap_or(path))
        .collect();
    wanted.sort_unstable();
    assert_eq!(paths, wanted, "progress lines:\n{stderr}");
}

tests::under_each_nix! {
    /// `larder push --logs` uploads the build log of each path it uploads
    /// (its deriver's, from the local store), skips quietly a path with no
    /// deriver, and without `--logs` uploads none.
    #[tokio::test]
    async fn push_with_logs_uploads_the_build_logs_of_the_paths_it_pushes(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let salt = format!("logged-{:016x}", rand::random::<u64>());
        let (env, root, drv, output, source) = {
            let salt = salt.clone();
            blocking(move || {
                let env = NixEnv::with_version(version).expect("a Nix environment");
                let root = env.path("source");
                let (drv, output) = env
                    .build_logging_derivation(&root, &salt)
                    .expect("building a derivation that logs");
                let tree = env.path("plain");
                std::fs::create_dir_all(&tree).expect("a source directory");
                tests::nix::write_file(&tree.join("file"), salt.as_bytes(), false)
                    .expect("a source file");
                let source = env.add_path(&root, &tree).expect("a source path");
                (env, root, drv, output, source)
            })
            .await
        };
        let root_token = server.root_token().await;
        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&root));
        larder
            .ok(&["login", "local", &server.url(), &root_token])
            .await;
        larder.ok(&["cache", "create", "logged"]).await;
        let drv_base = drv.trim_start_matches("/nix/store/");
        let log_of = || async {
            server
                .http()
                .get(server.cache_url(&format!("logged/log/{drv_base}")))
                .bearer_auth(&root_token)
                .send()
                .await
                .expect("GET log")
        };

        let out = larder.ok(&["push", "logged", &source]).await;
        assert!(out.contains("pushed 1 paths"), "{out}");
        assert!(!out.contains("build logs"), "{out}");

        let output_arguments = ["push", "logged", "--logs", &output, &source];
        let ran = larder.run(&output_arguments).await;
        let (out, err) = (
            String::from_utf8_lossy(&ran.stdout),
            String::from_utf8_lossy(&ran.stderr),
        );
        assert!(ran.status.success(), "{out}{err}");
        assert!(
            out.contains("pushed 1 paths, 1 already cached, 0 from upstream, 1 build logs"),
            "{out}"
        );
        assert!(!err.contains("warning"), "{err}");
        let response = log_of().await;
        assert_eq!(response.status(), 200);
        let log = response.text().await.expect("the log");
        assert!(log.contains(&format!("building {salt}")), "{log}");
        drop(env);
    }
}

tests::under_each_nix! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_paths_are_exported_in_batches_and_large_ones_streamed(version: NixVersion) {
        let server = TestServer::sqlite().await;
        let token = server.root_token().await;
        let mut setup = Setup::with_version(version).await;
        // Every dump the client starts is written down.
        let recorded = tempfile::tempdir().expect("a directory for the wrappers");
        let log = recorded.path().join("dumps");
        wrap_nar_dumps(
            &mut setup.larder,
            &recorded.path().join("bin"),
            &format!("echo \"$*\" >> '{}'", log.display()),
        );
        // The first path's NAR is 3 MiB, over the 1 MiB the client exports;
        // the other eleven are a few hundred bytes each.
        let paths = setup.add_paths("mixed", 12, 3 << 20).await;
        let larder = &setup.larder;
        larder.ok(&["login", "local", &server.url(), &token]).await;
        larder.ok(&["cache", "create", "mixed"]).await;
        let mut arguments = vec!["push", "mixed", "-j", "4"];
        arguments.extend(paths.iter().map(String::as_str));
        let out = larder.ok(&arguments).await;
        assert!(out.contains("pushed 12 paths"), "{out}");
        // The server took each upload only with its NarHash and NarSize
        // right, so every path served is every NAR cut right.
        assert_served(&server.url(), "mixed", &token, &paths).await;

        let dumps = std::fs::read_to_string(&log).expect("the recorded dumps");
        let streamed: Vec<&str> = dumps
            .lines()
            .filter(|line| line.contains("store dump-path"))
            .collect();
        assert_eq!(streamed.len(), 1, "{dumps}");
        assert!(streamed[0].ends_with(&paths[0]), "{dumps}");
        let exported: Vec<&str> = dumps
            .lines()
            .filter(|line| line.contains("--export"))
            .collect();
        // Eleven small paths, all ready at once, fit one export.
        assert_eq!(exported.len(), 1, "{dumps}");
        for small in &paths[1..] {
            assert!(exported[0].contains(small.as_str()), "{small}: {dumps}");
        }
    }
}
