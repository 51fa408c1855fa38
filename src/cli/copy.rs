//! `sandoff copy --to MACHINE PATH...`: sends the closure of store paths to
//! a build machine, as `nix-copy-closure --to` does, but in one signed
//! stream of only the paths it lacks.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use sandoff::decide;
use sandoff::remote::offloader::Offloader;
use sandoff::store::{StoreLocation, StorePath};

use super::machines::{select, MachinesArgs, SshArgs};

/// Options of `sandoff copy`.
#[derive(Args, Debug)]
pub struct CopyArgs {
    #[command(flatten)]
    source: MachinesArgs,
    #[command(flatten)]
    ssh: SshArgs,
    /// The machine (its name in the machines file, or a part of it that
    /// matches one machine only).
    #[arg(long, value_name = "MACHINE")]
    to: String,
    /// The store paths whose closures to send.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
}

pub fn run(args: CopyArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let machines = select(
        args.source.load(&decide::host_system())?,
        std::slice::from_ref(&args.to),
    )?;
    let machine = match machines.iter().find(|m| m.name.as_str() == args.to) {
        Some(m) => m.clone(),
        None if machines.len() == 1 => machines[0].clone(),
        None => anyhow::bail!(
            "'{}' matches {} machines; give its full name",
            args.to,
            machines.len()
        ),
    };
    let paths: BTreeSet<StorePath> = args
        .paths
        .iter()
        .map(|p| loc.dir.parse_path(p).with_context(|| format!("'{p}'")))
        .collect::<anyhow::Result<_>>()?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let off = Offloader::new(loc, vec![machine.clone()], 1, args.ssh.options())?;
    let start = Instant::now();
    let (n, bytes) = off.copy_to(&store, &machine, &paths)?;
    eprintln!(
        "copied {n} path(s), {:.1} MiB, to '{}' in {:.2} s",
        bytes as f64 / (1024.0 * 1024.0),
        machine.name,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
