//! `sandoff decide DRV`: where a derivation would be built, and why.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use sandoff::decide::{self, DrvFacts, LocalFacts, MachineState, Policy};
use sandoff::derivation::Derivation;
use sandoff::store::StoreLocation;

use super::machines::MachinesArgs;

#[derive(Args, Debug)]
pub struct DecideArgs {
    /// The derivation (a .drv store path).
    drv: String,
    #[command(flatten)]
    source: MachinesArgs,
    /// Never offload.
    #[arg(long)]
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
    /// Print JSON: decision, machine, reason, machines [{name, eligible, reason}].
    #[arg(long)]
    json: bool,
}

pub fn run(args: DecideArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let path = loc.dir.parse_path(&args.drv)?;
    anyhow::ensure!(
        path.is_derivation(),
        "'{}' is not a derivation (a .drv store path)",
        args.drv
    );
    let file = loc.real_path(&path);
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let drv = Derivation::from_aterm(&bytes, &loc.dir)
        .with_context(|| format!("cannot parse {}", loc.logical(&path)))?;
    let facts = DrvFacts::from_derivation(&drv);

    let mut local = LocalFacts::detect();
    if let Some(system) = args.system {
        local = LocalFacts {
            system: system.clone(),
            ..LocalFacts::for_system(&system, local.features.contains("kvm"))
        };
    }
    if let Some(extra) = args.extra_platforms {
        local.extra_platforms = nonempty(extra);
    }
    if let Some(features) = args.system_features {
        local.features = nonempty(features);
    }
    let machines = args.source.load(&local.system)?;
    let states: Vec<MachineState<'_>> = machines.iter().map(MachineState::idle).collect();
    let policy = Policy {
        local_only: args.local_only,
        local_when_busy: args.local_when_busy,
    };
    let decision = decide::decide(&facts, &states, &local, &policy);
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
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{decision}");
        for v in &verdicts {
            println!("  {}: {}", v.name, v.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--system-features ''` means none, not one empty feature.
fn nonempty(items: Vec<String>) -> BTreeSet<String> {
    items.into_iter().filter(|s| !s.is_empty()).collect()
}
