//! "Build it somewhere": the one failover policy of `sandoff build` and the
//! build hook.
//!
//! Place the derivation with [`crate::decide`] (through the
//! [`Offloader`]); when it goes to a machine, build it there; when the
//! machine is at fault (unreachable, a host key or login refused, the link
//! lost mid-build), record the failure (backoff, shared by every process on
//! this host) and place the derivation again: on another machine, or here.
//! A build that fails on a machine fails: building it elsewhere would fail
//! the same way. Neither Nix nor Guix fails over once a machine was chosen.
//!
//! The caller says what "here" means: `sandoff build` gets the local
//! permit back and builds in its sandbox; the hook, which promised the
//! daemon a remote build, turns it into an error.

use std::io::Write;

use thiserror::Error;

use crate::decide::{Machine, MachineName, Placement};
use crate::remote::offloader::{
    InputClosure, LocalPermit, OffloadError, Offloader, Placed, RemoteJob, RemoteOutcome,
};
use crate::remote::slots::Slot;
use crate::serve_protocol::BuildResult;

/// Where the derivation ended up.
pub enum Somewhere<'o> {
    /// To be built here: the local permit is the caller's.
    Here(LocalPermit<'o>),
    /// Built on a machine; its outputs are valid here.
    Built {
        /// The machine.
        machine: MachineName,
    },
}

/// What happened on the way, for the caller to show.
pub enum Progress<'a> {
    /// The build starts on `machine`.
    Building {
        /// The machine.
        machine: &'a Machine,
    },
    /// `machine` failed (it is in backoff now); the derivation is placed
    /// again.
    MachineFailed {
        /// The machine.
        machine: &'a Machine,
        /// Why.
        error: &'a OffloadError,
    },
}

/// Why the derivation was built nowhere.
#[derive(Debug, Error)]
pub enum SomewhereError {
    /// The offloader's state (slots, backoff) failed.
    #[error("cannot place the build: {0}")]
    Placement(#[source] OffloadError),
    /// Nothing can build it.
    #[error("{reason}")]
    Unplaceable {
        /// Why, from the decision.
        reason: String,
    },
    /// It failed on a machine.
    #[error("the build failed on '{machine}' ({:?}): {}", result.status, result.error_msg)]
    RemoteFailed {
        /// The machine.
        machine: MachineName,
        /// What the machine said.
        result: BuildResult,
    },
    /// Offloading to a machine failed for a reason that is not the
    /// machine's fault (a bad output, our own store).
    #[error("cannot build on '{machine}': {source}")]
    Offload {
        /// The machine.
        machine: MachineName,
        /// The cause.
        #[source]
        source: Box<OffloadError>,
    },
}

/// Builds `job` somewhere: on the machine of `first` if given (a slot the
/// caller already holds there), else wherever [`Offloader::place`] says,
/// failing over as the module docs describe. The remote log goes to `log`;
/// `progress` hears of each attempt, with the log to add to.
pub fn build_somewhere<'o>(
    off: &'o Offloader,
    placement: &Placement,
    job: &RemoteJob<'_>,
    first: Option<(Machine, Slot)>,
    log: &mut dyn Write,
    progress: &mut dyn FnMut(Progress<'_>, &mut dyn Write),
) -> Result<Somewhere<'o>, SomewhereError> {
    let mut next = first;
    // Weighs the machines by what they hold of it, and is what a machine
    // is sent (computed once, on first use).
    let mut inputs = None;
    loop {
        let (machine, slot) = match next.take() {
            Some(chosen) => chosen,
            None => match off
                .place(placement, job.drv, closure_of(job, &mut inputs)?)
                .map_err(SomewhereError::Placement)?
            {
                Placed::Local(permit) => return Ok(Somewhere::Here(permit)),
                Placed::Fail { reason } => return Err(SomewhereError::Unplaceable { reason }),
                Placed::Remote { machine, slot } => (machine.clone(), slot),
            },
        };
        progress(Progress::Building { machine: &machine }, log);
        tracing::info!(
            drv = %job.store.location().logical(job.drv_path),
            machine = %machine.name,
            "building remotely"
        );
        let r = off.build_on(&machine, job, closure_of(job, &mut inputs)?, log);
        off.release(slot);
        match r {
            Ok(RemoteOutcome::Built) => {
                return Ok(Somewhere::Built {
                    machine: machine.name,
                })
            }
            Ok(RemoteOutcome::Failed(result)) => {
                return Err(SomewhereError::RemoteFailed {
                    machine: machine.name,
                    result,
                })
            }
            Err(e) if e.retry_elsewhere() => {
                off.record_failure(&machine, &e);
                progress(
                    Progress::MachineFailed {
                        machine: &machine,
                        error: &e,
                    },
                    log,
                );
            }
            Err(e) => {
                return Err(SomewhereError::Offload {
                    machine: machine.name,
                    source: Box::new(e),
                })
            }
        }
    }
}

/// The input closure of `job`, computed on first use into `cache`.
fn closure_of<'c>(
    job: &RemoteJob<'_>,
    cache: &'c mut Option<InputClosure>,
) -> Result<&'c InputClosure, SomewhereError> {
    if cache.is_none() {
        let closure = InputClosure::of(job.store, job.inputs)
            .map_err(|e| SomewhereError::Placement(e.into()))?;
        *cache = Some(closure);
    }
    Ok(cache.as_ref().expect("just filled"))
}
