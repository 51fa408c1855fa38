//! `sandoff serve --stdio [--write]`: the server side of Nix's serve
//! protocol on stdin/stdout, as `nix-store --serve [--write]` (what Nix's
//! `ssh://` store runs on the remote machine).

use std::io::{self, BufReader, BufWriter};
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use sandoff::offload::serve::{serve, ServeOptions};
use sandoff::store::local::LocalStore;
use sandoff::store::StoreLocation;

/// Options of `sandoff serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Speak the protocol on stdin and stdout (the only transport so far).
    #[arg(long)]
    stdio: bool,
    /// Allow clients to add paths (ImportPaths, AddToStoreNar).
    #[arg(long)]
    write: bool,
}

pub fn run(args: ServeArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    if !args.stdio {
        bail!("serve: --stdio is required (it is the only transport so far)");
    }
    let store = LocalStore::open(loc.clone())?;
    let mut input = BufReader::new(io::stdin().lock());
    let mut output = BufWriter::new(io::stdout().lock());
    serve(
        &store,
        &mut input,
        &mut output,
        ServeOptions { write: args.write },
    )?;
    Ok(ExitCode::SUCCESS)
}
