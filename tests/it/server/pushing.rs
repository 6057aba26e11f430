//! [`Pushing`]: a Nix environment with a closure to push and the means to
//! push it, substitute it back and verify it. The distributed topology's
//! tests and the single-process server's share it.

use std::path::PathBuf;

use tests::nix::{NixEnv, NixVersion};
use tests::server::HttpApi;

use super::push::{blocking, public_key_of, pushing_env};
use super::{source_paths, SourcePath};

/// A pushing environment of a Nix version with a closure of at least `n` referencing
/// paths, their dumps for Attic's API, and the closure.
pub(crate) struct Pushing {
    pub(crate) env: NixEnv,
    pub(crate) root: PathBuf,
    pub(crate) closure: Vec<String>,
    pub(crate) sources: Vec<SourcePath>,
}

impl Pushing {
    pub(crate) async fn new(n: usize, token: &str, version: NixVersion) -> Self {
        Self::with_large_paths(n, &[], token, version).await
    }

    /// [`new`](Self::new), plus one path per entry of `large_mib` holding
    /// that many MiB of text-like bytes (cut into many chunks, and
    /// compressible like real data).
    pub(crate) async fn with_large_paths(
        n: usize,
        large_mib: &[usize],
        token: &str,
        version: NixVersion,
    ) -> Self {
        let (env, root, mut paths) = pushing_env(version, n, token.to_owned()).await;
        let large_mib = large_mib.to_vec();
        blocking(move || {
            for (index, mib) in large_mib.into_iter().enumerate() {
                let input = env.path(&format!("large-input-{index}"));
                std::fs::create_dir_all(&input).expect("a directory");
                let words: Vec<u8> =
                    tests::server::pseudo_random(mib << 20, rand::random::<u64>() | 1)
                        .into_iter()
                        .map(|byte| b"abcdefgh ijklmnop\n"[usize::from(byte) % 18])
                        .collect();
                std::fs::write(input.join("data.txt"), &words).expect("writing a large file");
                let path = env.add_path(&root, &input).expect("adding a large path");
                paths.push(path.trim().to_owned());
            }
            let closure = env.closure(&root, &paths).expect("the closure");
            let sources = source_paths(&env, &root, &closure);
            Self {
                env,
                root,
                closure,
                sources,
            }
        })
        .await
    }

    /// `nix copy --to cache_url` of the closure. Nix skips the paths it
    /// believes the cache has, asking the cache (not its own memory of
    /// the narinfos it wrote before): what a push to heal withdrawn paths
    /// does.
    pub(crate) async fn copy_to(self, cache_url: String) -> Self {
        blocking(move || {
            let mut pushing = self;
            pushing.env.add_config("narinfo-cache-positive-ttl", "0");
            pushing
                .env
                .copy_to(&pushing.root, &cache_url, &pushing.closure)
                .unwrap_or_else(|error| panic!("nix copy --to {cache_url}: {error}"));
            pushing
        })
        .await
    }

    /// Substitutes the closure from `cache` on `api` into a fresh store,
    /// trusting only the cache's key, and runs `nix store verify` on it.
    pub(crate) async fn substitute_and_verify(
        self,
        api: &impl HttpApi,
        token: &str,
        cache: &str,
    ) -> Self {
        let public_key = public_key_of(api, token, cache).await;
        self.substitute_from(api.cache_url(cache), public_key).await
    }

    /// Substitutes the closure from the binary cache at `cache_url` into a
    /// fresh store, trusting only `public_key`, and runs `nix store verify`
    /// on it.
    pub(crate) async fn substitute_from(self, cache_url: String, public_key: String) -> Self {
        blocking(move || {
            let mut pushing = self;
            // The pushing Nix cached the narinfos it wrote, with its own
            // URLs: substitutions must ask the server.
            pushing.env.add_config("narinfo-cache-positive-ttl", "0");
            let destination = pushing
                .env
                .path(&format!("substituted-{}", rand::random::<u32>()));
            pushing
                .env
                .copy_from(&cache_url, &destination, &public_key, &pushing.closure)
                .unwrap_or_else(|error| panic!("substituting from {cache_url}: {error}"));
            let verified = pushing
                .env
                .store_verify(&cache_url, &public_key, &pushing.closure)
                .expect("nix store verify");
            assert!(verified.status.success(), "{cache_url}: {verified:?}");
            pushing
        })
        .await
    }
}
