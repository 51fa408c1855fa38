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
//! - fd 4: the remote build log and the notes about the build (which
//!   machine, a machine that failed); stderr when fd 4 is not open.
//! - exit status: 0 (outputs valid here, or no request accepted), 100
//!   (the build failed on the machine), 101 (it timed out there), 1
//!   (anything else: the daemon's transient "hook failure").
//!
//! Every failure before `# accept` (no store, a machines file that cannot
//! be read, a derivation that is not valid or cannot be read, slot or
//! backoff files) is answered `# decline` after a line `sandoff: REASON`
//! on stderr: a hook that exits without a reply fails the client's build.
//! Only a malformed request line and the end of input end the hook before
//! a reply, since there is then no request to answer.
//!
//! The machines come from `--machines`/`$SANDOFF_MACHINES`, else Nix 1.x's
//! `$NIX_REMOTE_SYSTEMS`, else `--default-machines` (a missing one meaning
//! none, as `guix offload` does with its `machines.scm`), else the first of
//! sandoff's default locations that exists. `$NIX_CURRENT_LOAD`, when set,
//! is the slot directory every hook on the host shares.
//!
//! After an accept, a machine that cannot be reached or drops the link
//! goes into backoff and the build moves to another machine (waiting for a
//! slot if need be); only when no machine is left does the hook give up.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use sandoff::decide::{file, LocalFacts, Machine};
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
    /// Nix 1.x's machines file (`remote-systems.conf`: Nix's machines lines
    /// without the host-key field), used when --machines is not given; an
    /// absolute path. Default: $NIX_REMOTE_SYSTEMS.
    #[arg(long, value_name = "FILE")]
    remote_systems: Option<PathBuf>,
    /// The machines file when neither --machines nor --remote-systems is
    /// given, in place of the default locations; a missing file means no
    /// machines (`guix offload` uses $GUIX_CONFIGURATION_DIRECTORY/machines.scm).
    #[arg(long, value_name = "FILE")]
    default_machines: Option<PathBuf>,
    /// The slot directory shared by every hook on this host. Default:
    /// $NIX_CURRENT_LOAD, else <state>/current-load.
    #[arg(long, value_name = "DIR")]
    current_load: Option<PathBuf>,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
}

/// `var` from the environment, empty meaning unset (as the daemons' own
/// `getenv` checks treat it): the Nix 1.x variables are read here, not by
/// clap, which would refuse an empty one before any request is answered.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl HookArgs {
    /// The machines, read again for every request (edits apply at once).
    fn load_machines(&self) -> anyhow::Result<Vec<Machine>> {
        let defaults: Vec<PathBuf> = match &self.default_machines {
            Some(p) => vec![p.clone()],
            None => file::DEFAULT_LOCATIONS.iter().map(PathBuf::from).collect(),
        };
        let remote_systems = self
            .remote_systems
            .clone()
            .or_else(|| env_path("NIX_REMOTE_SYSTEMS"));
        let found = file::resolve_for_hook(
            self.machines.machines.as_deref(),
            remote_systems.as_deref(),
            &defaults,
            |p| p.exists(),
        )?;
        let Some(found) = found else {
            tracing::debug!("no machines file; every build is the daemon's");
            return Ok(Vec::new());
        };
        file::load_as(&found.path, found.format, &self.system)
            .with_context(|| format!("cannot use machines file '{}'", found.path.display()))
    }
}

pub fn run(args: HookArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    // First, before anything of ours can be given descriptor 4.
    let (mut log, log_apart) = build_log();
    // A store that cannot be opened declines every request (below).
    let store = sandoff::derivation::check::open_store(loc.clone());
    let settings = Settings {
        system: args.system.clone(),
        kvm: LocalFacts::detect().features.contains("kvm"),
        local: None,
        ssh: args.ssh.options(),
        options: BuildOptions {
            max_silent_time: args.max_silent_time,
            build_timeout: args.build_timeout,
            max_log_size: 0,
            keep_failed: false,
        },
        print_build_trace: args.print_build_trace == 1,
        slot_dir: args
            .current_load
            .clone()
            .or_else(|| env_path("NIX_CURRENT_LOAD")),
        // Neither guix-daemon nor Nix 1.x asks its hook for this.
        substitute_on_machines: false,
    };
    let mut machines = || {
        args.load_machines()
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
    };
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let accepted = hook::serve_requests(&mut input, &mut output, |req| {
        let mut messages = io::stderr();
        Ok::<_, offload::HookRunError>(match &store {
            Ok(store) => {
                offload::answer_or_decline(store, &settings, &mut machines, req, &mut messages)
            }
            Err(e) => offload::decline_because(e, &mut messages),
        })
    })?;
    let Some((_, accepted)) = accepted else {
        return Ok(ExitCode::SUCCESS);
    };
    // Only an open store accepts.
    let store = store?;
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
        log_apart,
        &mut io::stderr(),
    )?;
    Ok(ExitCode::from(code))
}

/// The daemon's log pipe, fd 4, opened anew through /proc (the crate has no
/// `unsafe` to adopt a raw descriptor), and `true`; stderr when fd 4 is not
/// open, and `false` (the log is then where the messages go).
pub fn build_log() -> (Box<dyn Write>, bool) {
    match OpenOptions::new().append(true).open("/proc/self/fd/4") {
        Ok(f) => (Box::new(f), true),
        Err(e) => {
            tracing::debug!("no build log on fd 4 ({e}); writing it to stderr");
            // A terminal, most likely: the log is filtered on its way.
            (Box::new(termsafe::Writer::new(io::stderr())), false)
        }
    }
}
