//! What the hook does with the daemon's requests: [`answer`] one (the
//! rules are in the parent module's docs; [`answer_or_decline`] turns its
//! failures into declines), and [`build`] the one accepted,
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
use crate::decide::{LocalFacts, Machine, Placement};
use crate::derivation::check::{read_derivation, ReadError};
use crate::derivation::Derivation;
use crate::remote::offloader::{Attempt, InputClosure, OffloadError, Offloader, Placed, RemoteJob};
use crate::remote::slots::{Slot, SlotDir};
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
    /// The daemon's own facts (nix-daemon 2.x sends its `extra-platforms`
    /// and `system-features`; `free_slot` is taken from each request);
    /// `None`: Nix's defaults for `system` and `kvm`.
    pub local: Option<LocalFacts>,
    /// How machines are reached.
    pub ssh: SshOptions,
    /// The daemon's time limits, as the machine's build gets them.
    pub options: BuildOptions,
    /// Print `@ build-remote DRV MACHINE` trace lines.
    pub print_build_trace: bool,
    /// The slot directory shared by every hook on this host (Nix 1.x's
    /// `NIX_CURRENT_LOAD`); `None`: the store's `<state>/current-load`.
    pub slot_dir: Option<PathBuf>,
    /// Machines substitute the inputs they lack before any is sent
    /// (nix-daemon's `builders-use-substitutes`).
    pub substitute_on_machines: bool,
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
    #[error("the daemon wants output '{name}', which '{drv}' does not have")]
    NotAnOutputName { name: String, drv: String },
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

impl Accepted {
    /// The chosen machine's store URI (nix-daemon 2.x shows it).
    pub fn store_uri(&self) -> &str {
        &self.machine.store_uri
    }

    /// The store paths of the outputs `names` (nix-daemon 2.x names the
    /// outputs it wants; Nix 1.x and Guix send their paths).
    pub fn outputs_named(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeSet<StorePath>, HookRunError> {
        let paths = self.drv.output_paths();
        names
            .iter()
            .map(|name| {
                paths
                    .get(name)
                    .cloned()
                    .ok_or_else(|| HookRunError::NotAnOutputName {
                        name: name.clone(),
                        drv: self.drv_path.to_string(),
                    })
            })
            .collect()
    }
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
    let drv = read_derivation(store, &drv_path).map_err(|e| match e {
        ReadError::NotValid { .. } => HookRunError::NotValid {
            drv: req.drv_path.clone(),
            root: loc.root.clone(),
        },
        e => e.into(),
    })?;
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
    let mut placement = placement(machines, &settings.system, settings.kvm, req.am_willing);
    if let Some(local) = &settings.local {
        placement.local = LocalFacts {
            free_slot: req.am_willing,
            ..local.clone()
        };
    }
    let idle = placement.decide(&drv);
    if let Some(reply) = screen(&idle) {
        tracing::debug!(drv = %req.drv_path, reason = idle.reason(), "{reply}");
        return Ok(Answer::Decline);
    }
    let mut offloader = Offloader::new(loc, placement.machines.clone(), 1, settings.ssh.clone())?;
    if let Some(dir) = &settings.slot_dir {
        offloader = offloader.with_slots(SlotDir::at(dir.clone()));
    }
    // Accept only once the machine answers: a machine that cannot be
    // reached goes into backoff and the request is decided again, so the
    // daemon builds locally or waits instead of seeing a hook failure.
    let (machine, slot) = loop {
        // A fresh offloader knows nothing of what machines hold: no weights.
        let (machine, slot) = match offloader.try_place(&placement, &drv, &InputClosure::none())? {
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

/// [`answer`], with a failure declined ([`decline_because`]): before the
/// accept the daemon can still build the derivation itself or report why
/// not, while a hook that exits without a reply fails the build with
/// "unexpected EOF".
pub fn answer_or_decline(
    store: &LocalStore,
    settings: &Settings,
    machines: &mut dyn FnMut() -> Result<Vec<Machine>, Box<dyn std::error::Error + Send + Sync>>,
    req: &Request,
    messages: &mut dyn Write,
) -> Answer<Accepted> {
    answer(store, settings, machines, req, messages)
        .unwrap_or_else(|e| decline_because(&e, messages))
}

/// A decline for `reason`, told to the daemon's user first: one line
/// `sandoff: <reason and its causes>` on `messages`, flushed, so that it
/// comes before the `# decline` the caller writes next (the daemon reads
/// both from one pipe). The line is filtered and never starts with `# `,
/// so the daemon cannot take it for a reply.
pub fn decline_because<T>(reason: &dyn std::error::Error, messages: &mut dyn Write) -> Answer<T> {
    let text = termsafe::filter(error_chain(reason).as_bytes());
    let _ = writeln!(messages, "sandoff: {text}; declined");
    let _ = messages.flush();
    Answer::Decline
}

/// One line: `error` and its causes, joined by ": ", each left out when
/// the one before already says it (a message that quotes its cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let s = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&s)) {
            parts.push(s);
        }
        next = e.source();
    }
    parts.join(": ").replace(['\n', '\r'], " ")
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
/// in `wanted`; the remote log goes to `log`. When `log_apart` (the log is
/// the daemon's fd 4, not `messages` again), the notes for the user (which
/// machine builds it, a machine that failed, the failure) go to the log
/// too: the daemon keeps fd 4 as the build's log file and shows it to a
/// client that follows the build, while the hook's stderr is only shown.
/// Returns the exit status for the daemon: 0 when the outputs are valid
/// here, else [`super::exit_code`] of the machine's result.
pub fn build(
    store: &LocalStore,
    accepted: Accepted,
    settings: &Settings,
    wanted: &BTreeSet<StorePath>,
    log: &mut dyn Write,
    log_apart: bool,
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
        substitute: settings.substitute_on_machines,
    };
    // After the accept a busy machine is waited for: handing the build
    // back is not possible any more.
    placement.policy.local_when_busy = false;
    let mut progress = |p: Progress<'_>, log: &mut dyn Write| match p {
        Progress::Building { machine } => {
            let note = format!("sandoff: building '{drv_name}' on '{}'", machine.name);
            let _ = writeln!(messages, "{note}");
            if log_apart {
                let _ = writeln!(log, "{note}");
                let _ = log.flush();
            }
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
            let note = format!(
                "sandoff: build of '{drv_name}' on '{machine}' failed ({:?}): {}",
                result.status,
                termsafe::filter(result.error_msg.as_bytes())
            );
            let _ = writeln!(messages, "{note}");
            if log_apart {
                let _ = writeln!(log, "{note}");
                let _ = log.flush();
            }
            // `RemoteFailed` never holds a success; keep it a failure anyway.
            Ok(super::exit_code(result.status).max(1))
        }
        Err(source) => Err(HookRunError::Somewhere {
            drv: drv_name,
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("cannot use machines file 'm'")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_failure_is_declined_with_its_reason_on_one_line_of_its_own() {
        let cause = std::io::Error::other("no\nsuch\x1b]0;t\x07 file");
        let mut messages = Vec::new();
        let answer: Answer<()> = decline_because(&Outer(cause), &mut messages);
        assert!(matches!(answer, Answer::Decline));
        let text = String::from_utf8(messages).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(
            text.starts_with("sandoff: cannot use machines file 'm': no such"),
            "{text:?}"
        );
        assert!(text.ends_with("; declined\n"), "{text:?}");
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_said_once() {
        let e = HookRunError::Machines(Box::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "gone",
        )));
        assert_eq!(error_chain(&e), "cannot read the machines: gone");
    }
}
