//! `sandoff nar ...` and `sandoff hash ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sandoff::store::StoreLocation;

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

pub fn run_nar(cmd: NarCommand, _loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    anyhow::bail!("{cmd:?}: not implemented yet")
}

pub fn run_hash(cmd: HashCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("{cmd:?}: not implemented yet")
}
