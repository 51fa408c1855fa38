//! `sandoff hook SYSTEM MAX-SILENT-TIME PRINT-BUILD-TRACE BUILD-TIMEOUT`:
//! sandoff as the build hook of guix-daemon (in place of `guix offload`) or
//! Nix 1.x (`NIX_BUILD_HOOK`). The protocol, the choice of reply and the
//! build after an accept are in `sandoff::hook`; this file does the IO
//! around them.
//!
//! - stdin: requests, then after `# accept` the inputs and outputs lines.
//! - stdout: the replies (the daemon joins it with stderr and takes lines
//!   starting with `# ` as replies).
//! - stderr: messages for the daemon's user (never starting with `# `).
//! - fd 4: the remote build log (stderr when fd 4 is not open).
//! - exit status: 0 (outputs valid here, or no request accepted), 100
//!   (the build failed on the machine), 101 (it timed out there), 1
//!   (anything else: the daemon's transient "hook failure").
//!
//! After an accept, a machine that cannot be reached or drops the link
//! goes into backoff and the build moves to another machine (waiting for a
//! slot if need be); only when no machine is left does the hook give up.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::Args;
use sandoff::decide::LocalFacts;
use sandoff::hook;
use sandoff::hook::offload::{self, Settings};
use sandoff::serve_protocol::BuildOptions;
use sandoff::store::StoreLocation;
use sandoff::termsafe;

use super::machines::MachinesArgs;

/// Options of `sandoff hook`, in the daemon's argument order.
#[derive(Args, Debug)]
pub struct HookArgs {
    /// The daemon's system (its `thisSystem`), e.g. x86_64-linux.
    #[arg(value_name = "SYSTEM")]
    system: String,
    /// Kill a remote build that prints nothing for this many seconds (0: never;
    /// so is a value past what the clock holds, such as u64::MAX).
    #[arg(value_name = "MAX-SILENT-TIME")]
    max_silent_time: u64,
    /// 1: print `@ build-remote DRV MACHINE` trace lines on stderr.
    #[arg(value_name = "PRINT-BUILD-TRACE", value_parser = clap::value_parser!(u8).range(0..=1))]
    print_build_trace: u8,
    /// Kill a remote build that runs longer than this many seconds (0: never;
    /// so is a value past what the clock holds).
    #[arg(value_name = "BUILD-TIMEOUT")]
    build_timeout: u64,
    #[command(flatten)]
    machines: MachinesArgs,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
}

pub fn run(args: HookArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    // First, before anything of ours can be given descriptor 4.
    let mut log = build_log();
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let settings = Settings {
        system: args.system.clone(),
        kvm: LocalFacts::detect().features.contains("kvm"),
        ssh: args.ssh.options(),
        options: BuildOptions {
            max_silent_time: args.max_silent_time,
            build_timeout: args.build_timeout,
            max_log_size: 0,
            keep_failed: false,
        },
        print_build_trace: args.print_build_trace == 1,
    };
    let mut machines = || {
        args.machines
            .load(&args.system)
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
    };
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let accepted = hook::serve_requests(&mut input, &mut output, |req| {
        offload::answer(&store, &settings, &mut machines, req, &mut io::stderr())
    })?;
    let Some((_, accepted)) = accepted else {
        return Ok(ExitCode::SUCCESS);
    };
    drop(output);
    // The inputs line is only checked to be store paths (see
    // `sandoff::hook::offload::build`).
    let _inputs_line = hook::read_paths(&mut input, &loc.dir, "inputs")?;
    let wanted = hook::read_paths(&mut input, &loc.dir, "outputs")?;
    let code = offload::build(
        &store,
        accepted,
        &settings,
        &wanted,
        &mut log,
        &mut io::stderr(),
    )?;
    Ok(ExitCode::from(code))
}

/// The daemon's log pipe, fd 4, opened anew through /proc (the crate has no
/// `unsafe` to adopt a raw descriptor); stderr when fd 4 is not open.
fn build_log() -> Box<dyn Write> {
    match OpenOptions::new().append(true).open("/proc/self/fd/4") {
        Ok(f) => Box::new(f),
        Err(e) => {
            tracing::debug!("no build log on fd 4 ({e}); writing it to stderr");
            // A terminal, most likely: the log is filtered on its way.
            Box::new(termsafe::Writer::new(io::stderr()))
        }
    }
}
