//! `sandoff nix-build-hook VERBOSITY`: sandoff as nix-daemon 2.x's build
//! hook (`build-hook = /path/to/sandoff-build-hook`, a symlink to this
//! binary: the daemon runs the program it names with the verbosity as the
//! only argument, and `argv[0]` its base name, so the name routes here).
//! The protocol is in `sandoff::hook::nix`; the choice of reply and the
//! build after an accept are those of `sandoff hook`
//! (`sandoff::hook::offload`). This file does the IO around them:
//!
//! - stdin: the daemon's settings, requests, then after an accept the
//!   inputs and the wanted output names (wire format).
//! - stderr: the replies (`# …` lines) and the messages for the user, as
//!   `@nix` JSON lines so the daemon passes them to its client.
//! - fd 4: the remote build log.
//! - exit status: as `sandoff hook` (0, 100, 101, 1).
//!
//! Everything comes from the daemon's settings: the machines (`builders`),
//! the system and its features, the time limits, and the daemon's store
//! (`store`: the hook works on nix-daemon's own database under that root,
//! as `--store-root ROOT --daemon-store nix`, unless the command line
//! names a root or a daemon store itself).

use std::ffi::OsString;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use sandoff::decide::{file, LocalFacts, Machine, MachineFormat};
use sandoff::hook::nix::{
    self as proto, Builders, Config, DaemonStoreSetting, JsonMessages, Reply,
};
use sandoff::hook::offload::{self, Settings};
use sandoff::hook::Answer;
use sandoff::serve_protocol::BuildOptions;
use sandoff::store::StoreLocation;

/// The name under which the binary is nix-daemon's hook.
pub const HOOK_NAME: &str = "sandoff-build-hook";

/// Options of `sandoff nix-build-hook`.
#[derive(Args, Debug)]
pub struct NixHookArgs {
    /// The daemon's verbosity (0-7); only debug output depends on it.
    #[arg(value_name = "VERBOSITY")]
    verbosity: u8,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
}

/// `argv` for clap: invoked as [`HOOK_NAME`], `NAME VERBOSITY` becomes
/// `NAME nix-build-hook -- VERBOSITY`; any other name is left alone.
pub fn route(argv: Vec<OsString>) -> Vec<OsString> {
    if !super::invoked_as(&argv, HOOK_NAME) {
        return argv;
    }
    let mut out = vec![argv[0].clone(), "nix-build-hook".into(), "--".into()];
    out.extend(argv.into_iter().skip(1));
    out
}

/// The machines named by the `builders` setting. A missing `@FILE` is no
/// machines, as in Nix.
fn machines(config: &Config) -> anyhow::Result<Vec<Machine>> {
    match &config.builders {
        Builders::File(path) => {
            if !path.exists() {
                return Ok(Vec::new());
            }
            file::load_as(path, Some(MachineFormat::Nix), &config.system)
                .with_context(|| format!("cannot use machines file '{}'", path.display()))
        }
        Builders::Inline(text) => file::parse_as(
            Path::new("builders"),
            text,
            Some(MachineFormat::Nix),
            &config.system,
            &sandoff::decide::nix_format::FsIncludes,
            &sandoff::decide::guix_format::ProcessEnv,
        )
        .context("cannot use the machines of the 'builders' setting"),
    }
}

/// Where the machines' slots are counted: `NIX_CURRENT_LOAD` when set (Nix
/// 1.x, shared by every hook on the host), else `current-load` in the
/// daemon's state directory, where Nix 2.8's own `build-remote` keeps them
/// (same file names, same `flock`s): a host that runs both hooks, or moves
/// from one to the other with builds running, never overcommits a machine.
fn slot_dir(loc: &StoreLocation) -> PathBuf {
    if let Some(dir) = std::env::var_os("NIX_CURRENT_LOAD").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let db = loc.db_dir();
    db.parent().unwrap_or(&db).join("current-load")
}

/// Writes `reply` on stderr, flushed: the daemon waits for it.
fn reply(reply: &Reply) -> io::Result<()> {
    let mut err = io::stderr().lock();
    err.write_all(reply.text().as_bytes())?;
    err.flush()
}

/// Logs of the hook as `@nix` messages at their Nix level, shown up to the
/// daemon's verbosity (the hook's argument) unless `RUST_LOG` says more:
/// the daemon passes them to its client, who sees them as `nix-build -v`
/// shows build-remote's own. A plain stderr line would stay in the daemon's
/// log.
pub fn init_tracing(args: &NixHookArgs) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => tracing_subscriber::EnvFilter::new(directives),
        Err(_) => tracing_subscriber::EnvFilter::new(proto::tracing_level(args.verbosity).as_str()),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_writer(NixLog)
        .init();
}

/// Makes a [`NixLine`] for each event, at the event's level.
struct NixLog;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NixLog {
    type Writer = NixLine;

    fn make_writer(&'a self) -> NixLine {
        NixLine::at(tracing::Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> NixLine {
        NixLine::at(*meta.level())
    }
}

/// One event's text, written as `@nix` message lines to stderr when done
/// (one `write` each, so lines of threads do not interleave).
struct NixLine {
    level: u8,
    text: Vec<u8>,
}

impl NixLine {
    fn at(level: tracing::Level) -> NixLine {
        NixLine {
            level: proto::nix_level(level),
            text: Vec::new(),
        }
    }
}

impl Write for NixLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for NixLine {
    fn drop(&mut self) {
        let text = sandoff::termsafe::filter(&self.text);
        let lines: String = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| proto::message_line_at(self.level, l))
            .collect();
        let _ = io::stderr().lock().write_all(lines.as_bytes());
    }
}

/// `location(root)`: where the store is when the daemon's is under `root`.
/// A failure is told to the daemon's client as an `@nix` message (a plain
/// stderr line would stay in the daemon's own log) and ends the hook with
/// status 1, as Nix's own `build-remote` does.
pub fn run(
    args: NixHookArgs,
    location: &dyn Fn(PathBuf) -> StoreLocation,
) -> anyhow::Result<ExitCode> {
    match serve(args, location) {
        Ok(code) => Ok(code),
        Err(e) => {
            let text = sandoff::termsafe::filter(format!("{e:#}").replace('\n', " ").as_bytes());
            let mut err = io::stderr().lock();
            err.write_all(proto::message_line(&format!("sandoff: {text}")).as_bytes())?;
            err.flush()?;
            Ok(ExitCode::from(1))
        }
    }
}

fn serve(
    args: NixHookArgs,
    location: &dyn Fn(PathBuf) -> StoreLocation,
) -> anyhow::Result<ExitCode> {
    let (mut log, _) = super::hook::build_log();
    let mut input = BufReader::new(io::stdin().lock());
    let settings = proto::read_settings(&mut input)?;
    let config = Config::from_settings(&settings)?;
    let DaemonStoreSetting::Local { root } = config.store.clone();
    let loc = location(root);
    tracing::debug!(verbosity = args.verbosity, root = %loc.root.display(), "nix build hook");
    let store = sandoff::derivation::check::open_store(loc.clone());
    let hook_settings = Settings {
        system: config.system.clone(),
        kvm: config.system_features.contains("kvm"),
        local: Some(LocalFacts {
            system: config.system.clone(),
            extra_platforms: config.extra_platforms.iter().cloned().collect(),
            features: config.system_features.clone(),
            free_slot: false,
            disabled: config.max_jobs == 0,
        }),
        ssh: args.ssh.options(),
        options: BuildOptions {
            max_silent_time: config.max_silent_time,
            build_timeout: config.timeout,
            max_log_size: config.max_log_size,
            keep_failed: false,
        },
        print_build_trace: false,
        slot_dir: Some(slot_dir(&loc)),
        substitute_on_machines: config.builders_use_substitutes,
    };
    let mut messages = JsonMessages::new(io::stderr());
    let accepted = loop {
        let Some(req) = proto::read_request(&mut input)? else {
            return Ok(ExitCode::SUCCESS);
        };
        let listed = machines(&config);
        if listed.as_ref().is_ok_and(Vec::is_empty) {
            reply(&Reply::DeclinePermanently)?;
            continue;
        }
        let mut load = || {
            machines(&config).map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
        };
        let answer = match &store {
            Ok(store) => {
                offload::answer_or_decline(store, &hook_settings, &mut load, &req, &mut messages)
            }
            Err(e) => offload::decline_because(e, &mut messages),
        };
        messages.flush()?;
        match answer {
            Answer::Accept(accepted) => {
                reply(&Reply::Accept {
                    store_uri: accepted.store_uri().to_owned(),
                })?;
                break accepted;
            }
            Answer::Decline => reply(&Reply::Decline)?,
            Answer::Postpone => reply(&Reply::Postpone)?,
        }
    };
    // Only an open store accepts.
    let store = store?;
    let data = proto::read_accepted(&mut input)?;
    let wanted = accepted.outputs_named(&data.outputs)?;
    let code = offload::build(
        &store,
        accepted,
        &hook_settings,
        &wanted,
        &mut log,
        // nix-daemon 2.x shows its client both the log and the messages:
        // the notes (which machine, a failure) go to the messages only, or
        // the client would read each twice.
        false,
        &mut messages,
    )?;
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_hook_name_routes_to_nix_build_hook() {
        // nix-daemon 2.8 passes the base name as argv[0].
        assert_eq!(
            route(args(&["sandoff-build-hook", "3"])),
            args(&["sandoff-build-hook", "nix-build-hook", "--", "3"])
        );
        assert_eq!(
            route(args(&["/x/sandoff-build-hook", "0"]))[1..],
            args(&["nix-build-hook", "--", "0"])[..]
        );
        let other = args(&["/usr/bin/sandoff", "hook"]);
        assert_eq!(route(other.clone()), other);
    }
}
