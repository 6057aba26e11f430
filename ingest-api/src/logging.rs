//! Process-wide logging: human-readable by default, JSON lines for log
//! collectors; the level comes from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

use common::config::LogFormat;

/// Installs the global subscriber; a second call (tests starting several
/// servers in one process) keeps the first.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
