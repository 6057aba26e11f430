//! Larder behind a TLS-terminating reverse proxy: nginx running the recipe
//! `ops/nginx/larder.conf` itself (only its marked lines changed: port,
//! certificate, upstream) in front of a real server whose `api-endpoint` is
//! the proxy's URL. The clients trust the throwaway CA only where a test
//! gives it to them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use larder_config::{HttpConfig, IngestConfig};
use larder_token::Permission;
use tests::nix::NixEnv;
use tests::server::{TestServer, TestServerOptions};
use tests::services;

use crate::client::{assert_substitutes_the_same_nars, store_config, Larder};
use crate::server::push::blocking;

const HOUR: Duration = Duration::from_secs(3600);

/// The recipe, as shipped.
fn recipe() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/nginx/larder.conf");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

/// `text` with the one line `old` replaced by `new` (which may be empty);
/// fails if the recipe no longer has that line exactly once.
fn replace_line(text: &str, old: &str, new: &str) -> String {
    let old_line = format!("    {old}\n");
    assert_eq!(
        text.matches(&old_line).count(),
        1,
        "ops/nginx/larder.conf should have the line {old:?} once"
    );
    let new_line = if new.is_empty() {
        String::new()
    } else {
        format!("    {new}\n")
    };
    text.replacen(&old_line, &new_line, 1)
}

/// A duration setting of the recipe (`NAME 300s;`), in seconds.
fn seconds_of(recipe: &str, setting: &str) -> u64 {
    let line = recipe
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with(&format!("{setting} ")))
        .unwrap_or_else(|| panic!("ops/nginx/larder.conf sets no {setting}"));
    let value = line[setting.len()..].trim().trim_end_matches(';');
    value
        .strip_suffix('s')
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| panic!("{setting} is not in seconds: {line:?}"))
}

/// What the live test cannot wait for: the recipe's timeouts outlast the
/// default `wait-for-visible` (else nginx answers a waiting push with a 504,
/// and Nix 2.8 re-sends it without its body) and `upload-slot-wait` (while
/// Larder reads nothing of a waiting upload), bodies are unlimited and
/// streamed, idle upstream connections are dropped before Larder drops
/// them, and the forwarded headers are set.
#[test]
fn the_proxy_recipe_outlasts_wait_for_visible_and_streams_unlimited_bodies() {
    let recipe = recipe();
    let wait = IngestConfig::default()
        .wait_for_visible
        .as_secs()
        .max(HttpConfig::default().upload_slot_wait.as_secs());
    for setting in [
        "proxy_read_timeout",
        "proxy_send_timeout",
        "client_body_timeout",
    ] {
        let seconds = seconds_of(&recipe, setting);
        assert!(
            seconds >= wait + 60,
            "{setting} {seconds}s leaves no margin over Larder's waits ({wait}s)"
        );
    }
    // nginx must drop an idle upstream connection before Larder does.
    let idle = seconds_of(&recipe, "keepalive_timeout");
    let larder_idle = HttpConfig::default().header_read_timeout.as_secs();
    assert!(
        idle < larder_idle,
        "upstream keepalive_timeout {idle}s is not below header-read-timeout ({larder_idle}s)"
    );
    for line in [
        "client_max_body_size 0;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $http_host;",
    ] {
        assert!(
            recipe.lines().any(|recipe_line| recipe_line.trim() == line),
            "ops/nginx/larder.conf lacks {line:?}"
        );
    }
}

/// nginx running the recipe, on a port of its own.
struct Proxy {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Proxy {
    /// Starts nginx on a free port with its upstream pointing at nothing
    /// yet (`point_at` sets it): the server's `api-endpoint` needs the
    /// proxy's port before the server starts.
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("larder-proxy-")
            .tempdir()
            .expect("a directory for nginx");
        // nginx's workers run as `nobody` and may write temporary files.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("opening the directory to nginx's workers");
        for attempt in 1..=20 {
            // Below the ephemeral range; a port taken meanwhile makes nginx
            // exit, and another one is tried.
            let port = 20_000 + rand::random::<u16>() % 12_000;
            let mut child = spawn_nginx(dir.path(), port, "127.0.0.1:9");
            if wait_until_listening(dir.path(), &mut child) {
                return Self { dir, child, port };
            }
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            assert!(
                log.contains("Address already in use"),
                "nginx did not start (attempt {attempt}): {log}"
            );
        }
        panic!("no free port for nginx after 20 attempts");
    }

    /// Points the upstream at `upstream` and reloads nginx's configuration.
    fn point_at(&self, upstream: &str) {
        write_config(self.dir.path(), self.port, upstream);
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "reloading nginx");
    }

    /// The proxy's public URL, with the name its certificate carries.
    fn url(&self) -> String {
        format!("https://localhost:{}/", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then itself.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `dir/nginx.conf` (the main file, everything kept in `dir`) and
/// `dir/larder.conf` (the recipe, its marked lines changed).
fn write_config(dir: &Path, port: u16, upstream: &str) {
    let cert = services::required_env(services::TLS_CERT_FILE);
    let key = services::required_env(services::TLS_KEY_FILE);
    let mut larder = recipe();
    for (old, new) in [
        (
            "listen 443 ssl http2;",
            format!("listen 127.0.0.1:{port} ssl http2;"),
        ),
        ("listen [::]:443 ssl http2;", String::new()),
        (
            "server_name cache.example.com;",
            "server_name localhost;".to_owned(),
        ),
        (
            "ssl_certificate /etc/ssl/larder/fullchain.pem;",
            format!("ssl_certificate {cert};"),
        ),
        (
            "ssl_certificate_key /etc/ssl/larder/privkey.pem;",
            format!("ssl_certificate_key {key};"),
        ),
        ("server 127.0.0.1:8080;", format!("server {upstream};")),
    ] {
        larder = replace_line(&larder, old, &new);
    }
    std::fs::write(dir.join("larder.conf"), larder).expect("writing larder.conf");
    let dir = dir.display();
    let main = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log info;\nevents {{\n    worker_connections 256;\n}}\n\
         http {{\n    access_log {dir}/access.log;\n    client_body_temp_path {dir}/tmp/body;\n    \
         proxy_temp_path {dir}/tmp/proxy;\n    fastcgi_temp_path {dir}/tmp/fastcgi;\n    \
         uwsgi_temp_path {dir}/tmp/uwsgi;\n    scgi_temp_path {dir}/tmp/scgi;\n    \
         include {dir}/larder.conf;\n}}\n"
    );
    std::fs::write(format!("{dir}/nginx.conf"), main).expect("writing nginx.conf");
}

/// True once nginx in `dir` has bound its port (it writes its pid file
/// after binding), false when it exited instead.
fn wait_until_listening(dir: &Path, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid_file = dir.join("nginx.pid");
    while Instant::now() < deadline {
        if child.try_wait().expect("waiting for nginx").is_some() {
            return false;
        }
        if pid_file.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nginx neither started nor exited within 30 s");
}

fn spawn_nginx(dir: &Path, port: u16, upstream: &str) -> Child {
    write_config(dir, port, upstream);
    std::fs::create_dir_all(dir.join("tmp")).expect("nginx's temporary directory");
    Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nginx (ops/install.sh installs it)")
}

/// An HTTPS client trusting the throwaway CA, for the test's own requests.
fn https_client() -> reqwest::Client {
    let pem = std::fs::read(services::tls_ca_file()).expect("reading the throwaway CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"))
        .build()
        .expect("an HTTPS client")
}

/// Waits until requests through the proxy reach the server (nginx answers
/// 502 while its upstream is not yet the server).
async fn wait_until_proxied(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(url).send().await {
            if response.status() != 502 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} does not reach the server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The size of the path pushed alongside the small ones, in MiB.
const LARGE_MIB: usize = 100;

tests::under_each_nix! {
    /// Through the recipe's nginx, over https only:
    /// - `larder` refuses the server's certificate until `SSL_CERT_FILE` names
    ///   the CA, then logs in, creates caches and pushes a closure with a
    ///   100 MiB path (the NAR streamed as an uncompressed body: nginx's
    ///   default 1 MiB limit would refuse it);
    /// - `nix copy --to https://…?compression=none` pushes the same closure into
    ///   another cache, 100 MiB PUT included;
    /// - `larder use` writes the https substituter (the server's `api-endpoint`)
    ///   and the netrc, and Nix substitutes the closure with exactly those
    ///   settings, signatures required, into a fresh store, NAR for NAR.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_push_and_pull_through_the_nginx_recipe_over_https(version: NixVersion) {
        let proxy = blocking(Proxy::start).await;
        let server = TestServer::start(TestServerOptions {
            api_endpoint: Some(proxy.url()),
            ..TestServerOptions::default()
        })
        .await;
        proxy.point_at(&server.address().to_string());
        let https = https_client();
        wait_until_proxied(&https, &proxy.url()).await;
        let ca = services::tls_ca_file();
        let ca = ca.to_str().expect("a UTF-8 path").to_owned();

        let (via_larder, via_nix) = ("via-larder", "via-nix");
        let root_token = server.root_token().await;
        let salt = format!("{:016x}", rand::random::<u64>());
        let (mut env, root, paths) = blocking(move || {
            let env = NixEnv::with_version(version).expect("a Nix environment");
            let root = env.path("source");
            let mut paths = env
                .make_store(&root, 5, &format!("proxy-{salt}"))
                .expect("a closure of referencing paths")
                .paths;
            let input = env.path("large-input");
            std::fs::create_dir_all(&input).expect("a directory");
            let words: Vec<u8> =
                tests::server::pseudo_random(LARGE_MIB << 20, rand::random::<u64>() | 1)
                    .into_iter()
                    .map(|byte| b"abcdefgh ijklmnop\n"[usize::from(byte) % 18])
                    .collect();
            std::fs::write(input.join("data.txt"), &words).expect("writing the large file");
            paths.push(env.add_path(&root, &input).expect("adding the large path"));
            (env, root, paths)
        })
        .await;
        let closure = env.closure(&root, &paths).expect("the closure");

        let mut larder = Larder::with_nix(version);
        larder.set_env("NIX_CONFIG", &store_config(&root));
        larder
            .ok(&["login", "proxied", &proxy.url(), &root_token])
            .await;
        let refused = larder.fails(&["cache", "create", via_larder]).await;
        assert!(refused.contains("certificate"), "{refused}");
        larder.set_env("SSL_CERT_FILE", &ca);
        larder.ok(&["cache", "create", via_larder]).await;
        larder.ok(&["cache", "create", via_nix]).await;
        let info = larder.ok(&["cache", "info", via_nix]).await;
        assert!(
            info.contains(&format!("{}{via_nix}", proxy.url())),
            "{info}"
        );

        let mut push = vec!["push", via_larder];
        push.extend(paths.iter().map(String::as_str));
        let out = larder.ok(&push).await;
        assert!(
            out.contains(&format!("pushed {} paths, 0 already cached", closure.len())),
            "{out}"
        );

        let pusher = server
            .mint(
                "pusher",
                HOUR,
                &[(via_nix, &[Permission::Pull, Permission::Push])],
            )
            .await;
        env.use_netrc("localhost", &pusher).expect("a netrc");
        env.set_env("NIX_SSL_CERT_FILE", &ca);
        let url = format!("{}{via_nix}?compression=none", proxy.url());
        let (env, wanted) = blocking(move || {
            env.copy_to(&root, &url, &paths)
                .unwrap_or_else(|error| panic!("nix copy --to {url}: {error}"));
            (env, (root, paths))
        })
        .await;
        let (root, paths) = wanted;

        // The large path is stored whole in both caches.
        let large = paths.last().expect("the large path").clone();
        let hash = &large["/nix/store/".len().."/nix/store/".len() + 32];
        for cache in [via_larder, via_nix] {
            let narinfo = https
                .get(format!("{}{cache}/{hash}.narinfo", proxy.url()))
                .bearer_auth(&root_token)
                .send()
                .await
                .expect("GET narinfo through the proxy");
            assert_eq!(narinfo.status(), 200, "{cache}");
            let narinfo = narinfo.text().await.expect("the narinfo");
            let size: u64 = narinfo
                .lines()
                .find_map(|line| line.strip_prefix("NarSize: "))
                .and_then(|size| size.parse().ok())
                .unwrap_or_else(|| panic!("{cache}: no NarSize in {narinfo}"));
            assert!(size > (LARGE_MIB as u64) << 20, "{cache}: NarSize {size}");
        }

        // A pull-only user: `use`, then Nix with exactly what `use` wrote.
        let puller = server
            .mint("puller", HOUR, &[(via_nix, &[Permission::Pull])])
            .await;
        let mut user = Larder::with_nix(version);
        user.set_env("LARDER_TOKEN", &puller);
        user.set_env("SSL_CERT_FILE", &ca);
        user.ok(&["login", "proxied", &proxy.url()]).await;
        std::fs::create_dir_all(user.nix_conf().parent().expect("a directory")).expect("mkdir");
        std::fs::write(user.nix_conf(), "substituters =\n").expect("writing nix.conf");
        user.ok(&["use", via_nix]).await;
        let written = std::fs::read_to_string(user.nix_conf()).expect("nix.conf");
        assert!(
            written.contains(&format!("{}{via_nix}", proxy.url())),
            "{written}"
        );

        // Another machine's Nix, as it were: the pushing Nix cached the
        // narinfos it wrote, with its own file names, and would not ask.
        let nix_conf = user.nix_conf();
        blocking(move || {
            let mut puller = NixEnv::with_version(version).expect("a Nix environment");
            puller.set_env("NIX_SSL_CERT_FILE", &ca);
            let destination = puller.path("destination");
            assert_substitutes_the_same_nars(&puller, &nix_conf, &destination, &env, &root, &paths);
        })
        .await;
        drop(proxy);
        server.stop().await;
    }
}
