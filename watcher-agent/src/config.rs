//! The client's configuration: the servers `larder login` added, their
//! tokens and which one is the default, in
//! `$XDG_CONFIG_HOME/larder/config.toml` (else `~/.config/larder/…`).
//!
//! The file holds tokens, so it is written with mode 0600 (through a
//! temporary file and a rename, so a crash never leaves half a file), and a
//! token never appears in `Debug` output. `LARDER_TOKEN` overrides the
//! stored token of whichever server a command talks to, for CI jobs that
//! get their token from a secret store.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use larder_api::cache_name::{CacheName, CacheNameError};
use larder_api::duration::HumanDuration;
use serde::{Deserialize, Serialize};

/// The environment variable whose token replaces the stored one.
pub const TOKEN_ENV: &str = "LARDER_TOKEN";

/// Why the configuration could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("neither XDG_CONFIG_HOME nor HOME is set, so there is no place for the config")]
    NoConfigDirectory,
    #[error("neither XDG_STATE_HOME nor HOME is set, so there is no place for the agent's queue")]
    NoStateDirectory,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid larder config: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no server named {0:?} is configured (add it with `larder login {0} URL TOKEN`)")]
    UnknownServer(String),
    #[error("no server is configured (add one with `larder login NAME URL TOKEN`)")]
    NoServers,
    #[error("invalid server name {0:?}: use letters, digits, '-', '_' and '.' only")]
    BadServerName(String),
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
}

/// A token: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…)")
    }
}

/// One server as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerEntry {
    /// The server's base URL, with a trailing `/`.
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_server: Option<String>,
    #[serde(default)]
    pub servers: BTreeMap<String, ServerEntry>,
    #[serde(default, skip_serializing_if = "AgentSettings::is_empty")]
    pub agent: AgentSettings,
}

/// The `[agent]` section: what `watcher-agent` does. Every key is
/// optional; see [`crate::agent::AgentConfig`] for the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Caches that receive every new valid path of the local store; none:
    /// the agent uploads only what `larder queue` gives it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watch_store: Vec<CacheRef>,
    /// The directory of the durable queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// The store directory as it is on disk (for a chroot store
    /// `ROOT/nix/store`); by default derived from Nix's `store` setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<PathBuf>,
    /// Uploads at once within one push.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<u16>,
    /// Failed attempts after which a queued path is marked failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The delay before the first retry; each later one doubles it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<HumanDuration>,
    /// The longest delay between two attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retry_delay: Option<HumanDuration>,
}

impl AgentSettings {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A server chosen for a command, with the token to use (`LARDER_TOKEN`
/// if set, else the stored one).
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub endpoint: String,
    pub token: Option<Token>,
}

/// A `CACHE` argument: `server:cache`, or `cache` on the default server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CacheRef {
    pub server: Option<String>,
    pub cache: CacheName,
}

impl FromStr for CacheRef {
    type Err = CacheNameError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            Some((server, cache)) => Ok(Self {
                server: Some(server.to_owned()),
                cache: cache.parse()?,
            }),
            None => Ok(Self {
                server: None,
                cache: text.parse()?,
            }),
        }
    }
}

impl TryFrom<String> for CacheRef {
    type Error = CacheNameError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<CacheRef> for String {
    fn from(cache: CacheRef) -> Self {
        cache.to_string()
    }
}

impl fmt::Display for CacheRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.server {
            Some(server) => write!(f, "{server}:{}", self.cache),
            None => write!(f, "{}", self.cache),
        }
    }
}

/// `$XDG_CONFIG_HOME`, else `~/.config`: where both Larder's and Nix's
/// user configuration live.
pub fn config_home() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(".config"))
        .ok_or(ConfigError::NoConfigDirectory)
}

/// `$XDG_STATE_HOME`, else `~/.local/state`: where the agent keeps its
/// queue.
pub fn state_home() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(".local/state"))
        .ok_or(ConfigError::NoStateDirectory)
}

/// The configuration file's path.
pub fn config_path() -> Result<PathBuf, ConfigError> {
    Ok(config_home()?.join("larder").join("config.toml"))
}

impl ClientConfig {
    /// Reads the file at `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.message().to_owned(),
        })
    }

    /// Writes the file at `path` with mode 0600, replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        write_private_file(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Adds or replaces a server. The first server becomes the default,
    /// and so does any server added with `set_default`. Returns whether it
    /// is now the default.
    pub fn add_server(
        &mut self,
        name: &str,
        url: &str,
        token: Option<Token>,
        set_default: bool,
    ) -> Result<bool, ConfigError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::BadServerName(name.to_owned()));
        }
        let endpoint = normalise_endpoint(url)?;
        self.servers
            .insert(name.to_owned(), ServerEntry { endpoint, token });
        let default_is_valid = self
            .default_server
            .as_ref()
            .is_some_and(|default| self.servers.contains_key(default));
        if set_default || !default_is_valid {
            self.default_server = Some(name.to_owned());
        }
        Ok(self.default_server.as_deref() == Some(name))
    }

    /// The server `name`, or the default one, with the token to use.
    pub fn server(&self, name: Option<&str>) -> Result<Server, ConfigError> {
        let name = match name {
            Some(name) => name,
            None => self
                .default_server
                .as_deref()
                .ok_or(ConfigError::NoServers)?,
        };
        let entry = self
            .servers
            .get(name)
            .ok_or_else(|| ConfigError::UnknownServer(name.to_owned()))?;
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .filter(|token| !token.is_empty())
            .map(Token::new)
            .or_else(|| entry.token.clone());
        Ok(Server {
            name: name.to_owned(),
            endpoint: entry.endpoint.clone(),
            token,
        })
    }
}

/// An `http(s)://host[:port][/prefix]` URL with exactly one trailing `/`.
fn normalise_endpoint(url: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| ConfigError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|error| bad(&error.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("it must not have a query or a fragment"));
    }
    Ok(format!("{}/", parsed.as_str().trim_end_matches('/')))
}

/// Writes `contents` to `path` readable by the owner only, through a
/// temporary file in the same directory and a rename, creating the
/// directory if needed.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_refs_name_a_server_or_the_default() {
        let plain: CacheRef = "hello".parse().expect("valid");
        assert_eq!(plain.server, None);
        assert_eq!(plain.cache.as_str(), "hello");
        let qualified: CacheRef = "work:hello".parse().expect("valid");
        assert_eq!(qualified.server.as_deref(), Some("work"));
        assert_eq!(qualified.to_string(), "work:hello");
        assert!("work:_api".parse::<CacheRef>().is_err());
    }

    #[test]
    fn the_first_server_becomes_the_default() {
        let mut config = ClientConfig::default();
        assert!(config
            .add_server("a", "http://a.example", None, false)
            .expect("valid"));
        assert!(!config
            .add_server("b", "https://b.example/prefix/", None, false)
            .expect("valid"));
        assert_eq!(config.default_server.as_deref(), Some("a"));
        assert_eq!(config.servers["a"].endpoint, "http://a.example/");
        assert_eq!(config.servers["b"].endpoint, "https://b.example/prefix/");
        assert!(config
            .add_server("b", "https://b.example", None, true)
            .expect("valid"));
        assert_eq!(config.default_server.as_deref(), Some("b"));
    }

    #[test]
    fn bad_urls_and_names_are_refused() {
        let mut config = ClientConfig::default();
        for url in ["ftp://x", "not a url", "http://x/?q=1"] {
            assert!(matches!(
                config.add_server("a", url, None, false),
                Err(ConfigError::BadUrl { .. })
            ));
        }
        assert!(matches!(
            config.add_server("a:b", "http://x", None, false),
            Err(ConfigError::BadServerName(_))
        ));
    }

    #[test]
    fn saved_config_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("larder/config.toml");
        let mut config = ClientConfig::default();
        config
            .add_server("a", "http://a.example", Some(Token::new("secret")), false)
            .expect("valid");
        config.save(&path).expect("save");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClientConfig::load(&path).expect("load"), config);
        assert!(!format!("{config:?}").contains("secret"));
    }
}
