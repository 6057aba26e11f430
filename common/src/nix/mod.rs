//! Nix's formats, byte for byte: pure code with no IO of its own.
