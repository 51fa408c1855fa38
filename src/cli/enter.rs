//! `sandoff enter DIR [--shell PATH] [-- CMD...]`: a shell, or a command, in
//! the sandbox of a failed build whose directory `--keep-failed` kept, set
//! up as the build's was (see `sandoff::build::enter`). Also what
//! `sandoff build --shell-on-failure` runs.
//!
//! On a terminal (stdin and stdout both) the shell gets a pseudo-terminal
//! of its own, proxied to the user's; otherwise it reads and writes
//! sandoff's own stdin, stdout and stderr. The exit status is the shell's
//! (or the command's), 128 + the signal if it was killed.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sandoff::build::enter::KeptBuild;
use sandoff::sandbox::{BuildOutcome, InteractiveStdio};

/// How often `sandoff enter` checks again whether the build user is free.
const USER_POLL: Duration = Duration::from_millis(500);

/// Options of `sandoff enter`.
#[derive(Args, Debug)]
pub struct EnterArgs {
    /// The kept build directory (the failure of `sandoff build
    /// --keep-failed` names it).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// The shell to run: a path inside the sandbox (default: the first
    /// bin/bash, then bin/sh of the build's input closure, else busybox sh).
    #[arg(long, value_name = "PATH")]
    shell: Option<PathBuf>,
    /// Fail at once when a build is running as the build's user, instead
    /// of waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    /// A command to run instead of an interactive shell (run by the shell
    /// as "$@", so builtins and busybox applets need no PATH).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

pub fn run(args: EnterArgs) -> anyhow::Result<ExitCode> {
    let command: Vec<Vec<u8>> = args.command.iter().map(|a| a.as_bytes().to_vec()).collect();
    let shell = args.shell.as_ref().map(|s| s.as_os_str().as_bytes());
    enter(&args.dir, shell, &command, !args.no_wait).map(ExitCode::from)
}

/// Enters the kept build `dir`; returns the exit status for sandoff.
pub fn enter(
    dir: &Path,
    shell: Option<&[u8]>,
    command: &[Vec<u8>],
    wait: bool,
) -> anyhow::Result<u8> {
    let kept = KeptBuild::open(dir)?;
    kept.check_inputs()
        .with_context(|| format!("cannot enter the build of '{}'", kept.drv()))?;
    let shell = kept.shell(shell)?;
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let stdio = if terminal {
        InteractiveStdio::Terminal
    } else {
        InteractiveStdio::Inherit
    };
    let term = std::env::var_os("TERM").map(|t| t.as_bytes().to_vec());
    let run = kept.interactive(&shell, command, stdio, term);
    let user = kept.user();
    let lease = match kept.lease(None)? {
        Some(lease) => lease,
        None if !wait => anyhow::bail!(
            "build user '{}' (uid {}) is in use by a build: try again when it ends, or without --no-wait to wait for it",
            user.user_name(),
            user.uid()
        ),
        None => {
            eprintln!(
                "sandoff: waiting for build user '{}' (uid {}), in use by a build",
                user.user_name(),
                user.uid()
            );
            kept.lease(Some(USER_POLL))?
                .context("no lease after waiting for the build user")?
        }
    };
    if terminal && command.is_empty() {
        eprintln!(
            "sandoff: a shell in the sandbox of the failed build of '{}', as '{}' (uid {}), in its build directory; exit to leave",
            kept.drv(),
            user.user_name(),
            user.uid()
        );
    }
    let outcome = kept.run(&lease, &run)?;
    drop(lease);
    Ok(match outcome {
        BuildOutcome::Exited(code) => (code & 0xff) as u8,
        BuildOutcome::Signaled(sig) => (128 + sig).clamp(0, 255) as u8,
        BuildOutcome::TimedOut { .. } => 1,
    })
}
