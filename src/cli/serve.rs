//! `sandoff serve --stdio [--write]`: the server side of Nix's serve
//! protocol on stdin/stdout, as `nix-store --serve [--write]` (what Nix's
//! `ssh://` store runs on the remote machine). With `--write` it also builds
//! (`BuildDerivation`, `BuildPaths`) in the local sandbox as the build users
//! of `--build-users-group`, streaming build logs on stderr, which ssh
//! carries to the client; see `sandoff::serve`.

use std::io::{self, BufReader, BufWriter};
use std::os::fd::AsFd;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use sandoff::serve::{serve_with_builds, BuildSetup, ServeOptions};
use sandoff::store::StoreLocation;

use super::build::{BuildUsersArgs, SandboxLimitsArgs};

/// Options of `sandoff serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Speak the protocol on stdin and stdout (the only transport so far).
    #[arg(long)]
    stdio: bool,
    /// Allow clients to add paths (ImportPaths, AddToStoreNar) and to build
    /// (BuildDerivation, BuildPaths).
    #[arg(long)]
    write: bool,
    #[command(flatten)]
    users: BuildUsersArgs,
    #[command(flatten)]
    limits: SandboxLimitsArgs,
}

pub fn run(args: ServeArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    if !args.stdio {
        bail!("serve: --stdio is required (it is the only transport so far)");
    }
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    // Needed only if something is to be built; the error is kept until then.
    let pool = args.users.pool();
    let stdin = io::stdin();
    let mut input = BufReader::new(stdin.lock());
    let mut output = BufWriter::new(io::stdout().lock());
    let mut log = io::stderr();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let setup = BuildSetup {
        pool: pool.as_ref().map_err(std::sync::Arc::clone),
        log: &mut log,
        // This process serves one session and has no children but builds.
        hangup: Some(stdin.as_fd()),
        cores,
        limits: args.limits.limits(),
        impure_env_allow: args.limits.impure_env_allow.clone(),
    };
    serve_with_builds(
        &store,
        &mut input,
        &mut output,
        ServeOptions { write: args.write },
        setup,
    )?;
    Ok(ExitCode::SUCCESS)
}
