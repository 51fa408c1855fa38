//! `sandoff machines ...`, and the machines-file options shared with
//! `sandoff decide`.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sandoff::decide::{self, file, Machine};
use sandoff::remote::compress::WireCompression;
use sandoff::remote::offloader::Offloader;
use sandoff::remote::ssh::{wire_compression, SshOptions};
use sandoff::store::StoreLocation;
use sandoff::termsafe;

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
    /// Check that machines can take builds (as `guix offload test`): connect
    /// with the host key verified, start the remote sandoff, send a small
    /// signed path and fetch it back.
    Test {
        #[command(flatten)]
        source: MachinesArgs,
        #[command(flatten)]
        ssh: SshArgs,
        /// Only the machines whose name contains one of these.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Show each machine: reachable, systems, load, free disk, slots in use,
    /// backoff.
    Status {
        #[command(flatten)]
        source: MachinesArgs,
        #[command(flatten)]
        ssh: SshArgs,
        /// Print one JSON object per machine, in a JSON array.
        #[arg(long)]
        json: bool,
        /// Only the machines whose name contains one of these.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

/// How to reach machines.
#[derive(Args, Debug, Clone)]
pub struct SshArgs {
    /// Give up connecting to a machine after this many seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Probe a silent connection after this many seconds; a link that does
    /// not answer for about three times as long counts as dead.
    #[arg(long, value_name = "S", default_value_t = 15)]
    pub ssh_keepalive: u64,
}

impl SshArgs {
    /// The SSH options.
    pub fn options(&self) -> SshOptions {
        SshOptions {
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
            keepalive: Duration::from_secs(self.ssh_keepalive.max(1)),
            ..SshOptions::default()
        }
    }
}

/// The machines whose name contains one of `names` (all if none given).
pub fn select(machines: Vec<Machine>, names: &[String]) -> anyhow::Result<Vec<Machine>> {
    let picked: Vec<Machine> = machines
        .into_iter()
        .filter(|m| names.is_empty() || names.iter().any(|n| m.name.as_str().contains(n.as_str())))
        .collect();
    anyhow::ensure!(!picked.is_empty(), "no build machine matches");
    Ok(picked)
}

pub fn run(cmd: MachinesCommand, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    match cmd {
        MachinesCommand::Test { source, ssh, names } => {
            let machines = select(source.load(&decide::host_system())?, &names)?;
            let store = sandoff::derivation::check::open_store(loc.clone())?;
            let off = Offloader::new(loc, machines.clone(), 1, ssh.options())?;
            let mut failed = 0;
            for m in &machines {
                match off.test_machine(&store, m) {
                    Ok(report) => {
                        outln!("{}: ok", m.name);
                        for step in report.passed {
                            outln!("  {}", safe(&step));
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        // What the machine printed is part of the error.
                        outln!("{}: FAILED: {}", m.name, safe(&error_chain(&e)));
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        MachinesCommand::Status {
            source,
            ssh,
            json,
            names,
        } => {
            let machines = select(source.load(&decide::host_system())?, &names)?;
            let off = Offloader::new(loc, machines.clone(), 1, ssh.options())?;
            let now = SystemTime::now();
            let mut all = Vec::new();
            for m in &machines {
                let st = off.status(m)?;
                let backoff = st.backoff.as_ref().filter(|b| b.active(now)).map(|b| {
                    let left = b.until.duration_since(now).unwrap_or_default().as_secs();
                    (b.failures, left, b.last_error.clone())
                });
                if json {
                    all.push(serde_json::json!({
                        "name": m.name,
                        "reachable": st.reachable.is_ok(),
                        "error": st.reachable.as_ref().err(),
                        "systems": m.systems,
                        "load": st.load,
                        "cores": st.cores,
                        "normalizedLoad": st.normalized_load(),
                        "freeDisk": st.free_disk,
                        "slotsInUse": st.slots_in_use,
                        "maxJobs": m.max_jobs,
                        "backoff": backoff.as_ref().map(|(n, left, e)| serde_json::json!({
                            "failures": n, "secondsLeft": left, "lastError": e
                        })),
                    }));
                    continue;
                }
                outln!("{}", m.name);
                match &st.reachable {
                    Ok(()) => outln!("  reachable: yes"),
                    Err(e) => outln!("  reachable: no ({})", safe(e)),
                }
                outln!("  systems: {}", list(&m.systems));
                if let (Some(l), Some(c)) = (st.load, st.cores) {
                    outln!(
                        "  load: {l:.2} on {c} cores (normalized {:.2})",
                        st.normalized_load().unwrap_or(0.0)
                    );
                }
                if let Some(f) = st.free_disk {
                    outln!("  free disk: {:.1} GiB", f as f64 / (1u64 << 30) as f64);
                }
                outln!("  slots in use: {}/{}", st.slots_in_use, m.max_jobs);
                match backoff {
                    Some((n, left, e)) => {
                        outln!(
                            "  backoff: {left} s left after {n} failure(s): {}",
                            safe(&e)
                        )
                    }
                    None => outln!("  backoff: none"),
                }
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        MachinesCommand::List { source, json } => {
            let machines = source.load(&decide::host_system())?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&decide::machines::to_json(&machines))?
                );
            } else {
                for m in &machines {
                    // Systems, features and paths are any token of the file.
                    outln!("{}", safe(&human(m)));
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

/// One line per machine, in the order of Nix's fields, then how its
/// streams are compressed (`zstd:LEVEL`, `ssh-zlib` or `off`: what the
/// entry means for its serve program).
fn human(m: &Machine) -> String {
    let compress = match wire_compression(m) {
        WireCompression::Zstd { level } => format!("zstd:{level}"),
        WireCompression::SshZlib => "ssh-zlib".to_owned(),
        WireCompression::None => "off".to_owned(),
    };
    format!(
        "{}  systems={} jobs={} speed={} features={} mandatory={} compress={compress}",
        m.name,
        list(&m.systems),
        m.max_jobs,
        m.speed_factor,
        list(&m.supported_features),
        list(&m.mandatory_features),
    )
}

/// `error: cause: cause` on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cur = c.source();
    }
    s
}

/// Text a machine sent (an error, its stderr), made safe for a terminal.
fn safe(text: &impl std::fmt::Display) -> String {
    termsafe::filter(text.to_string().as_bytes())
}
