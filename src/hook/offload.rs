//! What the hook does with the daemon's requests: [`answer`] one (the
//! rules are in the parent module's docs), and [`build`] the one accepted,
//! with the failover policy `sandoff build` uses
//! ([`crate::build::somewhere`]). The caller does the IO: the daemon's
//! lines, the log descriptor, the machines file.
//!
//! After the accept the build can no longer be handed back to the daemon:
//! a machine that fails goes into backoff and the build moves to another
//! one, waiting for a slot if need be (a busy machine is waited for rather
//! than building here); only when no machine is left does the hook fail.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use thiserror::Error;

use super::{placement, screen, Answer, HookError, Request};
use crate::build::local::input_paths;
use crate::build::somewhere::{build_somewhere, Progress, Somewhere, SomewhereError};
use crate::build::BuildError;
use crate::decide::{Machine, Placement};
use crate::derivation::check::{read_derivation, ReadError};
use crate::derivation::Derivation;
use crate::remote::offloader::{Attempt, OffloadError, Offloader, Placed, RemoteJob};
use crate::remote::slots::Slot;
use crate::remote::ssh::SshOptions;
use crate::serve_protocol::BuildOptions;
use crate::store::local::{LocalStore, StoreError};
use crate::store::{PathError, StorePath};
use crate::termsafe;

/// What the daemon's arguments and this host say about every request.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The daemon's system.
    pub system: String,
    /// Whether this host has KVM (a local fact for the decision).
    pub kvm: bool,
    /// How machines are reached.
    pub ssh: SshOptions,
    /// The daemon's time limits, as the machine's build gets them.
    pub options: BuildOptions,
    /// Print `@ build-remote DRV MACHINE` trace lines.
    pub print_build_trace: bool,
}

/// An accepted request: the machine, its slot (held) and what the build
/// needs.
pub struct Accepted {
    offloader: Offloader,
    placement: Placement,
    machine: Machine,
    slot: Slot,
    drv_path: StorePath,
    drv: Derivation,
}

/// Why the hook could not answer or build.
#[derive(Debug, Error)]
pub enum HookRunError {
    #[error(transparent)]
    Protocol(#[from] HookError),
    #[error("the daemon asked about '{drv}', which is not valid in the store under '{root}'")]
    NotValid { drv: String, root: PathBuf },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the machines: {0}")]
    Machines(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Offload(#[from] OffloadError),
    #[error(transparent)]
    Build(#[from] Box<BuildError>),
    #[error("'{path}' in the outputs line is not an output of '{drv}'")]
    NotAnOutput { path: String, drv: String },
    #[error("'{path}' is not valid after building '{drv}' on '{machine}'")]
    NotValidAfter {
        path: String,
        drv: String,
        machine: String,
    },
    #[error("no other machine can build '{drv}' now")]
    NoOtherMachineNow { drv: String },
    #[error("no other machine can build '{drv}': {reason}")]
    NoOtherMachine { drv: String, reason: String },
    #[error("cannot build '{drv}': {source}")]
    Somewhere {
        drv: String,
        #[source]
        source: Box<SomewhereError>,
    },
}

/// The answer to one request. `machines` reads the machines file, again
/// for every request as Guix does (edits apply at once); messages for the
/// daemon's user go to `messages`.
pub fn answer(
    store: &LocalStore,
    settings: &Settings,
    machines: &mut dyn FnMut() -> Result<Vec<Machine>, Box<dyn std::error::Error + Send + Sync>>,
    req: &Request,
    messages: &mut dyn Write,
) -> Result<Answer<Accepted>, HookRunError> {
    let loc = store.location();
    let drv_path = loc.dir.parse_path(&req.drv_path)?;
    if !store.is_valid(&drv_path)? {
        return Err(HookRunError::NotValid {
            drv: req.drv_path.clone(),
            root: loc.root.clone(),
        });
    }
    let drv = read_derivation(store, &drv_path)?;
    if drv.system != req.system.as_bytes() {
        tracing::warn!(
            drv = %req.drv_path,
            "the request says system {} but the derivation says {}",
            req.system,
            String::from_utf8_lossy(&drv.system)
        );
    }
    let machines = machines().map_err(HookRunError::Machines)?;
    if machines.is_empty() {
        tracing::debug!(drv = %req.drv_path, "declined: no build machines");
        return Ok(Answer::Decline);
    }
    let placement = placement(machines, &settings.system, settings.kvm, req.am_willing);
    let idle = placement.decide(&drv);
    if let Some(reply) = screen(&idle) {
        tracing::debug!(drv = %req.drv_path, reason = idle.reason(), "{reply}");
        return Ok(Answer::Decline);
    }
    let offloader = Offloader::new(loc, placement.machines.clone(), 1, settings.ssh.clone())?;
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
                refused(messages, &machine, &e, "trying elsewhere");
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

/// Tells the daemon's user that `machine` failed, filtered (the machine's
/// words may hold anything), as a warning when it may be an attack.
fn refused(messages: &mut dyn Write, machine: &Machine, error: &OffloadError, then: &str) {
    let shown = termsafe::filter(error.to_string().as_bytes());
    let _ = if error.is_suspicious() {
        writeln!(
            messages,
            "sandoff: warning: machine '{}' refused: {shown}; {then}",
            machine.name
        )
    } else {
        writeln!(
            messages,
            "sandoff: cannot use '{}': {shown}; {then}",
            machine.name
        )
    };
}

/// Builds the accepted derivation, whose missing outputs the daemon listed
/// in `wanted`; the remote log goes to `log`. Returns the exit status for
/// the daemon: 0 when the outputs are valid here, else
/// [`super::exit_code`] of the machine's result.
pub fn build(
    store: &LocalStore,
    accepted: Accepted,
    settings: &Settings,
    wanted: &BTreeSet<StorePath>,
    log: &mut dyn Write,
    messages: &mut dyn Write,
) -> Result<u8, HookRunError> {
    let Accepted {
        offloader,
        mut placement,
        machine,
        slot,
        drv_path,
        drv,
    } = accepted;
    let loc = store.location();
    let drv_name = loc.logical(&drv_path);
    let outputs: BTreeSet<StorePath> = drv.output_paths().into_values().collect();
    if let Some(p) = wanted.iter().find(|p| !outputs.contains(*p)) {
        return Err(HookRunError::NotAnOutput {
            path: loc.logical(p),
            drv: drv_name,
        });
    }
    // The daemon's inputs line is its input closure plus the .drv closure;
    // the build needs only what `sandoff build` sends, computed from the
    // derivation.
    let inputs = input_paths(store, &drv)
        .map_err(|kind| Box::new(BuildError::new(&loc.dir, &drv_path, kind)))?;
    // The daemon locked every output of the derivation before asking.
    let locks = store.held_by_parent(&outputs);
    let job = RemoteJob {
        store,
        drv_path: &drv_path,
        drv: &drv,
        inputs: &inputs,
        locks: &locks,
        options: settings.options.clone(),
    };
    // After the accept a busy machine is waited for: handing the build
    // back is not possible any more.
    placement.policy.local_when_busy = false;
    let mut progress = |p: Progress<'_>, log: &mut dyn Write| match p {
        Progress::Building { machine } => {
            let _ = writeln!(
                messages,
                "sandoff: building '{drv_name}' on '{}'",
                machine.name
            );
            if settings.print_build_trace {
                let _ = writeln!(messages, "@ build-remote {drv_name} {}", machine.name);
            }
        }
        Progress::MachineFailed { machine, error } => {
            refused(messages, machine, error, "trying another machine");
            let _ = writeln!(log, "sandoff: {error}; trying another machine");
            let _ = log.flush();
        }
    };
    let result = build_somewhere(
        &offloader,
        &placement,
        &job,
        Some((machine, slot)),
        log,
        &mut progress,
    );
    let _ = log.flush();
    match result {
        Ok(Somewhere::Built { machine }) => {
            for p in &outputs {
                if !store.is_valid(p)? {
                    return Err(HookRunError::NotValidAfter {
                        path: loc.logical(p),
                        drv: drv_name,
                        machine: machine.to_string(),
                    });
                }
            }
            Ok(0)
        }
        Ok(Somewhere::Here(_)) => Err(HookRunError::NoOtherMachineNow { drv: drv_name }),
        Err(SomewhereError::Unplaceable { reason }) => Err(HookRunError::NoOtherMachine {
            drv: drv_name,
            reason,
        }),
        Err(SomewhereError::RemoteFailed { machine, result }) => {
            // The machine's message (with its log tail) is the build's
            // text: filtered before it reaches a terminal.
            let _ = writeln!(
                messages,
                "sandoff: build of '{drv_name}' on '{machine}' failed ({:?}): {}",
                result.status,
                termsafe::filter(result.error_msg.as_bytes())
            );
            // `RemoteFailed` never holds a success; keep it a failure anyway.
            Ok(super::exit_code(result.status).max(1))
        }
        Err(source) => Err(HookRunError::Somewhere {
            drv: drv_name,
            source: Box::new(source),
        }),
    }
}
