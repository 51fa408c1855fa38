//! `sandoff derivation ...`.

use std::process::ExitCode;

use clap::Subcommand;
use sandoff::store::StoreLocation;

#[derive(Subcommand, Debug)]
pub enum DerivationCommand {
    /// Print derivations as JSON, as `nix show-derivation` does.
    Show {
        #[arg(required = true)]
        drvs: Vec<String>,
    },
    /// Read one derivation as JSON (one entry of `nix show-derivation`) on stdin, write it to the store, print its path.
    Add,
}

pub fn run(cmd: DerivationCommand, _loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    anyhow::bail!("{cmd:?}: not implemented yet")
}
