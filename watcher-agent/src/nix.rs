//! The local Nix store, reached only through the `nix` command line, so
//! that whatever store the user's Nix uses (`NIX_REMOTE`, the `store`
//! setting in `NIX_CONFIG` or nix.conf, a daemon, a chroot store) is the
//! store Larder reads.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;

use base64::Engine as _;
use bytes::Bytes;
use larder_nix::{base32, NarHash, StoreDir, StorePath, StorePathHash};
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

/// The NARs of `paths` (full store paths, each with its NarSize), in that
/// order, from one `nix-store --export`: one process for many small
/// paths instead of one `nix store dump-path` each, which costs about
/// 30 ms of CPU here whatever the path's size (issue #14). The whole
/// export is held in memory, so callers keep batches small. Nix checks
/// each NAR against the hash its database records as it exports it.
pub async fn export_nars(paths: &[(String, u64)]) -> Result<Vec<Bytes>, NixError> {
    let mut command = Command::new("nix-store");
    command.arg("--export").arg("--");
    command.args(paths.iter().map(|(path, _)| path));
    let shown = format!("nix-store --export ({} paths)", paths.len());
    let stream = run(command, &shown).await?;
    split_export(Bytes::from(stream), paths).map_err(|reason| NixError::BadOutput {
        command: shown,
        reason,
    })
}

/// What `nix-store --export` writes after each NAR, before its path.
const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Cuts an export stream of `paths` into their NARs, in the order of
/// `paths`. The stream is, per path, `1`, the NAR, [`EXPORT_MAGIC`], the
/// path, its references, its deriver and `0` (no signature), then `0`;
/// numbers are u64 little-endian, strings length-prefixed and padded to 8
/// bytes. A NAR carries no length, and the path comes after it, so the
/// NAR of an entry is the one of the paths asked for whose NarSize lands
/// on the magic and that path's name.
fn split_export(stream: Bytes, paths: &[(String, u64)]) -> Result<Vec<Bytes>, String> {
    let mut nars: Vec<Option<Bytes>> = vec![None; paths.len()];
    let mut cursor = ExportCursor {
        stream: &stream,
        at: 0,
    };
    loop {
        match cursor.number()? {
            0 => break,
            1 => {}
            other => return Err(format!("an entry begins with {other}, not 1")),
        }
        let start = cursor.at;
        let (index, size) = paths
            .iter()
            .enumerate()
            .filter(|(index, _)| nars[*index].is_none())
            .find_map(|(index, (path, size))| {
                let end = usize::try_from(*size).ok()?.checked_add(start)?;
                let mut after = ExportCursor {
                    stream: &stream,
                    at: end,
                };
                let named =
                    after.number().ok()? == EXPORT_MAGIC && after.string().ok()? == path.as_bytes();
                named.then_some((index, end - start))
            })
            .ok_or_else(|| {
                format!("the entry at byte {start} is the NAR of none of the paths asked for")
            })?;
        nars[index] = Some(stream.slice(start..start + size));
        cursor.at = start + size;
        cursor.number()?; // the magic
        cursor.string()?; // the path
        for _ in 0..cursor.number()? {
            cursor.string()?; // a reference
        }
        cursor.string()?; // the deriver
        if cursor.number()? == 1 {
            cursor.string()?; // a legacy signature
        }
    }
    if cursor.at != stream.len() {
        return Err(format!("{} bytes after the end", stream.len() - cursor.at));
    }
    nars.into_iter()
        .zip(paths)
        .map(|(nar, (path, _))| nar.ok_or_else(|| format!("{path} is missing")))
        .collect()
}

/// Reads the numbers and strings of an export stream.
struct ExportCursor<'a> {
    stream: &'a [u8],
    at: usize,
}

impl<'a> ExportCursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let stream: &'a [u8] = self.stream;
        let bytes = self
            .at
            .checked_add(len)
            .and_then(|end| stream.get(self.at..end))
            .ok_or_else(|| format!("the stream ends within {len} bytes at byte {}", self.at))?;
        self.at += len;
        Ok(bytes)
    }

    fn number(&mut self) -> Result<u64, String> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn string(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.number()?).map_err(|error| error.to_string())?;
        let padded = len.checked_next_multiple_of(8).ok_or("a string too long")?;
        Ok(&self.take(padded)?[..len])
    }
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

    /// An export stream as `nix-store --export` writes it, of `(path,
    /// NAR, references, deriver)` entries.
    fn export_stream(entries: &[(&str, &[u8], &[&str], &str)]) -> Vec<u8> {
        fn number(out: &mut Vec<u8>, n: u64) {
            out.extend_from_slice(&n.to_le_bytes());
        }
        fn string(out: &mut Vec<u8>, s: &[u8]) {
            number(out, s.len() as u64);
            out.extend_from_slice(s);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        let mut out = Vec::new();
        for (path, nar, references, deriver) in entries {
            number(&mut out, 1);
            out.extend_from_slice(nar);
            number(&mut out, EXPORT_MAGIC);
            string(&mut out, path.as_bytes());
            number(&mut out, references.len() as u64);
            for reference in *references {
                string(&mut out, reference.as_bytes());
            }
            string(&mut out, deriver.as_bytes());
            number(&mut out, 0);
        }
        number(&mut out, 0);
        out
    }

    const EXPORTED_A: &str = "/nix/store/r98n00kc00i6a2i1rz5qwnyzsaq93f78-a";
    const EXPORTED_B: &str = "/nix/store/fdf38z0x4q6xxfc0v5xr0ly08ih47sk5-b";

    #[test]
    fn an_export_is_cut_into_the_nars_asked_for_in_their_order() {
        // B refers to A, so Nix exports A first; they are asked for B
        // first. A's NAR is a prefix of B's, so only the name tells them
        // apart at A's size.
        // Real NARs are padded to 8 bytes, as these are.
        let nar_a = b"nix-archive-1 a\0".to_vec();
        let nar_b = b"nix-archive-1 a and b, longer\0\0\0".to_vec();
        let stream = export_stream(&[
            (EXPORTED_A, &nar_a, &[], ""),
            (
                EXPORTED_B,
                &nar_b,
                &[EXPORTED_A, EXPORTED_B],
                "/nix/store/7g7vb5ig997dqlq2bg8x86bbzzf9imqj-b.drv",
            ),
        ]);
        let asked = [
            (EXPORTED_B.to_owned(), nar_b.len() as u64),
            (EXPORTED_A.to_owned(), nar_a.len() as u64),
        ];
        let nars = split_export(Bytes::from(stream), &asked).expect("a valid export");
        assert_eq!(nars, vec![Bytes::from(nar_b), Bytes::from(nar_a)]);
    }

    #[test]
    fn an_export_that_does_not_match_what_was_asked_is_refused() {
        let nar = b"nix-archive-1 a\0".to_vec();
        let stream = Bytes::from(export_stream(&[(EXPORTED_A, &nar, &[], "")]));
        let size = nar.len() as u64;
        // Another size, another path, one path too many.
        let wrong_size = split_export(stream.clone(), &[(EXPORTED_A.to_owned(), size + 8)]);
        assert!(wrong_size.is_err_and(|e| e.contains("none of the paths")));
        let wrong_path = split_export(stream.clone(), &[(EXPORTED_B.to_owned(), size)]);
        assert!(wrong_path.is_err_and(|e| e.contains("none of the paths")));
        let missing = split_export(
            stream.clone(),
            &[(EXPORTED_A.to_owned(), size), (EXPORTED_B.to_owned(), 1)],
        );
        assert_eq!(missing, Err(format!("{EXPORTED_B} is missing")));
        // Cut anywhere, or followed by anything, it is an error, not a
        // panic.
        for cut in 0..stream.len() {
            assert!(split_export(stream.slice(..cut), &[(EXPORTED_A.to_owned(), size)]).is_err());
        }
        let mut longer = stream.to_vec();
        longer.push(0);
        assert!(split_export(Bytes::from(longer), &[(EXPORTED_A.to_owned(), size)]).is_err());
    }

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
