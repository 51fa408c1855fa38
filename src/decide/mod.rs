//! Where a derivation is built: one pure decision for every caller.
//!
//! # Design
//!
//! [`decide`] takes plain data (the derivation's facts, each machine with its
//! current state, the local machine's facts, the policy) and returns a
//! [`Decision`]; it does no IO and keeps no state, so the scheduler calls it
//! once per ready derivation and again after any slot frees up, and tests
//! cover every rule with tables. What it needs from the world comes from
//! elsewhere: the machines from [`file`](mod@file) (Nix's `machines` format in
//! [`nix_format`], Guix's `machines.scm` in [`guix_format`], both into the
//! one model of [`machines`]), the local facts from [`LocalFacts::detect`],
//! slots and backoff from the offloader.
//!
//! # Rules
//!
//! 1. `--local-only`, and a local-build derivation (`preferLocalBuild`,
//!    Guix's `local-build?`): local if the local machine can build it, else
//!    fail naming why. (Nix and Guix would offer such a derivation to the
//!    machines when the local machine cannot build it; sandoff follows its
//!    specification, which keeps local-build derivations local always.)
//! 2. A machine is eligible when its systems hold the derivation's system,
//!    the required features are within its supported plus mandatory
//!    features, its mandatory features are all required, and it is not in
//!    backoff after a failure.
//! 3. Among eligible machines with a free slot and not overloaded (a known
//!    load at or above Guix's overload threshold): the lowest
//!    slots-in-use / speed factor, then the higher speed factor, then the
//!    one that already holds more bytes of the input closure (less to
//!    send; the caller learns it from the machines), then fewer slots in
//!    use, then the name.
//! 4. No eligible machine: local if the local machine can build it, else
//!    fail with a reason naming the missing system or features.
//! 5. Eligible machines, all busy: postpone, unless `--local-when-busy` and
//!    the local machine can build it and has a free slot.

pub mod file;
pub mod guix_format;
pub mod machines;
pub mod nix_format;

use std::collections::BTreeSet;
use std::fmt;

use crate::derivation::Derivation;

pub use machines::{GuixExtras, Machine, MachineError, MachineFormat, MachineName};

/// What the decision needs to know about a derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrvFacts {
    /// Its `system`, e.g. `x86_64-linux` (`builtin` for builtin builders).
    pub system: String,
    /// `requiredSystemFeatures`.
    pub required_features: BTreeSet<String>,
    /// `preferLocalBuild = "1"` (Guix's `local-build?`).
    pub prefer_local: bool,
}

impl DrvFacts {
    /// The facts of a parsed derivation. A non-UTF-8 system cannot match any
    /// machine; it is kept lossily so that messages can still show it.
    pub fn from_derivation(drv: &Derivation) -> DrvFacts {
        DrvFacts {
            system: String::from_utf8_lossy(&drv.system).into_owned(),
            required_features: drv.required_system_features(),
            prefer_local: drv.prefer_local_build(),
        }
    }
}

/// A machine and what the offloader currently knows about it.
#[derive(Clone, Copy, Debug)]
pub struct MachineState<'m> {
    /// The machine as configured.
    pub machine: &'m Machine,
    /// Builds this sandoff is running there now (its slot locks held).
    pub slots_in_use: u32,
    /// The machine's normalized load (0.0 to 1.0) if it was measured, as
    /// Guix does; compared with the overload threshold.
    pub load: Option<f64>,
    /// It failed recently and must not be tried until its backoff expires.
    pub in_backoff: bool,
    /// Bytes (NAR sizes) of the derivation's input closure that the machine
    /// is known to hold already, so they need not be sent: learned by the
    /// caller from the machine (0: none, or not known).
    pub held_bytes: u64,
}

impl<'m> MachineState<'m> {
    /// An idle machine: no slot in use, load unknown, not in backoff.
    pub fn idle(machine: &'m Machine) -> MachineState<'m> {
        MachineState {
            machine,
            slots_in_use: 0,
            load: None,
            in_backoff: false,
            held_bytes: 0,
        }
    }
}

/// What the local machine can build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFacts {
    /// Its system (Nix's `system` setting), e.g. `x86_64-linux`.
    pub system: String,
    /// Other systems it builds natively or by emulation (`extra-platforms`).
    pub extra_platforms: BTreeSet<String>,
    /// Its features (`system-features`).
    pub features: BTreeSet<String>,
    /// Whether a local build slot is free now (`--local-when-busy` only).
    pub free_slot: bool,
    /// Local builds are switched off (`--max-jobs 0`, as Nix's
    /// `max-jobs = 0`): everything is offloaded or fails.
    pub disabled: bool,
}

impl LocalFacts {
    /// The host's defaults, as Nix 2.8 computes them: the system sandoff was
    /// built for; `i686-linux` as an extra platform on `x86_64-linux` (and
    /// `x86_64-darwin` on `aarch64-darwin`); the features `benchmark`,
    /// `big-parallel`, `nixos-test`, plus `kvm` when `/dev/kvm` is readable
    /// and writable. This is the one place that looks at the machine.
    pub fn detect() -> LocalFacts {
        let kvm = rustix::fs::access(
            "/dev/kvm",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .is_ok();
        LocalFacts::for_system(&host_system(), kvm)
    }

    /// The defaults for a given system, with or without KVM (pure).
    pub fn for_system(system: &str, kvm: bool) -> LocalFacts {
        let extra: &[&str] = match system {
            "x86_64-linux" => &["i686-linux"],
            "aarch64-darwin" => &["x86_64-darwin"],
            _ => &[],
        };
        let mut features: BTreeSet<String> = ["benchmark", "big-parallel", "nixos-test"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if kvm {
            features.insert("kvm".to_owned());
        }
        LocalFacts {
            system: system.to_owned(),
            extra_platforms: extra.iter().map(|s| (*s).to_owned()).collect(),
            features,
            free_slot: true,
            disabled: false,
        }
    }

    /// Whether it builds this system (its own, an extra platform, or Nix's
    /// `builtin`).
    pub fn has_system(&self, system: &str) -> bool {
        system == self.system || system == "builtin" || self.extra_platforms.contains(system)
    }

    /// Why it cannot build `drv`, or `None` if it can.
    pub fn cannot_build(&self, drv: &DrvFacts) -> Option<String> {
        if self.disabled {
            return Some("local builds are disabled (--max-jobs 0)".to_owned());
        }
        let mut why = Vec::new();
        if !self.has_system(&drv.system) {
            let mut systems = vec![self.system.clone()];
            systems.extend(self.extra_platforms.iter().cloned());
            why.push(format!(
                "it is {} and the derivation needs {}",
                systems.join(", "),
                drv.system
            ));
        }
        let missing: Vec<&str> = drv
            .required_features
            .iter()
            .filter(|f| !self.features.contains(*f))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            why.push(format!("it lacks the feature(s) {}", missing.join(", ")));
        }
        (!why.is_empty()).then(|| why.join(" and "))
    }
}

/// Nix's name for the system sandoff was compiled for (Nix also uses its
/// compile-time `SYSTEM`).
pub fn host_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        other => other,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

/// How the caller wants builds placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Never offload (`--local-only`, `--no-build-hook`, `--builders ''`).
    pub local_only: bool,
    /// When every eligible machine is busy, build locally if a local slot is
    /// free instead of waiting (Nix's behaviour; off by default).
    pub local_when_busy: bool,
}

/// Where to build a derivation.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Build in the local sandbox.
    Local { reason: String },
    /// Offload to `machine`.
    Remote {
        machine: MachineName,
        reason: String,
    },
    /// Eligible machines exist but none has a free slot: ask again later.
    Postpone { reason: String },
    /// Nothing can build it.
    Fail { reason: String },
}

impl Decision {
    /// `local`, `remote`, `postpone` or `fail` (the JSON `decision` value).
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Local { .. } => "local",
            Decision::Remote { .. } => "remote",
            Decision::Postpone { .. } => "postpone",
            Decision::Fail { .. } => "fail",
        }
    }

    /// The human reason.
    pub fn reason(&self) -> &str {
        match self {
            Decision::Local { reason }
            | Decision::Remote { reason, .. }
            | Decision::Postpone { reason }
            | Decision::Fail { reason } => reason,
        }
    }

    /// The chosen machine, for `Remote`.
    pub fn machine(&self) -> Option<&MachineName> {
        match self {
            Decision::Remote { machine, .. } => Some(machine),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Remote { machine, reason } => write!(f, "remote on {machine}: {reason}"),
            other => write!(f, "{}: {}", other.kind(), other.reason()),
        }
    }
}

/// What a run decides with: the machines, the local machine, the policy.
/// One value for a whole `sandoff build`, asked once per derivation.
#[derive(Clone, Debug)]
pub struct Placement {
    pub machines: Vec<Machine>,
    pub local: LocalFacts,
    pub policy: Policy,
}

impl Placement {
    /// Only the local machine, as the host is (`--local-only` without a
    /// machines file).
    pub fn local_only() -> Placement {
        Placement {
            machines: Vec::new(),
            local: LocalFacts::detect(),
            policy: Policy {
                local_only: true,
                local_when_busy: false,
            },
        }
    }

    /// Decides for `drv`. Every machine counts as idle: slots are tracked by
    /// the offloader, which calls [`decide`] itself with their state.
    pub fn decide(&self, drv: &Derivation) -> Decision {
        let states: Vec<MachineState<'_>> = self.machines.iter().map(MachineState::idle).collect();
        decide(
            &DrvFacts::from_derivation(drv),
            &states,
            &self.local,
            &self.policy,
        )
    }
}

/// Why a machine cannot take a derivation at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// Its systems do not include the derivation's.
    System,
    /// Required features it neither supports nor has as mandatory.
    MissingFeatures(Vec<String>),
    /// Its mandatory features that the derivation does not require.
    UnrequiredMandatory(Vec<String>),
    /// It failed recently.
    Backoff,
}

/// A machine's standing for one derivation.
#[derive(Clone, Debug, PartialEq)]
pub enum Standing {
    /// It cannot build the derivation.
    Ineligible(Ineligible),
    /// It can, but all its slots are taken.
    Full,
    /// It can, but its measured load is at or above its threshold.
    Overloaded { load: f64, threshold: f64 },
    /// It can, now.
    Available,
}

impl Standing {
    /// Eligible (whether or not it is free now).
    pub fn is_eligible(&self) -> bool {
        !matches!(self, Standing::Ineligible(_))
    }
}

/// The standing of one machine for `drv`. Cheap: no allocation unless the
/// machine is ineligible for features.
pub fn assess(drv: &DrvFacts, state: &MachineState<'_>) -> Standing {
    let m = state.machine;
    // Nix's `systemSupported` lets every machine take `builtin`.
    if drv.system != "builtin" && !m.systems.contains(&drv.system) {
        return Standing::Ineligible(Ineligible::System);
    }
    let lacks = |f: &String| !m.supported_features.contains(f) && !m.mandatory_features.contains(f);
    if drv.required_features.iter().any(lacks) {
        return Standing::Ineligible(Ineligible::MissingFeatures(
            drv.required_features
                .iter()
                .filter(|f| lacks(f))
                .cloned()
                .collect(),
        ));
    }
    if !m.mandatory_features.is_subset(&drv.required_features) {
        return Standing::Ineligible(Ineligible::UnrequiredMandatory(
            m.mandatory_features
                .difference(&drv.required_features)
                .cloned()
                .collect(),
        ));
    }
    if state.in_backoff {
        return Standing::Ineligible(Ineligible::Backoff);
    }
    if state.slots_in_use >= m.max_jobs {
        return Standing::Full;
    }
    // Guix accepts a machine only if `(< load threshold)`.
    if let (Some(load), Some(threshold)) = (state.load, m.overload_threshold()) {
        if load >= threshold {
            return Standing::Overloaded { load, threshold };
        }
    }
    Standing::Available
}

/// [`assess`] without the details, so that the hot loop of [`decide`]
/// never allocates.
enum Quick {
    Ineligible,
    Busy,
    Available,
}

fn quick_standing(drv: &DrvFacts, state: &MachineState<'_>) -> Quick {
    let m = state.machine;
    let eligible = (drv.system == "builtin" || m.systems.contains(&drv.system))
        && drv
            .required_features
            .iter()
            .all(|f| m.supported_features.contains(f) || m.mandatory_features.contains(f))
        && m.mandatory_features.is_subset(&drv.required_features)
        && !state.in_backoff;
    if !eligible {
        return Quick::Ineligible;
    }
    if state.slots_in_use >= m.max_jobs {
        return Quick::Busy;
    }
    match (state.load, m.overload_threshold()) {
        (Some(load), Some(threshold)) if load >= threshold => Quick::Busy,
        _ => Quick::Available,
    }
}

/// One line on a machine's standing, for `sandoff decide`.
pub fn describe(drv: &DrvFacts, state: &MachineState<'_>, standing: &Standing) -> String {
    let m = state.machine;
    match standing {
        Standing::Ineligible(Ineligible::System) => format!(
            "does not build {} (systems: {})",
            drv.system,
            join(&m.systems)
        ),
        Standing::Ineligible(Ineligible::MissingFeatures(f)) => {
            format!("lacks required feature(s) {}", f.join(", "))
        }
        Standing::Ineligible(Ineligible::UnrequiredMandatory(f)) => format!(
            "has mandatory feature(s) {} that the derivation does not require",
            f.join(", ")
        ),
        Standing::Ineligible(Ineligible::Backoff) => "in backoff after a failure".to_owned(),
        Standing::Full => format!("busy: all {} slot(s) in use", m.max_jobs),
        Standing::Overloaded { load, threshold } => {
            format!("overloaded: load {load:.2} >= threshold {threshold:.2}")
        }
        Standing::Available => format!(
            "eligible: {}/{} slot(s) in use, speed factor {}{}",
            state.slots_in_use,
            m.max_jobs,
            m.speed_factor,
            holds(state.held_bytes)
        ),
    }
}

/// ", holds N MiB of the inputs" when the machine is known to hold any.
fn holds(bytes: u64) -> String {
    if bytes == 0 {
        return String::new();
    }
    format!(
        ", holds {:.1} MiB of the input closure",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

fn join(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "none".to_owned()
    } else {
        set.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A machine's verdict for `sandoff decide`.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The machine.
    pub name: MachineName,
    /// Whether it could build the derivation (free or not).
    pub eligible: bool,
    /// Why (not).
    pub reason: String,
    /// Bytes of the input closure it is known to hold.
    pub held_bytes: u64,
}

/// Every machine's verdict, in the order given.
pub fn explain(drv: &DrvFacts, machines: &[MachineState<'_>]) -> Vec<Verdict> {
    machines
        .iter()
        .map(|s| {
            let standing = assess(drv, s);
            Verdict {
                name: s.machine.name.clone(),
                eligible: standing.is_eligible(),
                reason: describe(drv, s, &standing),
                held_bytes: s.held_bytes,
            }
        })
        .collect()
}

/// Decides where to build `drv` (see the module docs for the rules). Pure
/// and deterministic: the same inputs give the same decision, whatever the
/// order of `machines`.
pub fn decide(
    drv: &DrvFacts,
    machines: &[MachineState<'_>],
    local: &LocalFacts,
    policy: &Policy,
) -> Decision {
    let local_problem = local.cannot_build(drv);
    // As the issue specifies: a local-build derivation (Nix's
    // preferLocalBuild, Guix's local-build?) is never offloaded, like a
    // --local-only run; if this machine cannot build it, that is a failure
    // that says why, rather than a surprise remote build.
    if policy.local_only || drv.prefer_local {
        let why_local = if policy.local_only {
            "local builds only (--local-only)"
        } else {
            "the derivation is marked local-build (preferLocalBuild)"
        };
        return match local_problem {
            None => Decision::Local {
                reason: why_local.to_owned(),
            },
            Some(why) => Decision::Fail {
                reason: format!("{why_local}, and the local machine cannot build it: {why}"),
            },
        };
    }

    let mut eligible = 0usize;
    let mut best: Option<&MachineState<'_>> = None;
    for state in machines {
        match quick_standing(drv, state) {
            Quick::Ineligible => {}
            Quick::Busy => eligible += 1,
            Quick::Available => {
                eligible += 1;
                if best.is_none_or(|b| better(state, b)) {
                    best = Some(state);
                }
            }
        }
    }

    if let Some(b) = best {
        let m = b.machine;
        return Decision::Remote {
            machine: m.name.clone(),
            reason: format!(
                "best of {eligible} eligible machine(s): {}/{} slot(s) in use, speed factor {}{}",
                b.slots_in_use,
                m.max_jobs,
                m.speed_factor,
                holds(b.held_bytes)
            ),
        };
    }
    if eligible > 0 {
        if policy.local_when_busy && local_problem.is_none() && local.free_slot {
            return Decision::Local {
                reason: format!(
                    "all {eligible} eligible machine(s) are busy and a local slot is free (--local-when-busy)"
                ),
            };
        }
        return Decision::Postpone {
            reason: format!("all {eligible} eligible machine(s) are busy; waiting for a slot"),
        };
    }
    match local_problem {
        None => Decision::Local {
            reason: if machines.is_empty() {
                "no build machines are configured".to_owned()
            } else {
                format!(
                    "no machine can build it ({})",
                    why_no_machine(drv, machines)
                )
            },
        },
        Some(local_why) => {
            let remote_why = if machines.is_empty() {
                "no build machines are configured".to_owned()
            } else {
                why_no_machine(drv, machines)
            };
            Decision::Fail {
                reason: format!(
                    "cannot build {} derivation{}: {remote_why}, and the local machine cannot build it ({local_why})",
                    drv.system,
                    if drv.required_features.is_empty() {
                        String::new()
                    } else {
                        format!(" requiring {}", join(&drv.required_features))
                    }
                ),
            }
        }
    }
}

/// Whether `a` is a better choice than `b`: lower load per speed, then
/// faster, then holding more of the inputs, then less loaded, then the
/// smaller name. Load is compared by cross-multiplying so that no division
/// rounds two machines into a tie.
fn better(a: &MachineState<'_>, b: &MachineState<'_>) -> bool {
    let (la, sa) = (f64::from(a.slots_in_use), a.machine.speed_factor);
    let (lb, sb) = (f64::from(b.slots_in_use), b.machine.speed_factor);
    let key_a = la * sb;
    let key_b = lb * sa;
    if key_a != key_b {
        return key_a < key_b;
    }
    if sa != sb {
        return sa > sb;
    }
    if a.held_bytes != b.held_bytes {
        return a.held_bytes > b.held_bytes;
    }
    if a.slots_in_use != b.slots_in_use {
        return a.slots_in_use < b.slots_in_use;
    }
    a.machine.name < b.machine.name
}

/// Names what no machine has: the system, or which features, or that the
/// matching machines want mandatory features or are in backoff.
fn why_no_machine(drv: &DrvFacts, machines: &[MachineState<'_>]) -> String {
    let mut with_system: Vec<&MachineState<'_>> = machines
        .iter()
        .filter(|s| drv.system == "builtin" || s.machine.systems.contains(&drv.system))
        .collect();
    // By name, so that the message does not depend on the file's order.
    with_system.sort_by(|a, b| a.machine.name.cmp(&b.machine.name));
    if with_system.is_empty() {
        return format!("no machine builds {}", drv.system);
    }
    let unmet: Vec<&str> = drv
        .required_features
        .iter()
        .filter(|f| {
            !with_system
                .iter()
                .any(|s| s.machine.all_features().any(|g| g == *f))
        })
        .map(String::as_str)
        .collect();
    if !unmet.is_empty() {
        return format!(
            "no {} machine has the feature(s) {}",
            drv.system,
            unmet.join(", ")
        );
    }
    let mut parts = Vec::new();
    for s in &with_system {
        if let Standing::Ineligible(i) = assess(drv, s) {
            let why = match i {
                Ineligible::MissingFeatures(f) => format!("lacks {}", f.join(", ")),
                Ineligible::UnrequiredMandatory(f) => {
                    format!("requires mandatory feature(s) {}", f.join(", "))
                }
                Ineligible::Backoff => "is in backoff".to_owned(),
                Ineligible::System => continue,
            };
            parts.push(format!("{} {why}", s.machine.name));
        }
    }
    format!(
        "no {} machine is eligible: {}",
        drv.system,
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests;
