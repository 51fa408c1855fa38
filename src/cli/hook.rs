//! `sandoff hook SYSTEM MAX-SILENT-TIME PRINT-BUILD-TRACE BUILD-TIMEOUT`:
//! sandoff as the build hook of guix-daemon (in place of `guix offload`) or
//! Nix 1.x (`NIX_BUILD_HOOK`). The protocol and the choice of reply are in
//! `sandoff::hook`; this file does the IO around it.
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

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use clap::Args;
use sandoff::decide::{LocalFacts, Machine, Placement};
use sandoff::derivation::Derivation;
use sandoff::hook::{self, Answer};
use sandoff::remote::offloader::{Attempt, Offloader, Placed, RemoteOutcome};
use sandoff::remote::slots::Slot;
use sandoff::remote::ssh::SshOptions;
use sandoff::serve_protocol::BuildOptions;
use sandoff::store::local::LocalStore;
use sandoff::store::{StoreLocation, StorePath};
use sandoff::termsafe;

use super::machines::MachinesArgs;

/// How long to wait before asking again for a machine after a failover
/// found every remaining machine busy.
const FAILOVER_RECHECK: Duration = Duration::from_secs(1);

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

/// An accepted request: the machine, its slot and what the build needs.
struct Accepted {
    offloader: Offloader,
    placement: Placement,
    machine: Machine,
    slot: Slot,
    drv_path: StorePath,
    drv: Derivation,
}

pub fn run(args: HookArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    // First, before anything of ours can be given descriptor 4.
    let mut log = build_log();
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let kvm = LocalFacts::detect().features.contains("kvm");
    let ssh = args.ssh.options();
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let accepted = hook::serve_requests(&mut input, &mut output, |req| {
        answer(&args, &store, kvm, &ssh, req)
    })?;
    let Some((_, accepted)) = accepted else {
        return Ok(ExitCode::SUCCESS);
    };
    drop(output);
    let Accepted {
        offloader,
        mut placement,
        machine,
        slot,
        drv_path,
        drv,
    } = accepted;
    let drv_name = loc.logical(&drv_path);

    // The inputs line is the daemon's input closure plus the .drv closure;
    // the build needs only what `sandoff build` sends, computed from the
    // derivation, so the line is only checked to be store paths.
    let _inputs_line = hook::read_paths(&mut input, &loc.dir, "inputs")?;
    let wanted = hook::read_paths(&mut input, &loc.dir, "outputs")?;
    let outputs: BTreeSet<StorePath> = drv.output_paths().into_values().collect();
    for p in &wanted {
        ensure!(
            outputs.contains(p),
            "'{}' in the outputs line is not an output of '{drv_name}'",
            loc.logical(p)
        );
    }
    let inputs = sandoff::build::local::input_paths(&store, &drv)?;
    // The daemon locked every output of the derivation before asking.
    let locks = store.held_by_parent(&outputs);
    let options = BuildOptions {
        max_silent_time: args.max_silent_time,
        build_timeout: args.build_timeout,
        max_log_size: 0,
        keep_failed: false,
    };
    // After the accept a busy machine is waited for: handing the build
    // back is not possible any more.
    placement.policy.local_when_busy = false;

    let (mut machine, mut slot) = (machine, slot);
    loop {
        eprintln!("sandoff: building '{drv_name}' on '{}'", machine.name);
        if args.print_build_trace == 1 {
            eprintln!("@ build-remote {drv_name} {}", machine.name);
        }
        let r = offloader.build_on(
            &store, &machine, &locks, &drv_path, &drv, &inputs, &options, &mut log,
        );
        offloader.release(slot);
        let _ = log.flush();
        match r {
            Ok(RemoteOutcome::Built) => {
                for p in &outputs {
                    ensure!(
                        store.is_valid(p)?,
                        "'{}' is not valid after building '{drv_name}' on '{}'",
                        loc.logical(p),
                        machine.name
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(RemoteOutcome::Failed(result)) => {
                // The machine's message (with its log tail) is the build's
                // text: filtered before it reaches a terminal.
                eprintln!(
                    "sandoff: build of '{drv_name}' on '{}' failed ({:?}): {}",
                    machine.name,
                    result.status,
                    termsafe::filter(result.error_msg.as_bytes())
                );
                // `Failed` never holds a success; keep it a failure anyway.
                return Ok(ExitCode::from(hook::exit_code(result.status).max(1)));
            }
            Err(e) if e.retry_elsewhere() => {
                let shown = termsafe::filter(e.to_string().as_bytes());
                eprintln!("sandoff: {shown}; trying another machine");
                let _ = writeln!(log, "sandoff: {e}; trying another machine");
                offloader.record_failure(&machine, &e);
                (machine, slot) = next_machine(&offloader, &placement, &drv, &drv_name)?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot build '{drv_name}' on '{}'", machine.name))
            }
        }
    }
}

/// The answer to one request (see `sandoff::hook` for the rules).
fn answer(
    args: &HookArgs,
    store: &LocalStore,
    kvm: bool,
    ssh: &SshOptions,
    req: &hook::Request,
) -> anyhow::Result<Answer<Accepted>> {
    let loc = store.location();
    let drv_path = loc.dir.parse_path(&req.drv_path)?;
    ensure!(
        store.is_valid(&drv_path)?,
        "the daemon asked about '{}', which is not valid in the store under '{}'",
        req.drv_path,
        loc.root.display()
    );
    let file = loc.real_path(&drv_path);
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let drv = Derivation::from_aterm(&bytes, &loc.dir)
        .with_context(|| format!("cannot parse {}", req.drv_path))?;
    if drv.system != req.system.as_bytes() {
        tracing::warn!(
            drv = %req.drv_path,
            "the request says system {} but the derivation says {}",
            req.system,
            String::from_utf8_lossy(&drv.system)
        );
    }
    // Read again for every request, as Guix does: edits apply at once.
    let machines = args.machines.load(&args.system)?;
    if machines.is_empty() {
        tracing::debug!(drv = %req.drv_path, "declined: no build machines");
        return Ok(Answer::Decline);
    }
    let placement = hook::placement(machines, &args.system, kvm, req.am_willing);
    let idle = placement.decide(&drv);
    if let Some(reply) = hook::screen(&idle) {
        tracing::debug!(drv = %req.drv_path, reason = idle.reason(), "{reply}");
        return Ok(Answer::Decline);
    }
    let offloader = Offloader::new(loc, placement.machines.clone(), 1, ssh.clone())?;
    // Accept only once the machine answers: a machine that cannot be
    // reached goes into backoff and the request is decided again, so the
    // daemon builds locally or waits instead of seeing a hook failure.
    let (machine, slot) = loop {
        let (machine, slot) = match offloader.try_place(&placement, &drv)? {
            Attempt::Placed(Placed::Remote { machine, slot }) => (machine.clone(), slot),
            Attempt::Placed(Placed::Local(_)) => {
                tracing::debug!(drv = %req.drv_path, "declined: build it locally");
                return Ok(Answer::Decline);
            }
            Attempt::Placed(Placed::Fail { reason }) => {
                tracing::debug!(drv = %req.drv_path, %reason, "declined");
                return Ok(Answer::Decline);
            }
            Attempt::Wait { reason } => {
                tracing::debug!(drv = %req.drv_path, %reason, "postponed");
                return Ok(Answer::Postpone);
            }
        };
        match offloader.warm(&machine) {
            Ok(()) => break (machine, slot),
            Err(e) if e.retry_elsewhere() => {
                let shown = termsafe::filter(e.to_string().as_bytes());
                eprintln!(
                    "sandoff: cannot use '{}': {shown}; trying elsewhere",
                    machine.name
                );
                offloader.release(slot);
                offloader.record_failure(&machine, &e);
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(Answer::Accept(Accepted {
        offloader,
        placement,
        machine,
        slot,
        drv_path,
        drv,
    }))
}

/// Another machine for the build after one failed, waiting while every
/// remaining one is busy; an error when none is left.
fn next_machine(
    offloader: &Offloader,
    placement: &Placement,
    drv: &Derivation,
    drv_name: &str,
) -> anyhow::Result<(Machine, Slot)> {
    loop {
        match offloader.try_place(placement, drv)? {
            Attempt::Placed(Placed::Remote { machine, slot }) => {
                return Ok((machine.clone(), slot))
            }
            Attempt::Placed(Placed::Local(_)) => {
                bail!("no other machine can build '{drv_name}' now")
            }
            Attempt::Placed(Placed::Fail { reason }) => {
                bail!("no other machine can build '{drv_name}': {reason}")
            }
            Attempt::Wait { .. } => std::thread::sleep(FAILOVER_RECHECK),
        }
    }
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
