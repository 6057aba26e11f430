//! The local Nix store, reached only through the `nix` command line, so
//! that whatever store the user's Nix uses (`NIX_REMOTE`, the `store`
//! setting in `NIX_CONFIG` or nix.conf, a daemon, a chroot store) is the
//! store Larder reads.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;

use base64::Engine as _;
use common::nix::{base32, NarHash, StoreDir, StorePath, StorePathHash};
use serde::Deserialize;
use tokio::process::{Child, Command};

/// Why the store could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `nix` ({0}); is Nix installed and on PATH?")]
    NotRunnable(std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("`{command}` printed output Larder does not understand: {reason}")]
    BadOutput { command: String, reason: String },
}

/// What the store knows of one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub signatures: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn hash(&self) -> &StorePathHash {
        self.path.hash()
    }

    /// The names of the keys that signed this path.
    pub fn signing_key_names(&self) -> impl Iterator<Item = &str> {
        self.signatures
            .iter()
            .filter_map(|signature| signature.split_once(':').map(|(name, _)| name))
    }
}

/// One entry of `nix path-info --json`, in any of its spellings: Nix 2.8's
/// (an array of objects with a `path` field, an invalid path marked
/// `"valid": false`), format 1 of later versions (an object keyed by full
/// path, an invalid path `null`), or format 2 (`--json-format 2`: keyed by
/// base name under `info`, references and deriver as base names too, the
/// content address structured).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    valid: Option<bool>,
    #[serde(default)]
    nar_hash: Option<String>,
    #[serde(default)]
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    #[serde(default)]
    ca: Option<RawContentAddress>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawContentAddress {
    /// `fixed:r:sha256:<base-32>`, as in a narinfo (format 1).
    Text(String),
    /// `{"method": "nar", "hash": "sha256-<base64>"}` (format 2).
    Structured { method: String, hash: String },
}

impl RawContentAddress {
    /// The narinfo spelling of this content address.
    fn into_narinfo_text(self) -> Result<String, String> {
        let (method, hash) = match self {
            Self::Text(text) => return Ok(text),
            Self::Structured { method, hash } => (method, hash),
        };
        let prefix = match method.as_str() {
            "text" => "text:",
            "flat" => "fixed:",
            "nar" => "fixed:r:",
            "git" => "fixed:git:",
            other => return Err(format!("unknown content-addressing method {other:?}")),
        };
        let (algorithm, digest) = hash
            .split_once('-')
            .ok_or_else(|| format!("{hash:?} is not an SRI hash"))?;
        let expected_len = match algorithm {
            "md5" => 16,
            "sha1" => 20,
            "sha256" => 32,
            "sha512" => 64,
            other => return Err(format!("unknown hash algorithm {other:?}")),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(digest)
            .ok()
            .filter(|bytes| bytes.len() == expected_len)
            .ok_or_else(|| format!("{hash:?} is not a valid {algorithm} hash"))?;
        Ok(format!("{prefix}{algorithm}:{}", base32::encode(&bytes)))
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPathInfos {
    #[serde(rename_all = "camelCase")]
    Version2 {
        info: BTreeMap<String, Option<RawPathInfo>>,
        store_dir: String,
    },
    List(Vec<RawPathInfo>),
    ByPath(BTreeMap<String, Option<RawPathInfo>>),
}

/// The entries of `nix path-info --json` output in any spelling, keyed by
/// full store path, with `None` for an invalid path.
fn path_info_entries(json: &[u8]) -> Result<Vec<(String, Option<RawPathInfo>)>, String> {
    let raw: RawPathInfos = serde_json::from_slice(json).map_err(|error| error.to_string())?;
    match raw {
        RawPathInfos::List(list) => list
            .into_iter()
            .map(|info| {
                let path = info.path.clone().ok_or("an entry has no \"path\"")?;
                let valid = info.valid != Some(false);
                Ok((path, valid.then_some(info)))
            })
            .collect(),
        RawPathInfos::ByPath(map) => Ok(map.into_iter().collect()),
        RawPathInfos::Version2 { info, store_dir } => {
            let full = |name: &str| format!("{store_dir}/{name}");
            Ok(info
                .into_iter()
                .map(|(name, info)| {
                    let info = info.map(|info| RawPathInfo {
                        references: info.references.iter().map(|name| full(name)).collect(),
                        deriver: info.deriver.as_deref().map(full),
                        ..info
                    });
                    (full(&name), info)
                })
                .collect())
        }
    }
}

/// `nix path-info --json` asking for the format this code reads: format 1
/// (full store paths, SRI hashes), named with `--json-format 1` on Nix
/// 2.33 and later, which otherwise warn that a bare `--json` will become an
/// error; earlier versions (and Lix) know no such flag and print format 1.
async fn path_info_json() -> Command {
    let mut command = nix_command();
    command.args(["path-info", "--json"]);
    if takes_json_format().await {
        command.args(["--json-format", "1"]);
    }
    command
}

/// Whether this machine's Nix takes `--json-format`, asked once per
/// process (`nix --version`); when it cannot tell, it assumes not.
async fn takes_json_format() -> bool {
    static TAKES: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    *TAKES
        .get_or_init(|| async {
            let output = nix_command()
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .await;
            output.is_ok_and(|output| {
                nix_version(&String::from_utf8_lossy(&output.stdout))
                    .is_some_and(|version| version >= (2, 33))
            })
        })
        .await
}

/// The (major, minor) version of CppNix from its `nix --version` line
/// (`nix (Nix) 2.34.8`); `None` for anything else, Lix's `nix (Lix, like
/// Nix) 2.91.1` included, whose numbers do not follow Nix's.
fn nix_version(line: &str) -> Option<(u32, u32)> {
    let mut numbers = line.trim().strip_prefix("nix (Nix) ")?.split('.');
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

/// A `nix` command with the new CLI enabled, whatever the user's config
/// says.
fn nix_command() -> Command {
    let mut command = Command::new("nix");
    command.args(["--extra-experimental-features", "nix-command"]);
    command
}

/// The path infos of `paths` (anything `nix path-info` accepts: store
/// paths, `./result` symlinks), and of their closure when `closure`.
pub async fn path_infos(
    store_dir: &StoreDir,
    paths: &[String],
    closure: bool,
) -> Result<Vec<PathInfo>, NixError> {
    let mut command = path_info_json().await;
    if closure {
        command.arg("--recursive");
    }
    command.arg("--").args(paths);
    let shown = format!(
        "nix path-info --json{} {}",
        if closure { " --recursive" } else { "" },
        paths.join(" ")
    );
    let stdout = run(command, &shown).await?;
    parse_path_infos(store_dir, &stdout).map_err(|reason| NixError::BadOutput {
        command: shown,
        reason,
    })
}

fn parse_path_infos(store_dir: &StoreDir, json: &[u8]) -> Result<Vec<PathInfo>, String> {
    let parse = |path: &str| {
        store_dir
            .parse_path(path)
            .map_err(|error| error.to_string())
    };
    path_info_entries(json)?
        .into_iter()
        .map(|(path, raw)| {
            let raw = raw.ok_or_else(|| format!("{path} is not a valid path in the store"))?;
            let nar_hash = raw
                .nar_hash
                .ok_or_else(|| format!("{path} has no \"narHash\""))?;
            Ok(PathInfo {
                path: parse(&path)?,
                nar_hash: NarHash::parse(&nar_hash).map_err(|error| error.to_string())?,
                nar_size: raw
                    .nar_size
                    .ok_or_else(|| format!("{path} has no \"narSize\""))?,
                references: raw
                    .references
                    .iter()
                    .map(|reference| parse(reference))
                    .collect::<Result<_, _>>()?,
                deriver: raw.deriver.as_deref().map(parse).transpose()?,
                signatures: raw.signatures,
                ca: raw
                    .ca
                    .map(RawContentAddress::into_narinfo_text)
                    .transpose()?,
            })
        })
        .collect()
}

/// Which of `paths` (full store paths) are valid in the store.
pub async fn valid_paths(paths: &[String]) -> Result<HashSet<String>, NixError> {
    let mut command = path_info_json().await;
    command.arg("--").args(paths);
    let shown = format!("nix path-info --json {}", paths.join(" "));
    let stdout = run(command, &shown).await?;
    parse_validity(&stdout).map_err(|reason| NixError::BadOutput {
        command: shown,
        reason,
    })
}

fn parse_validity(json: &[u8]) -> Result<HashSet<String>, String> {
    Ok(path_info_entries(json)?
        .into_iter()
        .filter_map(|(path, info)| info.map(|_| path))
        .collect())
}

/// The directory on disk that holds the store's paths: `/nix/store` for
/// the system store (local or through the daemon), `ROOT/nix/store` for a
/// chroot store (`store = ROOT` or `local?root=ROOT`), from `NIX_REMOTE`
/// or else Nix's `store` setting. Other stores (ssh://, s3://…) have no
/// such directory here.
pub async fn physical_store_dir() -> Result<PathBuf, NixError> {
    let store = match std::env::var("NIX_REMOTE")
        .ok()
        .filter(|uri| !uri.is_empty())
    {
        Some(uri) => uri,
        None => {
            let mut command = nix_command();
            command.args(["show-config", "--json"]);
            let stdout = run(command, "nix show-config --json").await?;
            let bad = |reason: String| NixError::BadOutput {
                command: "nix show-config --json".to_owned(),
                reason,
            };
            let config: serde_json::Value =
                serde_json::from_slice(&stdout).map_err(|error| bad(error.to_string()))?;
            config["store"]["value"]
                .as_str()
                .ok_or_else(|| bad("no \"store\" setting".to_owned()))?
                .to_owned()
        }
    };
    store_root(&store)
        .map(|root| root.join("nix/store"))
        .ok_or_else(|| NixError::BadOutput {
            command: "the store setting".to_owned(),
            reason: format!(
                "the store {store:?} has no store directory on this machine to watch; \
                 set store-dir in the [agent] section of the config"
            ),
        })
}

/// The root directory a store URI puts `/nix/store` under. Nix 2.8 shows
/// a chroot store as its path (`/tmp/root`) or `local?root=/tmp/root`; a
/// current Nix as `local:///tmp/root` or `local://?root=/tmp/root`.
fn store_root(uri: &str) -> Option<PathBuf> {
    let (scheme, query) = uri.split_once('?').unwrap_or((uri, ""));
    let root_param = query.split('&').find_map(|pair| pair.strip_prefix("root="));
    match scheme {
        "auto" | "daemon" | "local" | "local://" | "" => {
            Some(PathBuf::from(root_param.unwrap_or("/")))
        }
        _ if scheme.starts_with("local:///") => Some(PathBuf::from(&scheme["local://".len()..])),
        _ if scheme.starts_with("unix://") => Some(PathBuf::from("/")),
        _ if scheme.starts_with('/') => Some(PathBuf::from(scheme)),
        _ => None,
    }
}

/// Runs a command to completion; its stdout, or its error line.
async fn run(mut command: Command, shown: &str) -> Result<Vec<u8>, NixError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(NixError::NotRunnable)?;
    if !output.status.success() {
        return Err(NixError::Failed {
            command: shown.to_owned(),
            stderr: last_error_line(&output.stderr),
        });
    }
    Ok(output.stdout)
}

/// The build log the local store keeps for derivation `drv_path` (a full
/// path), or `None` when it has none (never built here, its log removed,
/// the derivation itself gone): `nix log`, asked of the local store only,
/// never of substituters, whose logs are theirs to serve.
pub async fn read_log(drv_path: &str) -> Result<Option<Vec<u8>>, NixError> {
    let output = nix_command()
        .args(["log", "--option", "substituters", "", drv_path])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(NixError::NotRunnable)?;
    // Nix says why in words only ("build log of … is not available", "path
    // … is not valid"): any failure means there is no log to push.
    Ok(output.status.success().then_some(output.stdout))
}

/// `nix store dump-path PATH` with its NAR on a pipe: the caller streams
/// `stdout` and then checks the exit status with [`finish_dump`].
pub fn spawn_dump(full_path: &str) -> Result<Child, NixError> {
    nix_command()
        .args(["store", "dump-path", "--", full_path])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NixError::NotRunnable)
}

/// Waits for a dump started by [`spawn_dump`] and fails with its error if
/// it did not succeed.
pub async fn finish_dump(child: Child, full_path: &str) -> Result<(), NixError> {
    let output = child
        .wait_with_output()
        .await
        .map_err(NixError::NotRunnable)?;
    if output.status.success() {
        return Ok(());
    }
    Err(NixError::Failed {
        command: format!("nix store dump-path {full_path}"),
        stderr: last_error_line(&output.stderr),
    })
}

/// The last non-empty line of a Nix command's stderr (its `error: …`),
/// or the exit in words when it said nothing.
fn last_error_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(|line| line.strip_prefix("error: ").unwrap_or(line).to_owned())
        .unwrap_or_else(|| "it printed nothing".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/0vlfq2frv35f2ckxvcmjrlklygj8g3g3-a";
    const B: &str = "/nix/store/1gq3ydp1jmlnrcw1pj0hqxz5jcdqch4v-b";

    #[test]
    fn only_cppnix_version_lines_give_a_version() {
        assert_eq!(nix_version("nix (Nix) 2.8.0\n"), Some((2, 8)));
        assert_eq!(nix_version("nix (Nix) 2.34.8"), Some((2, 34)));
        assert_eq!(
            nix_version("nix (Nix) 2.33.0pre20251001_abc"),
            Some((2, 33))
        );
        assert_eq!(nix_version("nix (Lix, like Nix) 2.91.1"), None);
        assert_eq!(nix_version(""), None);
    }

    #[test]
    fn nix_2_8_json_parses() {
        let json = format!(
            r#"[{{"path":"{A}","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120,"references":["{A}","{B}"],"deriver":"/nix/store/2aqr1dyjpp4i98hz1jal26b0azfbr2b8-a.drv","signatures":["upstream-1:c2ln"],"registrationTime":1}},
                {{"path":"{B}","narHash":"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73","narSize":8,"references":[],"ca":"fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"}}]"#
        );
        let infos = parse_path_infos(&StoreDir::default(), json.as_bytes()).expect("parses");
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].references.len(), 2);
        assert_eq!(
            infos[0].signing_key_names().collect::<Vec<_>>(),
            ["upstream-1"]
        );
        assert!(infos[0].deriver.is_some());
        assert!(infos[1].ca.is_some());
        assert_eq!(infos[1].nar_size, 8);
    }

    #[test]
    fn validity_in_both_spellings() {
        let nix_2_8 = format!(
            r#"[{{"path":"{B}","valid":false}},{{"path":"{A}","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120}}]"#
        );
        assert_eq!(
            parse_validity(nix_2_8.as_bytes()).expect("parses"),
            HashSet::from([A.to_owned()])
        );
        let newer = format!(r#"{{"{A}":{{"narSize":1}},"{B}":null}}"#);
        assert_eq!(
            parse_validity(newer.as_bytes()).expect("parses"),
            HashSet::from([A.to_owned()])
        );
    }

    #[test]
    fn store_roots() {
        let root = |uri| store_root(uri).map(|path| path.display().to_string());
        assert_eq!(root("auto").as_deref(), Some("/"));
        assert_eq!(root("daemon").as_deref(), Some("/"));
        assert_eq!(root("/tmp/x").as_deref(), Some("/tmp/x"));
        assert_eq!(root("local?root=/tmp/y&x=1").as_deref(), Some("/tmp/y"));
        assert_eq!(root("local:///tmp/z").as_deref(), Some("/tmp/z"));
        assert_eq!(root("local://?root=/tmp/w").as_deref(), Some("/tmp/w"));
        assert_eq!(root("ssh://host"), None);
    }

    #[test]
    fn newer_json_keyed_by_path_parses() {
        let json = format!(
            r#"{{"{A}":{{"narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120,"references":[]}}}}"#
        );
        let infos = parse_path_infos(&StoreDir::default(), json.as_bytes()).expect("parses");
        assert_eq!(
            infos[0].path.to_string(),
            A.trim_start_matches("/nix/store/")
        );
        let invalid = format!(r#"{{"{A}":null}}"#);
        assert!(parse_path_infos(&StoreDir::default(), invalid.as_bytes()).is_err());
    }

    /// The same four paths (an input-addressed output, its derivation, a
    /// recursive and a flat content-addressed source) and an invalid path,
    /// as Nix 2.34 prints them in format 1 and in format 2 (with a reference
    /// and a signature added to the source by hand).
    const FORMAT_1: &str = r#"{"/nix/store/00000000000000000000000000000000-x":null,"/nix/store/0pqyvyw21p553pf74czgvqks0vjaqp0l-t1":{"ca":null,"deriver":"/nix/store/257g5944d78w0sppjaj74h6sjp642vbp-t1.drv","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"registrationTime":1796646799,"signatures":[],"storeDir":"/nix/store","ultimate":true,"version":1},"/nix/store/257g5944d78w0sppjaj74h6sjp642vbp-t1.drv":{"ca":"text:sha256:07s1spr3yclhrz5k0b8spblwgy4vqhdh7jrps170s8bgpn4d1bdn","deriver":null,"narHash":"sha256-3Iw63BIWhKVKgO28GvFOpegBUyI3Ghy9vxdg7iGoUG4=","narSize":360,"references":[],"registrationTime":1796646799,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":1},"/nix/store/rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt":{"ca":"fixed:sha256:1xk2hhjr0f2n4adj1h688wlz59xpl86y1r8bd2pjasg8gy16mikb","deriver":null,"narHash":"sha256-9ghaZFx/EaQcb/iSvPSo4YWuRiQyJzTrcjW1PHdJ6MM=","narSize":120,"references":[],"registrationTime":1796646950,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":1},"/nix/store/yx6zyqqwqi4vzssch0gpw20pmycsy9s8-src":{"ca":"fixed:r:sha256:18l2zj8v9v7ywhnxhbvn50dldj0h6nzfi1nii2xd79nkj6ivx2cm","deriver":null,"narHash":"sha256-lYm+o5HTptO6iNGG6L41EMhGGyh2L9gt5P7stJH8gqI=","narSize":288,"references":["/nix/store/rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt"],"registrationTime":1796646950,"signatures":["test-1:c2ln"],"storeDir":"/nix/store","ultimate":false,"version":1}}"#;
    const FORMAT_2: &str = r#"{"info":{"00000000000000000000000000000000-x":null,"0pqyvyw21p553pf74czgvqks0vjaqp0l-t1":{"ca":null,"deriver":"257g5944d78w0sppjaj74h6sjp642vbp-t1.drv","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"registrationTime":1796646799,"signatures":[],"storeDir":"/nix/store","ultimate":true,"version":2},"257g5944d78w0sppjaj74h6sjp642vbp-t1.drv":{"ca":{"hash":"sha256-tq3QiL1vIQ1O0DfLAxvEm/jH6boaLTDLz5AyP/LVQR8=","method":"text"},"deriver":null,"narHash":"sha256-3Iw63BIWhKVKgO28GvFOpegBUyI3Ghy9vxdg7iGoUG4=","narSize":360,"references":[],"registrationTime":1796646799,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":2},"rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt":{"ca":{"hash":"sha256-a8Zqgn/oaSWvaAvl4A2it6fyKUfIwCCbIlY4kCWEYvY=","method":"flat"},"deriver":null,"narHash":"sha256-9ghaZFx/EaQcb/iSvPSo4YWuRiQyJzTrcjW1PHdJ6MM=","narSize":120,"references":[],"registrationTime":1796646950,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":2},"yx6zyqqwqi4vzssch0gpw20pmycsy9s8-src":{"ca":{"hash":"sha256-lYm+o5HTptO6iNGG6L41EMhGGyh2L9gt5P7stJH8gqI=","method":"nar"},"deriver":null,"narHash":"sha256-lYm+o5HTptO6iNGG6L41EMhGGyh2L9gt5P7stJH8gqI=","narSize":288,"references":["rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt"],"registrationTime":1796646950,"signatures":["test-1:c2ln"],"storeDir":"/nix/store","ultimate":false,"version":2}},"storeDir":"/nix/store","version":2}"#;

    #[test]
    fn format_2_reads_as_format_1() {
        let valid = |json: &str| {
            let without_invalid: serde_json::Value = {
                let mut value: serde_json::Value = serde_json::from_str(json).expect("JSON");
                let map = match value.get("info") {
                    Some(_) => &mut value["info"],
                    None => &mut value,
                };
                map.as_object_mut()
                    .expect("an object")
                    .retain(|_, info| !info.is_null());
                value
            };
            parse_path_infos(&StoreDir::default(), without_invalid.to_string().as_bytes())
                .expect("parses")
        };
        let (first, second) = (valid(FORMAT_1), valid(FORMAT_2));
        assert_eq!(first.len(), 4);
        assert_eq!(first, second);
        let source = second
            .iter()
            .find(|info| info.path.to_string().ends_with("-src"))
            .expect("the source");
        assert_eq!(
            source.references[0].to_string(),
            "rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt"
        );
        assert_eq!(source.signing_key_names().collect::<Vec<_>>(), ["test-1"]);

        let only_valid = HashSet::from(
            [
                "0pqyvyw21p553pf74czgvqks0vjaqp0l-t1",
                "257g5944d78w0sppjaj74h6sjp642vbp-t1.drv",
                "rkf79g8l9nv68w00j1z80zjn9aw7szx3-flat.txt",
                "yx6zyqqwqi4vzssch0gpw20pmycsy9s8-src",
            ]
            .map(|name| format!("/nix/store/{name}")),
        );
        assert_eq!(
            parse_validity(FORMAT_1.as_bytes()).expect("parses"),
            only_valid
        );
        assert_eq!(
            parse_validity(FORMAT_2.as_bytes()).expect("parses"),
            only_valid
        );
        // An invalid path asked for is an error, in either format.
        assert!(parse_path_infos(&StoreDir::default(), FORMAT_2.as_bytes()).is_err());
    }

    #[test]
    fn structured_content_addresses_in_narinfo_spelling() {
        let text = |method: &str, hash: &str| {
            RawContentAddress::Structured {
                method: method.to_owned(),
                hash: hash.to_owned(),
            }
            .into_narinfo_text()
        };
        // sha1 and sha512 occur in fixed-output derivations (fetchurl). The
        // SHA-1 of nothing, in base 32 as `nix-hash --to-base32` spells it.
        assert_eq!(
            text("nar", "sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk=").as_deref(),
            Ok("fixed:r:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs")
        );
        assert!(
            text("git", "sha256-lYm+o5HTptO6iNGG6L41EMhGGyh2L9gt5P7stJH8gqI=")
                .is_ok_and(|text| text.starts_with("fixed:git:sha256:"))
        );
        assert!(text("nar", "sha256-AAAA").is_err(), "a short digest");
        assert!(text("nar", "sha3-AAAA").is_err(), "an unknown algorithm");
        assert!(text("other", "sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk=").is_err());
        assert!(text("nar", "no dash").is_err());
    }
}
