//! Running a [`SandboxPlan`]: the child executes the setup steps in order and
//! execs the builder, or reports the failing step through a close-on-exec
//! pipe and exits (it never execs a half-built sandbox); the parent streams
//! the log, enforces the time limits and collects the exit status.
//!
//! Error protocol (as Nix's and bubblewrap's): the parent reads the error
//! pipe until EOF. EOF without data means `execve` succeeded (the pipe closed
//! on exec); 8 bytes (step index, errno; little-endian `u32`, `i32`) mean the
//! setup failed at that step.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::linux::{clone_child, wait4, LinuxSyscalls};
use super::plan::{MountFlags, SandboxPlan, SetupOp};
use super::syscall::{Errno, FileKind, Syscall};
use super::SandboxError;

/// Which limit killed a build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No output for `max_silent` (`--max-silent-time`).
    Silent,
    /// Ran longer than `total` (`--timeout`).
    Total,
}

/// How a build ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    /// The builder exited with this status.
    Exited(i32),
    /// The builder was killed by this signal.
    Signaled(i32),
    /// sandoff killed the build (its whole PID namespace) after `after`.
    TimedOut {
        /// The limit that was hit.
        kind: TimeoutKind,
        /// The limit's value.
        after: Duration,
    },
}

impl BuildOutcome {
    /// Whether the builder exited with status 0.
    pub fn success(&self) -> bool {
        matches!(self, BuildOutcome::Exited(0))
    }
}

impl std::fmt::Display for BuildOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildOutcome::Exited(c) => write!(f, "builder exited with status {c}"),
            BuildOutcome::Signaled(s) => write!(f, "builder was killed by signal {s}"),
            BuildOutcome::TimedOut {
                kind: TimeoutKind::Silent,
                after,
            } => {
                write!(f, "timed out after {} seconds of silence", after.as_secs())
            }
            BuildOutcome::TimedOut {
                kind: TimeoutKind::Total,
                after,
            } => {
                write!(f, "timed out after {} seconds", after.as_secs())
            }
        }
    }
}

/// File descriptors the child uses during setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildFds {
    /// Write end of the log pipe: becomes stdout and stderr; in an
    /// interactive run with a terminal, the terminal (see [`SetupOp::Terminal`]).
    pub log: i32,
    /// Write end of the error pipe (close-on-exec).
    pub error: i32,
    /// A network namespace made ahead ([`super::netns`]) that the child
    /// joins at its loopback step instead of having been cloned into a new
    /// one (close-on-exec).
    pub netns: Option<i32>,
}

/// `execve` arguments as NULL-terminated pointer arrays into the plan's
/// `CString`s; built before `clone` so the child allocates nothing. The
/// fields are private, so the pointers always point into a live plan.
pub struct PreparedExec<'a> {
    path: &'a CStr,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl<'a> PreparedExec<'a> {
    /// Borrows the plan's exec arguments.
    pub fn new(plan: &'a SandboxPlan) -> PreparedExec<'a> {
        let ptrs = |v: &'a [std::ffi::CString]| {
            let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
            p.push(std::ptr::null());
            p
        };
        PreparedExec {
            path: &plan.exec.path,
            argv: ptrs(&plan.exec.argv),
            envp: ptrs(&plan.exec.env),
        }
    }

    /// The builder's path.
    pub fn path(&self) -> &CStr {
        self.path
    }

    /// The number of arguments (`argv[0]` included).
    pub fn argc(&self) -> usize {
        self.argv.len() - 1
    }

    /// The number of environment entries.
    pub fn envc(&self) -> usize {
        self.envp.len() - 1
    }

    /// The NULL-terminated argv array.
    pub(crate) fn argv_ptr(&self) -> *const *const libc::c_char {
        self.argv.as_ptr()
    }

    /// The NULL-terminated envp array.
    pub(crate) fn envp_ptr(&self) -> *const *const libc::c_char {
        self.envp.as_ptr()
    }
}

/// Tolerates `EEXIST`: mount points under `/proc` exist already.
fn exist_ok(r: Result<(), Errno>) -> Result<(), Errno> {
    match r {
        Err(Errno(libc::EEXIST)) => Ok(()),
        r => r,
    }
}

fn bind(
    sys: &mut dyn Syscall,
    source: &CStr,
    target: &CStr,
    flags: MountFlags,
    optional: bool,
) -> Result<(), Errno> {
    let kind = match sys.lstat_kind(source) {
        Ok(k) => k,
        Err(Errno(libc::ENOENT)) if optional => return Ok(()),
        Err(e) => return Err(e),
    };
    match kind {
        FileKind::Symlink => {
            // Binding would follow the link (to anywhere on the host): copy it.
            let mut buf = [0u8; 4097];
            let n = sys.readlink(source, &mut buf[..4096])?;
            let contents =
                CStr::from_bytes_with_nul(&buf[..=n]).map_err(|_| Errno(libc::EINVAL))?;
            return sys.symlink(contents, target);
        }
        FileKind::Directory => exist_ok(sys.mkdir(target, 0o755))?,
        FileKind::Other => exist_ok(sys.create_file(target, 0o444))?,
    }
    sys.mount(Some(source), target, None, libc::MS_BIND, None)?;
    // Flags of a bind mount only change through a remount.
    sys.mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags.bits(),
        None,
    )
}

/// Runs one setup step.
pub fn apply(
    op: &SetupOp,
    sys: &mut dyn Syscall,
    fds: ChildFds,
    exec: &PreparedExec<'_>,
) -> Result<(), Errno> {
    match op {
        SetupOp::DieWithParent => sys.die_with_parent(),
        SetupOp::NewSession => sys.setsid(),
        SetupOp::Stdio => sys.redirect_stdio(fds.log),
        SetupOp::Terminal => sys.attach_terminal(fds.log),
        SetupOp::LoopbackUp => match fds.netns {
            // Its loopback is up already.
            Some(fd) => sys.join_network(fd),
            None => sys.loopback_up(),
        },
        SetupOp::Hostname(h) => sys.sethostname(h),
        SetupOp::Domainname(d) => sys.setdomainname(d),
        SetupOp::MakeMountsPrivate => {
            sys.mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        }
        SetupOp::MountTmpfs {
            target,
            data,
            flags,
        } => sys.mount(
            Some(c"tmpfs"),
            target,
            Some(c"tmpfs"),
            flags.bits(),
            Some(data),
        ),
        SetupOp::Mkdir { path, mode } => sys.mkdir(path, *mode),
        SetupOp::Bind {
            source,
            target,
            flags,
            optional,
        } => bind(sys, source, target, *flags, *optional),
        SetupOp::MountProc { target } => sys.mount(
            Some(c"proc"),
            target,
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        SetupOp::MountDevpts { target } => sys.mount(
            Some(c"devpts"),
            target,
            Some(c"devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"newinstance,ptmxmode=0666,mode=0620"),
        ),
        SetupOp::Symlink { contents, link } => sys.symlink(contents, link),
        SetupOp::WriteFile {
            path,
            contents,
            mode,
            owner,
        } => sys.write_file(path, contents, *mode, *owner),
        SetupOp::Chmod { path, mode } => sys.chmod(path, *mode),
        SetupOp::PivotRoot { new_root } => {
            // pivot_root(".", ".") stacks the old root on the new one; the
            // detach then removes it (pivot_root(2), as bubblewrap and youki).
            // Mounts are private already, so the detach does not propagate.
            sys.chdir(new_root)?;
            sys.pivot_root(c".", c".")?;
            sys.umount2(c".", libc::MNT_DETACH)?;
            sys.chdir(c"/")
        }
        SetupOp::RemountRootReadOnly => sys.mount(
            None,
            c"/",
            None,
            libc::MS_BIND | libc::MS_REMOUNT | MountFlags::INPUT.bits(),
            None,
        ),
        SetupOp::Chdir(p) => sys.chdir(p),
        SetupOp::CloseFds => sys.cloexec_from(3),
        SetupOp::NoCoreDumps => sys.no_core_dumps(),
        SetupOp::ProcessLimit(n) => sys.set_process_limit(*n),
        SetupOp::Umask(m) => {
            sys.umask(*m);
            Ok(())
        }
        SetupOp::NoAddressRandomization => sys.no_address_randomization(),
        SetupOp::OomSacrifice => sys.oom_sacrifice(),
        SetupOp::DropBoundingSet => sys.drop_bounding_set(),
        SetupOp::ClearAmbientCaps => sys.clear_ambient_caps(),
        SetupOp::SetGroups(g) => sys.setgroups(g),
        SetupOp::SetGid(g) => sys.setresgid(*g),
        SetupOp::SetUid(u) => sys.setresuid(*u),
        SetupOp::ClearCaps => sys.clear_caps(),
        SetupOp::NewSessionKeyring => match sys.join_session_keyring() {
            // A kernel without CONFIG_KEYS: no keyring to share.
            Err(Errno(libc::ENOSYS)) => Ok(()),
            r => r,
        },
        SetupOp::NoNewPrivs => sys.no_new_privs(),
        SetupOp::Seccomp(program) => sys.seccomp_filter(program),
        SetupOp::ResetSignals => sys.reset_signals(),
        SetupOp::Exec => match sys.execve(exec) {
            Errno(0) => Ok(()),
            e => Err(e),
        },
    }
}

/// Runs the steps in order and stops at the first failure, returning its
/// index and errno. With the real syscalls a successful run never returns
/// (the last step execs).
pub fn run_steps(
    ops: &[SetupOp],
    sys: &mut dyn Syscall,
    fds: ChildFds,
    exec: &PreparedExec<'_>,
) -> Result<(), (usize, Errno)> {
    for (i, op) in ops.iter().enumerate() {
        apply(op, sys, fds, exec).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// The child's side: run the steps; on failure report `(step, errno)` on the
/// error pipe. Returns the exit code (only reached on failure).
pub fn child_main(
    ops: &[SetupOp],
    sys: &mut dyn Syscall,
    fds: ChildFds,
    exec: &PreparedExec<'_>,
) -> i32 {
    let (step, errno) = match run_steps(ops, sys, fds, exec) {
        Ok(()) => (ops.len(), Errno(libc::ENOEXEC)),
        Err(f) => f,
    };
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(step as u32).to_le_bytes());
    msg[4..].copy_from_slice(&errno.0.to_le_bytes());
    // Nothing more can be done if the report fails; the parent then sees a
    // short message or EOF plus a non-zero exit status.
    let _ = sys.write_all(fds.error, &msg);
    127
}

pub(super) fn spawn_error(action: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |e| SandboxError::Spawn {
        action,
        source: std::io::Error::from(e),
    }
}

/// Runs a planned build: clones the sandboxed child, waits for its setup to
/// finish, streams its output to `log` and enforces the plan's time limits.
/// Processes of the build user outside the PID namespace are the caller's
/// business (see [`super::users::UserLease::kill_processes`]).
pub fn run(plan: &SandboxPlan, log: &mut dyn Write) -> Result<BuildOutcome, SandboxError> {
    run_measured(plan, log).map(|(outcome, _)| outcome)
}

/// [`run`], with what the builder used as `wait4` reports it when it
/// exited by itself: its CPU time and largest process's peak resident
/// size, each covering the descendants it reaped.
pub fn run_measured(
    plan: &SandboxPlan,
    log: &mut dyn Write,
) -> Result<(BuildOutcome, Option<super::ResourceUsage>), SandboxError> {
    let exec = PreparedExec::new(plan);
    let (log_r, log_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(spawn_error("create the log pipe"))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(spawn_error("create the error pipe"))?;
    let netns = if plan.new_network {
        super::netns::take()
    } else {
        None
    };
    let fds = ChildFds {
        log: log_w.as_raw_fd(),
        error: err_w.as_raw_fd(),
        netns: netns.as_ref().map(|fd| fd.as_raw_fd()),
    };
    let ops = plan.ops.as_slice();
    let mut child = || child_main(ops, &mut LinuxSyscalls, fds, &exec);
    let started = Instant::now();
    let pid = clone_into_cgroup(plan, fds.netns.is_some(), &mut child)?;
    // The child joined it or failed (it has exec'd or exited, or holds a
    // copy of our descriptors): ours only kept it alive until then.
    drop(netns);
    // Held, so that the sandbox's mounts are taken down on another thread
    // after the builder is reaped rather than in its exit (see
    // `super::netns`). The child has exec'd, or failed and exited (then
    // there is nothing to hold).
    let mount_ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(OwnedFd::from);
    let pid = Pid::from_raw(pid);
    // From here until the child is waited for, a panic (a bug, or a log
    // sink that panics) must not leave the builder running unsupervised:
    // the guard kills it while unwinding.
    let guard = KillOnDrop::new(pid);
    drop(log_w);
    drop(err_w);
    tracing::debug!(pid = pid.as_raw(), "sandboxed child started");
    let result = supervise(pid, err_r, log_r, plan, started, log);
    // Every return of `supervise` has waited for the child: its pid may be
    // reused now, so it must not be signalled again.
    guard.disarm();
    if let Some(ns) = mount_ns {
        super::netns::release_later(ns);
    }
    result
}

/// Clones the plan's child (running `child`) into its namespaces and, if
/// the plan has one, its cgroup v2 directory. With `joins_netns` (the child
/// joins a network namespace made ahead, [`ChildFds::netns`]) no new one is
/// cloned for it. A kernel without `clone3`
/// (before 5.3) or `CLONE_INTO_CGROUP` (before 5.7) gets the child outside
/// the cgroup, as on a machine without cgroup2: never a failed build.
pub(super) fn clone_into_cgroup(
    plan: &SandboxPlan,
    joins_netns: bool,
    child: &mut dyn FnMut() -> i32,
) -> Result<libc::pid_t, SandboxError> {
    let spawn = |e: Errno| SandboxError::Spawn {
        action: "clone the sandboxed child",
        source: e.to_io(),
    };
    let dir = plan.cgroup.as_ref().and_then(|d| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(d)
            .inspect_err(
                |e| tracing::debug!(cgroup = %d.display(), "cannot open the build's cgroup: {e}"),
            )
            .ok()
    });
    let mut flags = namespaces(plan);
    if joins_netns {
        flags &= !libc::CLONE_NEWNET;
    }
    match clone_child(flags, dir.as_ref().map(|d| d.as_fd()), child) {
        Err(Errno(e)) if dir.is_some() && matches!(e, libc::ENOSYS | libc::E2BIG) => {
            tracing::debug!("no clone3 into a cgroup here: the build runs outside its cgroup");
            clone_child(flags, None, child).map_err(spawn)
        }
        r => r.map_err(spawn),
    }
}

/// The namespaces a plan's child is cloned into: mount, PID, IPC, UTS, and
/// network unless the plan shares the host's.
pub(super) fn namespaces(plan: &SandboxPlan) -> libc::c_int {
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if plan.new_network {
        flags |= libc::CLONE_NEWNET;
    }
    flags
}

/// Kills and reaps a child when dropped armed: when the thread supervising
/// it unwinds from a panic before it was waited for.
#[derive(Debug)]
pub struct KillOnDrop {
    pid: Option<Pid>,
}

impl KillOnDrop {
    /// Arms the guard for `pid` (a child of this process not yet waited for).
    pub fn new(pid: Pid) -> KillOnDrop {
        KillOnDrop { pid: Some(pid) }
    }

    /// Supervision ended normally and the child was waited for.
    pub fn disarm(mut self) {
        self.pid = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            tracing::error!(
                pid = pid.as_raw(),
                "build supervision ended abnormally: killing the builder"
            );
            reap(pid);
        }
    }
}

/// The parent's side once the child runs: its setup result, then its log
/// and time limits. Returns only after the child was waited for.
fn supervise(
    pid: Pid,
    err_r: OwnedFd,
    log_r: OwnedFd,
    plan: &SandboxPlan,
    started: Instant,
    log: &mut dyn Write,
) -> Result<(BuildOutcome, Option<super::ResourceUsage>), SandboxError> {
    let total = plan
        .timeouts
        .total
        .and_then(|d| deadline(started, d).map(|at| (at, d)));
    let setup = read_setup_result(err_r, total).inspect_err(|_| reap(pid))?;
    match setup {
        Setup::Execd => {}
        Setup::Failed(step, errno) => {
            reap(pid);
            let op = plan
                .ops
                .get(step)
                .map_or_else(|| "exec".to_owned(), |op| op.to_string());
            return Err(SandboxError::SetupFailed {
                step,
                op,
                source: errno.to_io(),
            });
        }
        Setup::TimedOut(after) => return Ok((time_out(pid, TimeoutKind::Total, after), None)),
    }
    tracing::debug!(elapsed = ?started.elapsed(), "builder exec'd");
    stream(pid, log_r, plan, started, log)
}

/// How the child's setup ended.
pub(super) enum Setup {
    /// The builder was exec'd (the error pipe closed without a message).
    Execd,
    /// A step failed: its index and errno.
    Failed(usize, Errno),
    /// The total time limit passed during setup (e.g. a hung mount source).
    TimedOut(Duration),
}

/// Reads the error pipe until EOF or a message, within the total time limit.
pub(super) fn read_setup_result(
    err_r: OwnedFd,
    deadline: Option<(Instant, Duration)>,
) -> Result<Setup, SandboxError> {
    let read_err = |source| SandboxError::Spawn {
        action: "read the setup result",
        source,
    };
    let mut file = std::fs::File::from(err_r);
    let mut msg = [0u8; 8];
    let mut got = 0;
    while got < msg.len() {
        if let Some((at, after)) = deadline {
            let now = Instant::now();
            if at <= now {
                return Ok(Setup::TimedOut(after));
            }
            let ms = (at - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut [PollFd::new(file.as_fd(), PollFlags::POLLIN)], timeout) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(read_err(e.into())),
            }
        }
        match file.read(&mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    match got {
        0 => Ok(Setup::Execd),
        8 => {
            let step = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
            let errno = i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
            Ok(Setup::Failed(step, Errno(errno)))
        }
        n => Err(read_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{n} of 8 bytes"),
        ))),
    }
}

/// Kills (the PID namespace dies with its PID 1) and waits.
pub(super) fn reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, None);
}

fn stream(
    pid: Pid,
    log_r: OwnedFd,
    plan: &SandboxPlan,
    started: Instant,
    log: &mut dyn Write,
) -> Result<(BuildOutcome, Option<super::ResourceUsage>), SandboxError> {
    let limits = plan.timeouts;
    let mut last_output = started;
    let mut buf = vec![0u8; 64 * 1024];
    let mut file = std::fs::File::from(log_r);
    loop {
        let now = Instant::now();
        let deadline = next_deadline(limits, started, last_output);
        if let Some((at, kind, after)) = deadline {
            if at <= now {
                return Ok((time_out(pid, kind, after), None));
            }
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some((at, _, _)) => {
                let ms = at
                    .saturating_duration_since(now)
                    .as_millis()
                    .clamp(1, i32::MAX as u128);
                PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut pfd = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut pfd, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                reap(pid);
                return Err(spawn_error("poll the log pipe")(e));
            }
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                last_output = Instant::now();
                if let Err(e) = log.write_all(&buf[..n]) {
                    reap(pid);
                    return Err(SandboxError::Log { source: e });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                reap(pid);
                return Err(SandboxError::Spawn {
                    action: "read the log pipe",
                    source: e,
                });
            }
        }
    }
    // EOF: every writer is gone. Normally the builder (PID 1) has exited or
    // is about to; but a builder may close its output and keep running, so
    // the limits still apply while waiting (polling with backoff: the
    // common case finishes within the first few milliseconds).
    let _ = log.flush();
    let deadline = next_deadline(limits, started, last_output);
    let mut nap = Duration::from_micros(200);
    loop {
        match wait4(pid.as_raw(), deadline.is_some()) {
            Ok(Some(r)) if libc::WIFEXITED(r.status) || libc::WIFSIGNALED(r.status) => {
                let outcome = if libc::WIFEXITED(r.status) {
                    BuildOutcome::Exited(libc::WEXITSTATUS(r.status))
                } else {
                    BuildOutcome::Signaled(libc::WTERMSIG(r.status))
                };
                let usage = super::ResourceUsage {
                    cpu: Some(r.cpu),
                    peak_memory: Some(r.max_rss),
                };
                return Ok((outcome, Some(usage)));
            }
            Ok(_) | Err(Errno(libc::EINTR)) => {}
            Err(e) => {
                return Err(SandboxError::Spawn {
                    action: "wait for the builder",
                    source: e.to_io(),
                })
            }
        }
        if let Some((at, kind, after)) = deadline {
            let now = Instant::now();
            if at <= now {
                return Ok((time_out(pid, kind, after), None));
            }
            std::thread::sleep(nap.min(at - now));
            nap = (nap * 2).min(Duration::from_millis(50));
        }
    }
}

/// `from + limit`, or `None` (no deadline) when that is past what an
/// [`Instant`] can hold: a limit of `u64::MAX` seconds, which serve clients
/// and daemons send to mean "forever", saturates to no limit instead of
/// panicking.
pub fn deadline(from: Instant, limit: Duration) -> Option<Instant> {
    from.checked_add(limit)
}

/// The earliest limit still to come: the total timeout, or silence since
/// the last output.
fn next_deadline(
    limits: super::plan::Timeouts,
    started: Instant,
    last_output: Instant,
) -> Option<(Instant, TimeoutKind, Duration)> {
    let total = limits
        .total
        .and_then(|d| Some((deadline(started, d)?, TimeoutKind::Total, d)));
    let silent = limits
        .max_silent
        .and_then(|d| Some((deadline(last_output, d)?, TimeoutKind::Silent, d)));
    match (total, silent) {
        (Some(t), Some(s)) => Some(if s.0 < t.0 { s } else { t }),
        (t, s) => t.or(s),
    }
}

/// Kills the whole build (its PID namespace) for a time limit.
fn time_out(pid: Pid, kind: TimeoutKind, after: Duration) -> BuildOutcome {
    tracing::info!(
        pid = pid.as_raw(),
        limit = kind_name(kind),
        "killing the build: time limit hit"
    );
    reap(pid);
    BuildOutcome::TimedOut { kind, after }
}

fn kind_name(kind: TimeoutKind) -> &'static str {
    match kind {
        TimeoutKind::Silent => "max-silent-time",
        TimeoutKind::Total => "timeout",
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::path::PathBuf;

    use super::super::plan::{self, SandboxDirs};
    use super::super::recording::{Call, RecordingSyscalls};
    use super::*;

    fn s(x: &str) -> CString {
        CString::new(x).expect("no NUL")
    }

    fn test_plan() -> SandboxPlan {
        let store_dir = crate::store::StoreDir::default();
        let bb =
            crate::store::StorePath::from_base_name("7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox")
                .expect("valid");
        let spec = plan::SandboxSpec {
            store_dir,
            builder: b"/nix/store/7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox/bin/busybox".to_vec(),
            args: vec![b"true".to_vec()],
            env: Default::default(),
            inputs: vec![plan::InputPath {
                source: PathBuf::from("/s/bb"),
                path: bb,
            }],
            outputs: vec![],
            dirs: SandboxDirs {
                root: PathBuf::from("/w/root"),
                build: PathBuf::from("/w/top/build"),
                store: PathBuf::from("/w/store"),
            },
            build_dir_name: plan::DEFAULT_BUILD_DIR_NAME.to_owned(),
            user: plan::BuildUser::new(30001, 30000, "b1", "b").expect("valid"),
            fixed_output: false,
            impure_env: Default::default(),
            impure_env_allow: Vec::new(),
            limits: Default::default(),
            cores: 1,
            timeouts: Default::default(),
        };
        plan::plan(&spec).expect("plan")
    }

    const FDS: ChildFds = ChildFds {
        log: 7,
        error: 9,
        netns: None,
    };

    #[test]
    fn full_sequence_runs_every_step_and_ends_in_execve() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let mut sys = RecordingSyscalls::default();
        assert_eq!(run_steps(&p.ops, &mut sys, FDS, &exec), Ok(()));
        assert_eq!(sys.calls.first(), Some(&Call::DieWithParent));
        assert_eq!(
            sys.calls.last(),
            Some(&Call::Execve {
                path: s("/nix/store/7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox/bin/busybox"),
                argc: 2,
                envc: p.env.len()
            })
        );
        assert!(sys.calls.contains(&Call::RedirectStdio(7)));
        assert!(sys.calls.contains(&Call::CloexecFrom(3)));
        // Mounts made private before anything is mounted.
        let first_mount = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::Mount { .. }))
            .expect("mounts");
        assert_eq!(
            sys.calls[first_mount],
            Call::Mount {
                source: None,
                target: s("/"),
                fstype: None,
                flags: libc::MS_REC | libc::MS_PRIVATE,
                data: None
            }
        );
    }

    #[test]
    fn a_cgroup_is_where_the_child_is_cloned_not_a_step() {
        let mut p = test_plan();
        let before = p.ops.clone();
        p.cgroup = Some(PathBuf::from("/sys/fs/cgroup/unified/sandoff-build-uid-1"));
        assert_eq!(p.ops, before, "no process is moved by a step");
    }

    #[test]
    fn input_is_bound_then_remounted_read_only() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let mut sys = RecordingSyscalls::default();
        run_steps(&p.ops, &mut sys, FDS, &exec).expect("runs");
        let t = s("/w/root/nix/store/7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox");
        let i = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::Mount { target, flags, .. } if *target == t && *flags == libc::MS_BIND))
            .expect("bind");
        assert_eq!(
            sys.calls[i + 1],
            Call::Mount {
                source: None,
                target: t,
                fstype: None,
                flags: libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                data: None
            }
        );
    }

    #[test]
    fn pivot_root_detaches_the_old_root() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let mut sys = RecordingSyscalls::default();
        run_steps(&p.ops, &mut sys, FDS, &exec).expect("runs");
        let i = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::PivotRoot { .. }))
            .expect("pivot");
        assert_eq!(sys.calls[i - 1], Call::Chdir(s("/w/root")));
        assert_eq!(
            sys.calls[i],
            Call::PivotRoot {
                new_root: s("."),
                put_old: s(".")
            }
        );
        assert_eq!(
            sys.calls[i + 1],
            Call::Umount2 {
                target: s("."),
                flags: libc::MNT_DETACH
            }
        );
        assert_eq!(sys.calls[i + 2], Call::Chdir(s("/")));
    }

    #[test]
    fn symlink_inputs_are_copied_not_bound() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let mut sys = RecordingSyscalls {
            kinds: vec![(s("/s/bb"), FileKind::Symlink)],
            link_target: b"/etc/shadow".to_vec(),
            ..Default::default()
        };
        run_steps(&p.ops, &mut sys, FDS, &exec).expect("runs");
        let t = s("/w/root/nix/store/7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox");
        assert!(sys.calls.contains(&Call::Symlink {
            contents: s("/etc/shadow"),
            link: t.clone()
        }));
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::Mount { target, .. } if *target == t)));
    }

    #[test]
    fn missing_optional_source_is_skipped_missing_required_fails() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let mut sys = RecordingSyscalls {
            missing: vec![s("/w/root/proc/bus")],
            ..Default::default()
        };
        assert_eq!(run_steps(&p.ops, &mut sys, FDS, &exec), Ok(()));

        let mut sys = RecordingSyscalls {
            missing: vec![s("/s/bb")],
            ..Default::default()
        };
        let (step, errno) = run_steps(&p.ops, &mut sys, FDS, &exec).expect_err("fails");
        assert_eq!(errno, Errno(libc::ENOENT));
        assert!(matches!(&p.ops[step], SetupOp::Bind { source, .. } if *source == s("/s/bb")));
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Execve { .. })));
    }

    #[test]
    fn failure_at_any_call_stops_before_exec_and_reports_the_step() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let total = {
            let mut sys = RecordingSyscalls::default();
            run_steps(&p.ops, &mut sys, FDS, &exec).expect("runs");
            sys.calls.len()
        };
        for at in 0..total {
            let mut sys = RecordingSyscalls {
                fail_at: Some((at, Errno(libc::EPERM))),
                ..Default::default()
            };
            let code = child_main(&p.ops, &mut sys, FDS, &exec);
            if matches!(sys.calls[at], Call::Umask(_)) {
                continue; // umask cannot fail
            }
            assert_eq!(code, 127);
            let report = sys.calls.last().expect("report");
            let Call::Write(9, msg) = report else {
                panic!("no report after failing call {at}: {report:?}")
            };
            assert_eq!(
                i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]),
                libc::EPERM
            );
            let execs = sys
                .calls
                .iter()
                .filter(|c| matches!(c, Call::Execve { .. }))
                .count();
            assert_eq!(
                execs,
                usize::from(at + 1 == total),
                "exec after failing call {at}"
            );
        }
    }

    #[test]
    fn a_kernel_without_keyrings_is_no_failure_other_keyring_errors_are() {
        let p = test_plan();
        let exec = PreparedExec::new(&p);
        let at = {
            let mut sys = RecordingSyscalls::default();
            run_steps(&p.ops, &mut sys, FDS, &exec).expect("runs");
            sys.calls
                .iter()
                .position(|c| *c == Call::JoinSessionKeyring)
                .expect("joins a session keyring")
        };
        let mut sys = RecordingSyscalls {
            fail_at: Some((at, Errno(libc::ENOSYS))),
            ..Default::default()
        };
        assert_eq!(run_steps(&p.ops, &mut sys, FDS, &exec), Ok(()));
        let mut sys = RecordingSyscalls {
            fail_at: Some((at, Errno(libc::EDQUOT))),
            ..Default::default()
        };
        let (step, errno) = run_steps(&p.ops, &mut sys, FDS, &exec).expect_err("fails closed");
        assert_eq!(
            (&p.ops[step], errno),
            (&SetupOp::NewSessionKeyring, Errno(libc::EDQUOT))
        );
    }

    #[test]
    fn setup_result_protocol() {
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        // EOF without a message: exec'd.
        let (r, w) = pipe();
        drop(w);
        assert!(matches!(read_setup_result(r, None), Ok(Setup::Execd)));
        // A message: the step and errno.
        let (r, w) = pipe();
        let mut msg = 7u32.to_le_bytes().to_vec();
        msg.extend_from_slice(&libc::ENOENT.to_le_bytes());
        nix::unistd::write(&w, &msg).expect("write");
        drop(w);
        assert!(matches!(
            read_setup_result(r, None),
            Ok(Setup::Failed(7, Errno(libc::ENOENT)))
        ));
        // A torn message is an error, not a success.
        let (r, w) = pipe();
        nix::unistd::write(&w, &msg[..3]).expect("write");
        drop(w);
        assert!(read_setup_result(r, None).is_err());
        // A setup that hangs past the total limit times out.
        let (r, _w) = pipe();
        let after = Duration::from_millis(50);
        let got = read_setup_result(r, Some((Instant::now() + after, after)));
        assert!(matches!(got, Ok(Setup::TimedOut(d)) if d == after));
    }

    #[test]
    fn huge_limits_mean_no_deadline_instead_of_a_panic() {
        let forever = Duration::from_secs(u64::MAX);
        let now = Instant::now();
        assert_eq!(deadline(now, forever), None);
        let limits = super::super::plan::Timeouts {
            max_silent: Some(forever),
            total: Some(forever),
        };
        assert_eq!(next_deadline(limits, now, now), None);
        // A representable limit next to a huge one still applies.
        let limits = super::super::plan::Timeouts {
            max_silent: Some(forever),
            total: Some(Duration::from_secs(5)),
        };
        let (at, kind, after) = next_deadline(limits, now, now).expect("the total limit");
        assert_eq!((at, kind, after), (now + after, TimeoutKind::Total, after));
    }

    #[test]
    fn a_panicking_supervisor_kills_its_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        // The panic is injected by the supervising code itself (a test
        // stands in for a bug): the guard is armed, as in `run`.
        let unwound = std::panic::catch_unwind(|| {
            let _guard = KillOnDrop::new(pid);
            panic!("injected supervisor panic");
        });
        assert!(unwound.is_err());
        // The guard killed and reaped it: the child is gone and its status
        // was collected (waiting again finds no child).
        assert_eq!(kill(pid, None), Err(nix::Error::ESRCH));
        assert!(child.try_wait().is_err(), "already reaped by the guard");

        // Disarmed, it leaves the child alone.
        let mut other = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        KillOnDrop::new(Pid::from_raw(other.id() as i32)).disarm();
        assert_eq!(other.try_wait().expect("wait"), None);
        other.kill().expect("kill");
        other.wait().expect("reap");
    }

    #[test]
    fn outcome_messages() {
        assert_eq!(
            BuildOutcome::TimedOut {
                kind: TimeoutKind::Silent,
                after: Duration::from_secs(3)
            }
            .to_string(),
            "timed out after 3 seconds of silence"
        );
        assert_eq!(
            BuildOutcome::TimedOut {
                kind: TimeoutKind::Total,
                after: Duration::from_secs(9)
            }
            .to_string(),
            "timed out after 9 seconds"
        );
        assert!(BuildOutcome::Exited(0).success());
        assert!(!BuildOutcome::Signaled(9).success());
    }
}
