//! `sandoff nar ...` and `sandoff hash ...`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sandoff::store::{nar, StoreLocation};

#[derive(Subcommand, Debug)]
pub enum NarCommand {
    /// Write the NAR serialisation of PATH to stdout (as `nix-store --dump`).
    Dump { path: PathBuf },
    /// Read a NAR from stdin and restore it at DEST, which must not exist (as `nix-store --restore`).
    Restore { dest: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum HashCommand {
    /// SHA-256 of the NAR serialisation of PATH (as `nix-hash --type sha256`).
    Path {
        /// Print nix-base32 instead of hexadecimal.
        #[arg(long, conflicts_with = "sri")]
        base32: bool,
        /// Print an SRI hash (`sha256-<base64>`).
        #[arg(long)]
        sri: bool,
        path: PathBuf,
    },
}

/// `sandoff nar dump|restore`.
pub fn run_nar(cmd: NarCommand, _loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    match cmd {
        NarCommand::Dump { path } => {
            // The writer gathers output in 1 MiB blocks, so no BufWriter is needed.
            let mut out = std::io::stdout().lock();
            nar::dump(&path, &mut out)?;
            out.flush()?;
        }
        NarCommand::Restore { dest } => {
            let mut input = std::io::stdin().lock();
            nar::restore_whole(&mut input, &dest)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sandoff hash path`.
pub fn run_hash(cmd: HashCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        HashCommand::Path { base32, sri, path } => {
            let (hash, _size) = nar::hash_path(&path)?;
            let text = if base32 {
                hash.to_nix32()
            } else if sri {
                hash.to_sri()
            } else {
                hash.to_base16()
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
