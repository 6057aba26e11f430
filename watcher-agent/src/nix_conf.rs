//! Editing the user's Nix configuration for `larder use`: a substituter and
//! its public key in nix.conf, and the token in the netrc file Nix sends
//! as HTTP Basic credentials (Nix 2.8 has no bearer tokens for caches).
//!
//! Edits are idempotent and keep everything else in the files as it was:
//! a value already present (in the plain or the `extra-` form of a
//! setting) is not added again, values are appended to an existing
//! `extra-…` line rather than repeated in a new one, and a netrc entry is
//! only rewritten when its token changed.
//!
//! The values come from the server, which is not trusted with the user's
//! Nix configuration: [`check_substituter`] and [`check_public_key`] refuse
//! anything that could end a nix.conf line or list item early (a newline,
//! any whitespace or control character, a `#` that starts a comment) and
//! so add a line of the server's choosing, such as `post-build-hook = …`,
//! or a netrc entry; [`check_token`] does the same for the token written to
//! netrc.

use std::path::{Path, PathBuf};

use crate::config::{config_home, write_private_file, ConfigError};

/// Where the user's nix.conf is: the first of `NIX_USER_CONF_FILES` when
/// that is set (Nix then reads only those files), else
/// `$XDG_CONFIG_HOME/nix/nix.conf`.
pub fn user_nix_conf_path() -> Result<PathBuf, ConfigError> {
    if let Some(files) = std::env::var_os("NIX_USER_CONF_FILES") {
        if let Some(first) = std::env::split_paths(&files).find(|path| !path.as_os_str().is_empty())
        {
            return Ok(first);
        }
    }
    Ok(config_home()?.join("nix").join("nix.conf"))
}

/// The netrc file Larder writes when nix.conf names none.
pub fn default_netrc_path() -> Result<PathBuf, ConfigError> {
    Ok(config_home()?.join("nix").join("netrc"))
}

/// A value that `larder use` will not write into nix.conf or netrc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfValueError {
    #[error(
        "the server sent a {what} that Nix's configuration cannot hold safely, {value:?}: {reason}"
    )]
    FromServer {
        what: &'static str,
        /// The value, cut short (and escaped by the message).
        value: String,
        reason: String,
    },
    /// The token itself is a secret: never part of the message.
    #[error("the token is empty or holds whitespace, control or non-ASCII characters, which netrc cannot hold")]
    Token,
}

impl ConfValueError {
    fn new(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self::FromServer {
            what,
            value: value.chars().take(120).collect(),
            reason: reason.into(),
        }
    }
}

/// Rejects what would not stay one list item on one nix.conf line: Nix
/// splits lines at newlines, cuts them at `#` and items at spaces, tabs
/// and carriage returns; visible ASCII but `#` is left.
fn check_list_item(what: &'static str, value: &str) -> Result<(), ConfValueError> {
    if value.is_empty() {
        return Err(ConfValueError::new(what, value, "it is empty"));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic() || *c == '#') {
        let reason = match bad {
            '#' => "it holds a `#`, which starts a comment in nix.conf".to_owned(),
            c if c.is_control() => format!("it holds the control character {c:?}"),
            c if c.is_whitespace() => format!("it holds whitespace ({c:?})"),
            c => format!("it holds {c:?}, which is not plain visible ASCII"),
        };
        return Err(ConfValueError::new(what, value, reason));
    }
    Ok(())
}

/// Checks a substituter URL from the server: one nix.conf list item, an
/// `http` or `https` URL with a host. Returns that host (for netrc).
pub fn check_substituter(value: &str) -> Result<String, ConfValueError> {
    const WHAT: &str = "substituter endpoint";
    check_list_item(WHAT, value)?;
    let url = reqwest::Url::parse(value)
        .map_err(|error| ConfValueError::new(WHAT, value, format!("it is not a URL ({error})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfValueError::new(
            WHAT,
            value,
            format!("its scheme is {:?}, not http or https", url.scheme()),
        ));
    }
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| ConfValueError::new(WHAT, value, "it names no host"))?;
    Ok(host.to_owned())
}

/// Checks a public key from the server: one nix.conf list item and a
/// valid `name:base64` ed25519 key.
pub fn check_public_key(value: &str) -> Result<(), ConfValueError> {
    const WHAT: &str = "public key";
    check_list_item(WHAT, value)?;
    larder_nix::PublicKey::parse(value)
        .map(drop)
        .map_err(|error| ConfValueError::new(WHAT, value, error.to_string()))
}

/// Checks a token before it goes into netrc, where whitespace separates
/// tokens and a newline starts a new entry.
pub fn check_token(token: &str) -> Result<(), ConfValueError> {
    if token.is_empty() || token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(ConfValueError::Token);
    }
    Ok(())
}

/// A nix.conf file in memory, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConf {
    lines: Vec<String>,
}

impl NixConf {
    pub fn parse(text: &str) -> Self {
        Self {
            lines: text.lines().map(str::to_owned).collect(),
        }
    }

    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::parse("")),
            Err(error) => Err(error),
        }
    }

    pub fn render(&self) -> String {
        let mut text = self.lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    }

    /// `(line index, key, value)` of every `key = value` line.
    fn settings(&self) -> impl Iterator<Item = (usize, &str, &str)> {
        self.lines.iter().enumerate().filter_map(|(index, line)| {
            let content = line.split('#').next().unwrap_or_default();
            let (key, value) = content.split_once('=')?;
            Some((index, key.trim(), value.trim()))
        })
    }

    /// The value of the last line setting `key`, as Nix reads it (later
    /// lines win).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings()
            .filter(|(_, name, _)| *name == key)
            .last()
            .map(|(_, _, value)| value)
    }

    /// Adds `value` to the list setting `key` (e.g. `substituters`) unless
    /// it is already in `key` or `extra-key`. Returns whether it changed.
    pub fn add_to_list(&mut self, key: &str, value: &str) -> bool {
        let extra_key = format!("extra-{key}");
        let present = self.settings().any(|(_, name, values)| {
            (name == key || name == extra_key) && values.split_whitespace().any(|v| v == value)
        });
        if present {
            return false;
        }
        let extra_line = self
            .settings()
            .filter(|(_, name, _)| *name == extra_key)
            .map(|(index, _, values)| (index, values.to_owned()))
            .last();
        match extra_line {
            Some((index, values)) => {
                self.lines[index] = format!("{extra_key} = {values} {value}");
            }
            None => self.lines.push(format!("{extra_key} = {value}")),
        }
        true
    }

    /// Sets `key = value` when `key` is not set at all. Returns whether it
    /// changed.
    pub fn set_if_absent(&mut self, key: &str, value: &str) -> bool {
        if self.get(key).is_some() {
            return false;
        }
        self.lines.push(format!("{key} = {value}"));
        true
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory)?;
        }
        std::fs::write(path, self.render())
    }
}

/// What [`upsert_netrc_entry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetrcChange {
    Added,
    /// The host had an entry with another password; it was replaced.
    Replaced,
    Unchanged,
}

/// Makes `text` (a netrc file) hold `machine HOST password TOKEN`,
/// replacing any other entry for `host` (which may span several lines)
/// and leaving the rest untouched.
pub fn upsert_netrc_entry(text: &str, host: &str, token: &str) -> (String, NetrcChange) {
    let entry = format!("machine {host} password {token}");
    let lines: Vec<&str> = text.lines().collect();
    let starts_entry = |line: &str| {
        let mut words = line.split_whitespace();
        matches!(words.next(), Some("machine" | "default"))
    };
    let ours = lines.iter().position(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.len() >= 2 && words[0] == "machine" && words[1] == host
    });
    let mut out: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
    let change = match ours {
        None => {
            out.push(entry);
            NetrcChange::Added
        }
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|line| starts_entry(line))
                .map_or(lines.len(), |offset| start + 1 + offset);
            let words: Vec<&str> = lines[start..end]
                .iter()
                .flat_map(|line| line.split_whitespace())
                .collect();
            let has_token = words
                .windows(2)
                .any(|pair| pair[0] == "password" && pair[1] == token);
            if has_token {
                NetrcChange::Unchanged
            } else {
                out.splice(start..end, [entry]);
                NetrcChange::Replaced
            }
        }
    };
    let mut rendered = out.join("\n");
    rendered.push('\n');
    (rendered, change)
}

/// Reads a netrc file (missing is empty), applies
/// [`upsert_netrc_entry`], and writes it back with mode 0600 if it changed.
pub fn update_netrc_file(path: &Path, host: &str, token: &str) -> std::io::Result<NetrcChange> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error),
    };
    let (updated, change) = upsert_netrc_entry(&text, host, token);
    if change != NetrcChange::Unchanged {
        write_private_file(path, updated.as_bytes())?;
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_values_are_added_once() {
        let mut conf = NixConf::parse("# mine\nsubstituters = https://a\nsandbox = true");
        assert!(conf.add_to_list("substituters", "http://b/c"));
        assert!(!conf.add_to_list("substituters", "http://b/c"));
        assert!(!conf.add_to_list("substituters", "https://a"));
        assert!(conf.add_to_list("substituters", "http://d/e"));
        assert_eq!(
            conf.render(),
            "# mine\nsubstituters = https://a\nsandbox = true\nextra-substituters = http://b/c http://d/e\n"
        );
    }

    #[test]
    fn settings_are_set_only_when_absent() {
        let mut conf = NixConf::parse("netrc-file = /etc/mine # comment\n");
        assert_eq!(conf.get("netrc-file"), Some("/etc/mine"));
        assert!(!conf.set_if_absent("netrc-file", "/other"));
        let mut empty = NixConf::parse("");
        assert!(empty.set_if_absent("netrc-file", "/x/netrc"));
        assert_eq!(empty.render(), "netrc-file = /x/netrc\n");
    }

    #[test]
    fn server_values_that_could_add_lines_or_items_are_refused() {
        let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        assert_eq!(
            check_substituter("https://cache.example.com/hello").as_deref(),
            Ok("cache.example.com")
        );
        assert_eq!(
            check_substituter("http://[::1]:8080/c").as_deref(),
            Ok("[::1]")
        );
        assert_eq!(check_public_key(key), Ok(()));
        for bad in [
            "http://h/c\npost-build-hook = /tmp/evil",
            "http://h/c\rx",
            "http://h/c https://evil/",
            "http://h/c\thttps://evil/",
            "http://h/c#",
            "http://h/c\u{85}",
            "http://h/\u{e9}",
            "",
            "not a url",
            "file:///tmp/store",
            "unix:/tmp/socket",
            "http://:80/c",
        ] {
            assert!(check_substituter(bad).is_err(), "{bad:?}");
        }
        for bad in [
            format!("{key}\npost-build-hook = /tmp/evil"),
            format!("{key}\n"),
            format!("{key} other-1:x"),
            format!("x#y:{}", &key["cache.nixos.org-1:".len()..]),
            "cache-1:not base64".to_owned(),
            "cache-1:AAAA".to_owned(),
            "no-colon".to_owned(),
        ] {
            assert!(check_public_key(&bad).is_err(), "{bad:?}");
        }
        let message = check_substituter("http://h/c\npost-build-hook = /tmp/evil")
            .expect_err("refused")
            .to_string();
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(message.contains("control character"), "{message}");
        assert!(check_token("eyJ0.eyJ.sig").is_ok());
        for bad in ["", "a b", "a\nmachine evil password x", "t\u{0}"] {
            assert_eq!(check_token(bad), Err(ConfValueError::Token), "{bad:?}");
        }
    }

    #[test]
    fn netrc_entries_are_added_replaced_or_kept() {
        let (text, change) = upsert_netrc_entry("", "h", "t1");
        assert_eq!(
            (text.as_str(), change),
            ("machine h password t1\n", NetrcChange::Added)
        );
        let (again, change) = upsert_netrc_entry(&text, "h", "t1");
        assert_eq!(
            (again.as_str(), change),
            (text.as_str(), NetrcChange::Unchanged)
        );
        let existing = "machine other password x\nmachine h\n  login nix\n  password old\ndefault login a password b\n";
        let (text, change) = upsert_netrc_entry(existing, "h", "t2");
        assert_eq!(change, NetrcChange::Replaced);
        assert_eq!(
            text,
            "machine other password x\nmachine h password t2\ndefault login a password b\n"
        );
    }
}
