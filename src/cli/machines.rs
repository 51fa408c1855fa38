//! `sandoff machines ...`, and the machines-file options shared with
//! `sandoff decide`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sandoff::decide::{self, file, Machine};

/// Where the machines come from.
#[derive(Args, Debug, Clone)]
pub struct MachinesArgs {
    /// The machines file (Nix format, or Guix `machines.scm`); default
    /// /etc/sandoff/machines, /etc/guix/machines.scm or /etc/nix/machines,
    /// the first that exists.
    #[arg(long, env = file::ENV_VAR, value_name = "FILE")]
    pub machines: Option<PathBuf>,
}

impl MachinesArgs {
    /// The machines, read from the resolved file (none if there is no file).
    /// `default_system` fills Nix entries that leave out their systems.
    pub fn load(&self, default_system: &str) -> anyhow::Result<Vec<Machine>> {
        let Some(path) = file::resolve(self.machines.as_deref(), None, |p| p.exists()) else {
            tracing::debug!("no machines file; every build is local");
            return Ok(Vec::new());
        };
        let machines = file::load(&path, default_system)
            .with_context(|| format!("cannot use machines file '{}'", path.display()))?;
        Ok(machines)
    }
}

#[derive(Subcommand, Debug)]
pub enum MachinesCommand {
    /// List the build machines as sandoff reads them.
    List {
        #[command(flatten)]
        source: MachinesArgs,
        /// Print JSON (keys name, systems, user, port, privateKey, maxJobs,
        /// speedFactor, supportedFeatures, mandatoryFeatures, hostKey).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: MachinesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MachinesCommand::List { source, json } => {
            let machines = source.load(&decide::host_system())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&decide::machines::to_json(&machines))?
                );
            } else {
                for m in &machines {
                    println!("{}", human(m));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(items: &std::collections::BTreeSet<String>) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One line per machine, in the order of Nix's fields.
fn human(m: &Machine) -> String {
    format!(
        "{}  systems={} jobs={} speed={} features={} mandatory={}",
        m.name,
        list(&m.systems),
        m.max_jobs,
        m.speed_factor,
        list(&m.supported_features),
        list(&m.mandatory_features),
    )
}
