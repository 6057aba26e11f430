//! `nix-cache-info`, the file a substituter fetches first.

use std::fmt;

use super::store_path::StoreDir;

/// The contents of `/nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixCacheInfo {
    pub store_dir: StoreDir,
    /// Whether clients may query many paths at once (`WantMassQuery: 1`).
    pub want_mass_query: bool,
    /// Lower wins; cache.nixos.org is 40.
    pub priority: u32,
}

impl NixCacheInfo {
    /// The file's text, `text/x-nix-cache-info`.
    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for NixCacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        writeln!(f, "WantMassQuery: {}", u8::from(self.want_mass_query))?;
        writeln!(f, "Priority: {}", self.priority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let info = NixCacheInfo {
            store_dir: StoreDir::default(),
            want_mass_query: true,
            priority: 41,
        };
        assert_eq!(
            info.render(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"
        );
    }
}
