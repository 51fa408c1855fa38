//! `sandoff decide DRV`: where a derivation would be built, and why.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;
use sandoff::decide::{self, DrvFacts, LocalFacts, MachineState, Placement, Policy};
use sandoff::derivation::check::read_drv_file;
use sandoff::remote::backoff::Backoff;
use sandoff::remote::offloader::{observed_state, InputClosure, Offloader};
use sandoff::remote::slots::SlotDir;
use sandoff::store::StoreLocation;

use super::machines::MachinesArgs;

#[derive(Args, Debug)]
pub struct DecideArgs {
    /// The derivation (a .drv store path).
    drv: String,
    #[command(flatten)]
    placement: PlacementArgs,
    /// Print JSON: decision, machine, reason, machines [{name, eligible, reason, held_bytes}].
    #[arg(long)]
    json: bool,
    /// Ask each eligible machine which paths of the input closure it holds
    /// (over SSH; the inputs must be valid in the store): among equally
    /// good machines the one holding more is chosen, as `sandoff build`
    /// does with what it learns from the machines.
    #[arg(long)]
    ask_machines: bool,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
}

/// Where derivations may be built: shared by `sandoff decide` and
/// `sandoff build`, so both decide alike.
#[derive(Args, Debug, Clone)]
pub struct PlacementArgs {
    #[command(flatten)]
    source: MachinesArgs,
    /// Never offload (`--no-build-hook` is a synonym, as in guix-daemon).
    #[arg(long, alias = "no-build-hook")]
    local_only: bool,
    /// Build locally when every eligible machine is busy.
    #[arg(long)]
    local_when_busy: bool,
    /// The local system (default: the host's, e.g. x86_64-linux).
    #[arg(long, value_name = "SYSTEM")]
    system: Option<String>,
    /// Other systems the local machine builds (default as Nix: i686-linux on x86_64-linux).
    #[arg(long, value_name = "SYSTEM", num_args = 0.., value_delimiter = ',')]
    extra_platforms: Option<Vec<String>>,
    /// The local machine's features (default as Nix: benchmark, big-parallel, nixos-test, kvm if /dev/kvm).
    #[arg(long, value_name = "FEATURE", num_args = 0.., value_delimiter = ',')]
    system_features: Option<Vec<String>>,
}

impl PlacementArgs {
    /// The machines (read from their file), the local facts and the policy.
    pub fn resolve(self) -> anyhow::Result<Placement> {
        let mut local = LocalFacts::detect();
        if let Some(system) = self.system {
            local = LocalFacts {
                system: system.clone(),
                ..LocalFacts::for_system(&system, local.features.contains("kvm"))
            };
        }
        if let Some(extra) = self.extra_platforms {
            local.extra_platforms = nonempty(extra);
        }
        if let Some(features) = self.system_features {
            local.features = nonempty(features);
        }
        let machines = self.source.load(&local.system)?;
        Ok(Placement {
            machines,
            local,
            policy: Policy {
                local_only: self.local_only,
                local_when_busy: self.local_when_busy,
            },
        })
    }
}

pub fn run(args: DecideArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let path = loc.dir.parse_path(&args.drv)?;
    anyhow::ensure!(
        path.is_derivation(),
        "'{}' is not a derivation (a .drv store path)",
        args.drv
    );
    let (_, drv) = read_drv_file(&loc.real_path(&path), &loc.dir)?;
    let facts = DrvFacts::from_derivation(&drv);
    let placement = args.placement.resolve()?;
    // The machines as this host sees them now: slots other builds hold,
    // and backoff after failures.
    let (slots, backoff) = (SlotDir::new(&loc.state), Backoff::new(&loc.state));
    let now = SystemTime::now();
    let mut states: Vec<MachineState<'_>> = placement
        .machines
        .iter()
        .map(|m| observed_state(&slots, &backoff, m, now))
        .collect::<Result<_, _>>()?;
    if args.ask_machines {
        ask_machines(
            loc,
            &placement,
            (&path, &drv),
            &facts,
            &mut states,
            &args.ssh,
        )?;
    }
    let decision = decide::decide(&facts, &states, &placement.local, &placement.policy);
    let verdicts = decide::explain(&facts, &states);

    if args.json {
        let json = serde_json::json!({
            "decision": decision.kind(),
            "machine": decision.machine().map(|m| m.as_str()),
            "reason": decision.reason(),
            "machines": verdicts.iter().map(|v| serde_json::json!({
                "name": v.name.as_str(),
                "eligible": v.eligible,
                "reason": v.reason,
                "held_bytes": v.held_bytes,
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        // Reasons quote the derivation's features, which its author chose.
        let safe = |text: String| sandoff::termsafe::filter(text.as_bytes());
        outln!("{}", safe(decision.to_string()));
        for v in &verdicts {
            outln!("  {}: {}", v.name, safe(v.reason.to_string()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Fills in the bytes of the input closure each eligible machine holds,
/// asking it. A machine that cannot be asked holds nothing known; why is
/// said on stderr.
fn ask_machines(
    loc: &StoreLocation,
    placement: &Placement,
    (drv_path, drv): (&sandoff::store::StorePath, &sandoff::derivation::Derivation),
    facts: &DrvFacts,
    states: &mut [MachineState<'_>],
    ssh: &super::machines::SshArgs,
) -> anyhow::Result<()> {
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let inputs = sandoff::build::local::input_paths(&store, drv)
        .map_err(|kind| sandoff::build::BuildError::new(&loc.dir, drv_path, kind))?;
    let closure = InputClosure::of(&store, &inputs)?;
    let off = Offloader::new(loc, placement.machines.clone(), 1, ssh.options())?;
    for state in states.iter_mut() {
        if !decide::assess(facts, state).is_eligible() {
            continue;
        }
        match off.query_held(state.machine, &closure) {
            Ok(bytes) => state.held_bytes = bytes,
            Err(e) => eprintln!(
                "sandoff: cannot ask '{}' what it holds: {}",
                state.machine.name,
                sandoff::termsafe::filter(e.to_string().as_bytes())
            ),
        }
    }
    Ok(())
}

/// `--system-features ''` means none, not one empty feature.
fn nonempty(items: Vec<String>) -> BTreeSet<String> {
    items.into_iter().filter(|s| !s.is_empty()).collect()
}
