//! `sandoff key ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use sandoff::store::signature::{SecretKey, SignatureError};
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
    match cmd {
        KeyCommand::Generate {
            name,
            secret_file,
            public_file,
        } => {
            // Checked up front so that a clash never leaves half a key pair behind.
            if public_file.symlink_metadata().is_ok() {
                return Err(SignatureError::Exists { path: public_file }.into());
            }
            let key = SecretKey::generate(&name)?;
            key.write_file(&secret_file)?;
            if let Err(e) = key.to_public().write_file(&public_file) {
                std::fs::remove_file(&secret_file).with_context(|| {
                    format!("removing '{}' after a failure", secret_file.display())
                })?;
                return Err(e.into());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
