//! `sandoff serve --stdio [--write]`: the server side of Nix's serve
//! protocol on stdin/stdout, as `nix-store --serve [--write]` (what Nix's
//! `ssh://` store runs on the remote machine). With `--write` it also builds
//! (`BuildDerivation`, `BuildPaths`) in the local sandbox as the build users
//! of `--build-users-group`, streaming build logs on stderr, which ssh
//! carries to the client; see `sandoff::serve`.
//!
//! `--expect-store-dir DIR` is how a sandoff client makes sure, before any
//! path crosses, that both sides name paths in the same store directory:
//! Nix's protocol never says which one a side uses, so a `/gnu/store`
//! client talking to a `/nix/store` server would otherwise fail late, on
//! its first path, with a confusing message. On a mismatch the server
//! prints one line ([`StoreDirMismatch`], which the client recognises) and
//! exits before the handshake, without opening its store.
//!
//! `--compress zstd:LEVEL` is how a sandoff client asks for compressed
//! streams: both directions are zstd from the first command on (see
//! `sandoff::remote::compress`).

use std::io::{self, BufReader, BufWriter};
use std::os::fd::AsFd;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use sandoff::remote::compress::parse_compress_arg;
use sandoff::serve::{serve_with_builds, BuildSetup, ServeOptions};
use sandoff::serve_protocol::StoreDirMismatch;
use sandoff::store::{StoreDir, StoreLocation};

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
    /// Refuse, before the handshake, a client whose store directory is not
    /// this store's (what sandoff's client passes: its own directory).
    #[arg(long, value_name = "DIR", value_parser = parse_store_dir)]
    expect_store_dir: Option<StoreDir>,
    /// Speak zstd after the handshake, compressing at LEVEL (1 to 19): what
    /// a sandoff client asks of a sandoff machine whose entry does not turn
    /// compression off. Stderr stays plain.
    #[arg(long, value_name = "zstd:LEVEL", value_parser = parse_compress_arg)]
    compress: Option<i32>,
    #[command(flatten)]
    users: BuildUsersArgs,
    #[command(flatten)]
    limits: SandboxLimitsArgs,
}

pub fn run(args: ServeArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    if !args.stdio {
        bail!("serve: --stdio is required (it is the only transport so far)");
    }
    if let Some(client) = args.expect_store_dir {
        if client != loc.dir {
            return Err(StoreDirMismatch {
                server: loc.dir.clone(),
                client,
            }
            .into());
        }
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
        ServeOptions {
            write: args.write,
            zstd_level: args.compress,
        },
        setup,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Checked at parse time, as the global `--store-dir`.
fn parse_store_dir(s: &str) -> Result<StoreDir, String> {
    StoreDir::new(s).map_err(|e| e.to_string())
}
