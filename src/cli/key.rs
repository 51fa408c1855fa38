//! `sandoff key ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use sandoff::bounded;
use sandoff::store::keyring::Keyring;
use sandoff::store::signature::{SecretKey, SignatureError, TrustedKeys};
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
    /// Print this machine's public signing key (made by `sandoff setup`).
    Show,
    /// Trust the public keys in FILE (`-` for stdin) for import and verify,
    /// by adding them to <state>/trusted-keys.
    Authorize {
        /// A file of public keys in Nix's `name:base64` format, one per line.
        file: PathBuf,
    },
}

pub fn run(cmd: KeyCommand, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let ring = Keyring::new(&loc.state);
    match cmd {
        KeyCommand::Show => {
            outln!("{}", ring.public_key()?);
            Ok(ExitCode::SUCCESS)
        }
        KeyCommand::Authorize { file } => {
            let keys = if file.as_os_str() == "-" {
                // Bounded as a file would be: stdin may be anything.
                let bytes = bounded::read_all(std::io::stdin(), bounded::TRUSTED_KEYS_LIMIT)
                    .context("reading public keys from stdin")?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| anyhow::anyhow!("the public keys on stdin are not UTF-8 text"))?;
                TrustedKeys::parse(&text, "stdin")?
            } else {
                TrustedKeys::read_file(&file)?
            };
            if keys.is_empty() {
                anyhow::bail!("no public key in '{}'", file.display());
            }
            let added = ring.authorize(&keys)?;
            eprintln!(
                "{added} new key(s) trusted in '{}'",
                ring.trusted_keys_path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
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
