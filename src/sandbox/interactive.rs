//! Running a build's sandbox again with a shell or a command in place of
//! its builder (`sandoff enter`, see `crate::build::enter`):
//! [`run_interactive`] plans it with [`plan_interactive`] and runs it as
//! [`super::run_build`] runs a build (the same child, the same setup loop,
//! the build user's processes killed before and after), except for the
//! standard fds and the time limits, of which there are none.
//!
//! With [`InteractiveStdio::Terminal`] the program gets a fresh
//! pseudo-terminal, not the user's own: sandoff opens a pty, the child
//! makes its slave its stdin, stdout, stderr and controlling terminal (after
//! `setsid`), and sandoff copies bytes between the user's terminal (in raw
//! mode meanwhile) and the pty's master, as `su --pty`, sudo's `use_pty` and
//! `machinectl shell` do. The user's own terminal in the sandbox could push
//! input into the user's shell once the sandbox ends (`TIOCSTI`,
//! CVE-2016-7545 and kin), and as a controlling terminal it would have to
//! be stolen from the user's session. The window size is copied at the
//! start and on every `SIGWINCH` (read through a signalfd, so no handler).
//!
//! What the program writes reaches the user's terminal unfiltered (unlike a
//! build log, see `crate::termsafe`): it is an interactive session the user
//! asked for, with editors and prompts that need every escape sequence.
//!
//! With [`InteractiveStdio::Inherit`] the child keeps sandoff's own stdin,
//! stdout and stderr and has no controlling terminal (its own session, as a
//! build): for scripts and tests.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, tcsetwinsize, OptionalActions};

use super::exec::{
    child_main, clone_into_cgroup, read_setup_result, reap, spawn_error, BuildOutcome, ChildFds,
    KillOnDrop, PreparedExec, Setup,
};
use super::linux::LinuxSyscalls;
use super::plan::{plan_interactive, Interactive, InteractiveStdio, SandboxPlan};
use super::{with_user, SandboxError, SandboxSpec, UserLease};

/// Runs `run` in the sandbox `spec` describes (a build that ran already:
/// its directories as it left them) as `lease`'s user; returns how the
/// program ended. Blocks until it does.
pub fn run_interactive(
    lease: &UserLease,
    spec: &SandboxSpec,
    run: &Interactive,
) -> Result<BuildOutcome, SandboxError> {
    let mut plan = plan_interactive(spec, run)?;
    with_user(lease, spec, &mut plan, true, |plan| {
        match run.stdio {
            InteractiveStdio::Terminal => with_terminal(plan),
            InteractiveStdio::Inherit => {
                let (pid, guard) = spawn(plan, -1)?;
                let outcome = wait(pid);
                guard.disarm();
                outcome
            }
        }
        .map(|outcome| (outcome, None))
    })
    .map(|(outcome, _)| outcome)
}

/// Clones the child that runs `plan` (with `tty` as its terminal, if the
/// plan attaches one) and waits until it exec'd; a failed step is the error.
fn spawn(plan: &SandboxPlan, tty: i32) -> Result<(Pid, KillOnDrop), SandboxError> {
    let exec = PreparedExec::new(plan);
    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(spawn_error("create the error pipe"))?;
    let fds = ChildFds {
        log: tty,
        error: err_w.as_raw_fd(),
        netns: None,
    };
    let ops = plan.ops.as_slice();
    let mut child = || child_main(ops, &mut LinuxSyscalls, fds, &exec);
    let pid = clone_into_cgroup(plan, fds.netns.is_some(), &mut child)?;
    let pid = Pid::from_raw(pid);
    let guard = KillOnDrop::new(pid);
    drop(err_w);
    match read_setup_result(err_r, None) {
        Ok(Setup::Execd) => Ok((pid, guard)),
        Ok(Setup::Failed(step, errno)) => {
            reap(pid);
            guard.disarm();
            let op = plan
                .ops
                .get(step)
                .map_or_else(|| "exec".to_owned(), |op| op.to_string());
            Err(SandboxError::SetupFailed {
                step,
                op,
                source: errno.to_io(),
            })
        }
        // No deadline was given, so there is none to pass.
        Ok(Setup::TimedOut(_)) => Ok((pid, guard)),
        Err(e) => {
            reap(pid);
            guard.disarm();
            Err(e)
        }
    }
}

/// Waits for the child to end.
fn wait(pid: Pid) -> Result<BuildOutcome, SandboxError> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(BuildOutcome::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(BuildOutcome::Signaled(sig as i32)),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(spawn_error("wait for the program")(e)),
        }
    }
}

fn term_err(action: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Spawn {
        action,
        source: e.into(),
    }
}

/// The terminal run: a fresh pty proxied to the user's terminal (stdin).
fn with_terminal(plan: &SandboxPlan) -> Result<BuildOutcome, SandboxError> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let user = io::stdin();
    let user_settings =
        tcgetattr(user.as_fd()).map_err(term_err("read the terminal's settings"))?;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(term_err("open a pseudo-terminal"))?;
    grantpt(&master).map_err(term_err("grant the pseudo-terminal"))?;
    unlockpt(&master).map_err(term_err("unlock the pseudo-terminal"))?;
    let name = ptsname(&master, Vec::new()).map_err(term_err("name the pseudo-terminal"))?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(term_err("open the pseudo-terminal's slave"))?;
    // The shell starts with the user's settings (erase key, flow control)
    // and window size, as `script` and `su --pty` do.
    tcsetattr(&slave, OptionalActions::Now, &user_settings)
        .map_err(term_err("set the pseudo-terminal's settings"))?;
    copy_window_size(user.as_fd(), master.as_fd());

    // Blocked before the clone; the child's ResetSignals unblocks it.
    let mut winch = SigSet::empty();
    winch.add(Signal::SIGWINCH);
    let old_mask = winch
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(spawn_error("block SIGWINCH"))?;
    let result = (|| {
        let signals = SignalFd::with_flags(&winch, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(spawn_error("create a signalfd"))?;
        let (pid, guard) = spawn(plan, slave.as_raw_fd())?;
        // Only the child holds the slave now: when it and everything it
        // started are gone, reading the master fails with EIO.
        drop(slave);
        let proxied = {
            let _raw = RawMode::enter(user.as_fd(), &user_settings);
            proxy(&master, &signals)
        };
        if let Err(source) = proxied {
            reap(pid);
            guard.disarm();
            return Err(SandboxError::Spawn {
                action: "copy between the terminal and the sandbox",
                source,
            });
        }
        let outcome = wait(pid);
        guard.disarm();
        outcome
    })();
    if let Err(e) = old_mask.thread_set_mask() {
        tracing::warn!("cannot restore the signal mask: {e}");
    }
    result
}

/// The user's terminal in raw mode (every key goes to the sandbox's pty,
/// whose own line discipline does the editing); its settings come back on
/// drop, also when unwinding.
struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: rustix::termios::Termios,
}

impl<'a> RawMode<'a> {
    fn enter(fd: BorrowedFd<'a>, saved: &rustix::termios::Termios) -> Option<RawMode<'a>> {
        let mut raw = saved.clone();
        raw.make_raw();
        match tcsetattr(fd, OptionalActions::Now, &raw) {
            Ok(()) => Some(RawMode {
                fd,
                saved: saved.clone(),
            }),
            Err(e) => {
                tracing::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        if let Err(e) = tcsetattr(self.fd, OptionalActions::Drain, &self.saved) {
            tracing::warn!("cannot restore the terminal's settings: {e}");
        }
    }
}

fn copy_window_size(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    if let Ok(size) = tcgetwinsize(from) {
        // On the master it reaches the slave, and SIGWINCH its foreground.
        let _ = tcsetwinsize(to, size);
    }
}

fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Copies the user's keys to the pty and the pty's output to the user until
/// the pty hangs up (every process holding its slave is gone).
fn proxy(master: &OwnedFd, signals: &SignalFd) -> io::Result<()> {
    let user_in = io::stdin();
    let user_out = io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    let mut user_open = true;
    let readable = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
    loop {
        let (from_pty, resized, from_user) = {
            let mut fds = vec![
                PollFd::new(master.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            if user_open {
                fds.push(PollFd::new(user_in.as_fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| r.intersects(readable))
            };
            (ready(0), ready(1), ready(2))
        };
        if from_pty {
            match rustix::io::read(master, &mut buf[..]) {
                // EIO: the slave's last holder closed it.
                Ok(0) | Err(rustix::io::Errno::IO) => return Ok(()),
                Ok(n) => write_all(user_out.as_fd(), &buf[..n])?,
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if resized {
            let _ = signals.read_signal();
            copy_window_size(user_in.as_fd(), master.as_fd());
        }
        if from_user {
            match rustix::io::read(user_in.as_fd(), &mut buf[..]) {
                // The user's terminal is gone; the program keeps running
                // until it ends by itself (or sandoff is killed with it).
                Ok(0) => user_open = false,
                Ok(n) => write_all(master.as_fd(), &buf[..n])?,
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(rustix::io::Errno::IO) => user_open = false,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::exec::run_steps;
    use super::super::plan::tests::spec;
    use super::super::recording::{Call, RecordingSyscalls};
    use super::*;

    fn run(stdio: InteractiveStdio) -> Interactive {
        Interactive {
            program: b"/bin/sh".to_vec(),
            argv: vec![b"sh".to_vec()],
            env: Default::default(),
            stdio,
        }
    }

    #[test]
    fn the_terminal_is_attached_once_in_a_new_session_and_the_log_never() {
        let plan = plan_interactive(&spec(), &run(InteractiveStdio::Terminal)).expect("plan");
        let exec = PreparedExec::new(&plan);
        let mut sys = RecordingSyscalls::default();
        let fds = ChildFds {
            log: 5,
            error: 9,
            netns: None,
        };
        run_steps(&plan.ops, &mut sys, fds, &exec).expect("runs");
        let at = |call: &Call| sys.calls.iter().position(|c| c == call);
        let setsid = at(&Call::Setsid).expect("setsid");
        let attach = at(&Call::AttachTerminal(5)).expect("terminal attached");
        assert!(setsid < attach);
        assert_eq!(
            sys.calls
                .iter()
                .filter(|c| matches!(c, Call::AttachTerminal(_)))
                .count(),
            1
        );
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::RedirectStdio(_))));

        let plan = plan_interactive(&spec(), &run(InteractiveStdio::Inherit)).expect("plan");
        let exec = PreparedExec::new(&plan);
        let mut sys = RecordingSyscalls::default();
        run_steps(&plan.ops, &mut sys, fds, &exec).expect("runs");
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::RedirectStdio(_) | Call::AttachTerminal(_))));
    }
}
