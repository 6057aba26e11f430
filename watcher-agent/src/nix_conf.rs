//! Editing the user's Nix configuration for `larder use`: a substituter and
//! its public key in nix.conf, and the token in the netrc file Nix sends
//! as HTTP Basic credentials (Nix 2.8 has no bearer tokens for caches).
//!
//! Edits are idempotent and keep everything else in the files as it was:
//! a value already present (in the plain or the `extra-` form of a
//! setting) is not added again, values are appended to an existing
//! `extra-…` line rather than repeated in a new one, and a netrc entry is
//! only rewritten when its token changed.

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
