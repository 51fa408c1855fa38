//! The system calls sandbox setup needs, behind one trait (youki's design), so
//! the sequence the child performs can be recorded and checked in unit tests.
//!
//! The real implementation is `linux::LinuxSyscalls` (private); the
//! recording fake, `recording::RecordingSyscalls`, is compiled for unit tests
//! only, so no build of sandoff can run a sandbox on it. Callers pass one
//! explicitly; nothing picks the fake by `cfg!(test)`.
//!
//! Every method may run in a freshly cloned child of a multi-threaded
//! process, so implementations used there must be async-signal-safe: no
//! allocation, no locks, no logging. Arguments are borrowed, pre-built data.

use std::ffi::CStr;
use std::fmt;

use super::exec::PreparedExec;
use super::seccomp::SockFilter;

/// An `errno` value, the only error the child can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The error as an `io::Error` (for messages, in the parent).
    pub fn to_io(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_io())
    }
}

/// The kind of a file, as far as mount-point creation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A directory: mounted on a directory.
    Directory,
    /// A symbolic link: copied, never followed.
    Symlink,
    /// Anything else (regular file, device): mounted on an empty file.
    Other,
}

/// The syscalls of sandbox setup. Paths are C strings built before `clone`.
pub trait Syscall {
    /// `mount(2)`.
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), Errno>;
    /// `umount2(2)`.
    fn umount2(&mut self, target: &CStr, flags: i32) -> Result<(), Errno>;
    /// `pivot_root(2)`.
    fn pivot_root(&mut self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno>;
    /// `chdir(2)`.
    fn chdir(&mut self, path: &CStr) -> Result<(), Errno>;
    /// `mkdir(2)`; the mode is applied exactly (umask is bypassed by a `chmod`).
    fn mkdir(&mut self, path: &CStr, mode: u32) -> Result<(), Errno>;
    /// Creates an empty file (`O_CREAT|O_EXCL|O_NOFOLLOW`), for a mount point.
    fn create_file(&mut self, path: &CStr, mode: u32) -> Result<(), Errno>;
    /// Creates `path` with `contents` and `mode` exactly, optionally `fchown`ed.
    fn write_file(
        &mut self,
        path: &CStr,
        contents: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), Errno>;
    /// `lstat(2)`, reduced to a [`FileKind`].
    fn lstat_kind(&mut self, path: &CStr) -> Result<FileKind, Errno>;
    /// `readlink(2)` into `buf`; returns the length (not NUL-terminated).
    fn readlink(&mut self, path: &CStr, buf: &mut [u8]) -> Result<usize, Errno>;
    /// `symlink(2)`.
    fn symlink(&mut self, contents: &CStr, link: &CStr) -> Result<(), Errno>;
    /// `chmod(2)`.
    fn chmod(&mut self, path: &CStr, mode: u32) -> Result<(), Errno>;
    /// `sethostname(2)`.
    fn sethostname(&mut self, name: &CStr) -> Result<(), Errno>;
    /// `setdomainname(2)`.
    fn setdomainname(&mut self, name: &CStr) -> Result<(), Errno>;
    /// Sets `IFF_UP|IFF_LOOPBACK|IFF_RUNNING` on `lo` (the kernel then assigns 127.0.0.1 and ::1).
    fn loopback_up(&mut self) -> Result<(), Errno>;
    /// `setns(fd, CLONE_NEWNET)`: joins the network namespace `fd` is open on.
    fn join_network(&mut self, fd: i32) -> Result<(), Errno>;
    /// `setsid(2)`.
    fn setsid(&mut self) -> Result<(), Errno>;
    /// stdin from `/dev/null`, stdout and stderr onto `log_fd`.
    fn redirect_stdio(&mut self, log_fd: i32) -> Result<(), Errno>;
    /// stdin, stdout and stderr onto the terminal `tty_fd`, then
    /// `ioctl(0, TIOCSCTTY, 0)`: it becomes the controlling terminal of the
    /// session this process leads (never stolen from another session).
    fn attach_terminal(&mut self, tty_fd: i32) -> Result<(), Errno>;
    /// Marks every fd from 3 up close-on-exec.
    fn cloexec_from(&mut self, first: u32) -> Result<(), Errno>;
    /// `setrlimit(RLIMIT_CORE, 0)`.
    fn no_core_dumps(&mut self) -> Result<(), Errno>;
    /// `setrlimit(RLIMIT_NPROC, n)` (soft and hard).
    fn set_process_limit(&mut self, n: u64) -> Result<(), Errno>;
    /// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: a new anonymous session keyring.
    fn join_session_keyring(&mut self) -> Result<(), Errno>;
    /// `umask(2)`.
    fn umask(&mut self, mask: u32);
    /// `personality(ADDR_NO_RANDOMIZE)`.
    fn no_address_randomization(&mut self) -> Result<(), Errno>;
    /// Writes 1000 to `/proc/self/oom_score_adj`.
    fn oom_sacrifice(&mut self) -> Result<(), Errno>;
    /// `PR_CAPBSET_DROP` of every capability the kernel knows.
    fn drop_bounding_set(&mut self) -> Result<(), Errno>;
    /// `PR_CAP_AMBIENT_CLEAR_ALL`.
    fn clear_ambient_caps(&mut self) -> Result<(), Errno>;
    /// `capset` with all sets empty.
    fn clear_caps(&mut self) -> Result<(), Errno>;
    /// `setgroups(2)`.
    fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno>;
    /// `setresgid(gid, gid, gid)`, then checks that it took.
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno>;
    /// `setresuid(uid, uid, uid)`, then checks that it took.
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno>;
    /// `PR_SET_PDEATHSIG(SIGKILL)`.
    fn die_with_parent(&mut self) -> Result<(), Errno>;
    /// `PR_SET_NO_NEW_PRIVS`.
    fn no_new_privs(&mut self) -> Result<(), Errno>;
    /// Installs a seccomp BPF filter (`PR_SET_SECCOMP`).
    fn seccomp_filter(&mut self, program: &[SockFilter]) -> Result<(), Errno>;
    /// Empty signal mask, every handler back to `SIG_DFL`.
    fn reset_signals(&mut self) -> Result<(), Errno>;
    /// `execve(2)` of a prepared exec; returns only on failure.
    fn execve(&mut self, exec: &PreparedExec<'_>) -> Errno;
    /// `kill(-1, SIGKILL)`: every process the caller may signal.
    fn kill_all(&mut self) -> Result<(), Errno>;
    /// Writes all of `buf` to `fd` (the error report).
    fn write_all(&mut self, fd: i32, buf: &[u8]) -> Result<(), Errno>;
}
