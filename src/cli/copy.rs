//! `sandoff copy --to MACHINE PATH...`: sends the closure of store paths to
//! a build machine, as `nix-copy-closure --to` does, but in one signed
//! stream of only the paths it lacks.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use sandoff::decide;
use sandoff::remote::compress::{ByteCount, WireCompression};
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
    /// Print what was sent as JSON on stdout: `paths`, `narBytes`,
    /// `compression` (`none`, `zstd`, `ssh-zlib`), `level` (zstd),
    /// `sent`/`received` (`plain` and `wire` bytes, handshake included),
    /// `seconds`.
    #[arg(long)]
    json: bool,
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
    let report = off.copy_to(&store, &machine, &paths)?;
    let seconds = start.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let on_the_wire = match report.compression {
        WireCompression::Zstd { level } => format!(
            ", {:.1} MiB on the wire (zstd level {level})",
            mib(report.sent.wire)
        ),
        WireCompression::SshZlib => ", compressed by SSH (zlib)".to_owned(),
        WireCompression::None => String::new(),
    };
    eprintln!(
        "copied {} path(s), {:.1} MiB{on_the_wire}, to '{}' in {seconds:.2} s",
        report.paths,
        mib(report.nar_bytes),
        machine.name,
    );
    if args.json {
        let (compression, level) = match report.compression {
            WireCompression::Zstd { level } => ("zstd", Some(level)),
            WireCompression::SshZlib => ("ssh-zlib", None),
            WireCompression::None => ("none", None),
        };
        let count = |c: ByteCount| serde_json::json!({"plain": c.plain, "wire": c.wire});
        let json = serde_json::json!({
            "machine": machine.name.as_str(),
            "paths": report.paths,
            "narBytes": report.nar_bytes,
            "compression": compression,
            "level": level,
            "sent": count(report.sent),
            "received": count(report.received),
            "seconds": seconds,
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(ExitCode::SUCCESS)
}
