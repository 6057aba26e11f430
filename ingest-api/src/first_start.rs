//! First start: a server with no config file writes one that works on this
//! machine alone (SQLite and a storage directory beside the config, a fresh
//! token-signing secret), so one command brings up a usable cache.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;

use larder_config::{
    AuthConfig, ConfigError, DatabaseConfig, GcConfig, HttpConfig, IngestConfig, LogConfig,
    OpsConfig, PipelineConfig, QueueConfig, QuotaConfig, Secret, ServerConfig, StorageConfig,
};

/// Bytes of randomness in a generated HS256 secret: twice the minimum, as
/// cheap as the minimum.
const GENERATED_SECRET_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FirstStartError {
    #[error("neither XDG_CONFIG_HOME nor HOME is set: pass --config PATH")]
    NoConfigHome,
    #[error("no config file at {0}: start the server once to create it, or pass --config")]
    Missing(PathBuf),
    #[error("creating {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `$XDG_CONFIG_HOME/larder/server.toml`, or `~/.config/larder/server.toml`.
pub fn default_config_path() -> Result<PathBuf, FirstStartError> {
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .ok_or(FirstStartError::NoConfigHome)?;
    Ok(config_home.join("larder").join("server.toml"))
}

/// The loaded configuration, and whether this start created it.
#[derive(Debug)]
pub struct Prepared {
    pub config: ServerConfig,
    pub created: bool,
}

/// Loads the config at `path`, creating it first when it does not exist.
pub fn prepare(path: &Path) -> Result<Prepared, FirstStartError> {
    let created = if path.exists() {
        false
    } else {
        create_default(path)?
    };
    Ok(Prepared {
        config: ServerConfig::load(path)?,
        created,
    })
}

/// Loads the config at `path`, which must exist (for the admin commands,
/// which must not invent a server).
pub fn load_existing(path: &Path) -> Result<ServerConfig, FirstStartError> {
    if !path.exists() {
        return Err(FirstStartError::Missing(path.to_owned()));
    }
    Ok(ServerConfig::load(path)?)
}

/// Writes a single-machine config with its data beside it. Returns false
/// when another process created the file first (then that one is used).
fn create_default(path: &Path) -> Result<bool, FirstStartError> {
    let create_error = |source| FirstStartError::Create {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(create_error)?;
    let dir = dir.canonicalize().map_err(create_error)?;
    let secret: [u8; GENERATED_SECRET_BYTES] = std::array::from_fn(|_| rand::random());
    let config = ServerConfig {
        listen: ServerConfig::default_listen(),
        api_endpoint: None,
        database: DatabaseConfig {
            url: Secret::new(format!("sqlite://{}", dir.join("server.db").display())),
        },
        storage: StorageConfig::Local {
            path: dir.join("storage"),
        },
        auth: AuthConfig {
            hs256_secret_base64: Some(Secret::new(
                base64::engine::general_purpose::STANDARD.encode(secret),
            )),
            rs256_private_key_pem: None,
        },
        ingest: IngestConfig::default(),
        http: HttpConfig::default(),
        pipeline: PipelineConfig::default(),
        gc: GcConfig::default(),
        queue: QueueConfig::default(),
        quota: QuotaConfig::default(),
        log: LogConfig::default(),
        ops: OpsConfig::default(),
    };
    let text = format!(
        "# Larder server configuration, written on first start.\n\
         # Every key can also be set by a LARDER_… environment variable,\n\
         # e.g. LARDER_DATABASE__URL or LARDER_API_ENDPOINT.\n\n{}",
        config.to_toml()
    );
    // create_new: two first starts racing must not overwrite each other's
    // secret; mode 0600: the file holds the token-signing secret.
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(error) => return Err(create_error(error)),
    };
    file.write_all(text.as_bytes()).map_err(create_error)?;
    file.sync_all().map_err(create_error)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_working_config_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("larder").join("server.toml");
        let first = prepare(&path).expect("first start");
        assert!(first.created);
        let mode = std::fs::metadata(&path).expect("stat").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(first.config.database.url.expose().starts_with("sqlite:///"));

        let second = prepare(&path).expect("second start");
        assert!(!second.created);
        assert_eq!(second.config.to_toml(), first.config.to_toml());
    }

    #[test]
    fn admin_commands_need_an_existing_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = load_existing(&dir.path().join("none.toml")).expect_err("missing");
        assert!(
            error.to_string().contains("start the server once"),
            "{error}"
        );
    }
}
