//! Offloading builds to other machines. For now: the server side of Nix's
//! serve protocol (`nix-store --serve`), so that a Nix client can copy paths
//! into and out of a sandoff store over ssh.

pub mod serve;
