//! `sandoff key ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sandoff::store::StoreLocation;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Generate an ed25519 key pair in Nix's format (as `nix-store --generate-binary-cache-key`).
    Generate {
        /// The key's name, e.g. `cache.example.org-1`.
        name: String,
        secret_file: PathBuf,
        public_file: PathBuf,
    },
}

pub fn run(cmd: KeyCommand, _loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    anyhow::bail!("{cmd:?}: not implemented yet")
}
