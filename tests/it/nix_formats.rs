//! Nix formats checked against the real Nix client.
