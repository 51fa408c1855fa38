//! The real [`Syscall`] implementation and the one place sandoff forks.
//!
//! This is the only file of the crate with `unsafe`. Every function here may
//! run in the child between `clone` and `execve` of a multi-threaded process,
//! so they call libc directly on borrowed, pre-built data: no allocation, no
//! locks, no logging (async-signal-safe only).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use super::exec::PreparedExec;
use super::seccomp::SockFilter;
use super::syscall::{Errno, FileKind, Syscall};

fn errno() -> Errno {
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// `Ok` if a libc call returned anything but -1, else the errno.
fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret == -1 {
        Err(errno())
    } else {
        Ok(())
    }
}

// The credential syscalls taking 32-bit ids (the plain ones take 16-bit ids
// on i386 and arm).
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETRESGID: libc::c_long = libc::SYS_setresgid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETRESUID: libc::c_long = libc::SYS_setresuid32;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETRESGID: libc::c_long = libc::SYS_setresgid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETRESUID: libc::c_long = libc::SYS_setresuid;

fn check_long(ret: libc::c_long) -> Result<(), Errno> {
    if ret == -1 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn opt_ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(ptr::null(), CStr::as_ptr)
}

/// Closes `fd`, ignoring errors (the fd is ours and valid).
fn close(fd: libc::c_int) {
    // SAFETY: closing an fd this module opened and owns; no Rust object owns it.
    unsafe {
        libc::close(fd);
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two words.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The kernel's `struct sigaction` (x86-64, aarch64 and most others), for
/// `rt_sigaction` without glibc's filtering.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The real system calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxSyscalls;

impl Syscall for LinuxSyscalls {
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), Errno> {
        // SAFETY: all pointers are NUL-terminated C strings borrowed for the
        // call, or NULL where mount(2) allows it.
        check(unsafe {
            libc::mount(
                opt_ptr(source),
                target.as_ptr(),
                opt_ptr(fstype),
                flags,
                opt_ptr(data).cast(),
            )
        })
    }

    fn umount2(&mut self, target: &CStr, flags: i32) -> Result<(), Errno> {
        // SAFETY: `target` is a valid C string for the call.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })
    }

    fn pivot_root(&mut self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        // SAFETY: pivot_root takes two C strings, valid for the call.
        check_long(unsafe {
            libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr())
        })
    }

    fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: valid C string.
        check(unsafe { libc::chdir(path.as_ptr()) })
    }

    fn mkdir(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        // SAFETY: valid C string.
        check(unsafe { libc::mkdir(path.as_ptr(), mode) })?;
        // The umask must not weaken or strengthen what the plan asked for
        // (01777 on /tmp must keep its sticky bit and world write).
        self.chmod(path, mode)
    }

    fn create_file(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        let flags =
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid C string; the mode argument is required with O_CREAT.
        let fd = unsafe { libc::open(path.as_ptr(), flags, mode as libc::c_uint) };
        if fd == -1 {
            return Err(errno());
        }
        close(fd);
        Ok(())
    }

    fn write_file(
        &mut self,
        path: &CStr,
        contents: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), Errno> {
        let flags =
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid C string; the mode argument is required with O_CREAT.
        let fd = unsafe { libc::open(path.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd == -1 {
            return Err(errno());
        }
        let result = (|| {
            if let Some((uid, gid)) = owner {
                // SAFETY: fd is the file just created.
                check(unsafe { libc::fchown(fd, uid, gid) })?;
            }
            // SAFETY: fd is the file just created.
            check(unsafe { libc::fchmod(fd, mode) })?;
            self.write_all(fd, contents)
        })();
        close(fd);
        result
    }

    fn lstat_kind(&mut self, path: &CStr) -> Result<FileKind, Errno> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid C string; `st` is a writable stat buffer.
        check(unsafe { libc::lstat(path.as_ptr(), st.as_mut_ptr()) })?;
        // SAFETY: lstat succeeded, so it filled `st`.
        let mode = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
        Ok(match mode {
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        })
    }

    fn readlink(&mut self, path: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
        // SAFETY: valid C string; `buf` is writable for its length.
        let n = unsafe { libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        let n = n as usize;
        if n >= buf.len() {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        Ok(n)
    }

    fn symlink(&mut self, contents: &CStr, link: &CStr) -> Result<(), Errno> {
        // SAFETY: valid C strings.
        check(unsafe { libc::symlink(contents.as_ptr(), link.as_ptr()) })
    }

    fn chmod(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        // SAFETY: valid C string.
        check(unsafe { libc::chmod(path.as_ptr(), mode) })
    }

    fn sethostname(&mut self, name: &CStr) -> Result<(), Errno> {
        let b = name.to_bytes();
        // SAFETY: pointer and length describe `name`'s bytes.
        check(unsafe { libc::sethostname(b.as_ptr().cast(), b.len()) })
    }

    fn setdomainname(&mut self, name: &CStr) -> Result<(), Errno> {
        let b = name.to_bytes();
        // SAFETY: pointer and length describe `name`'s bytes.
        check(unsafe { libc::setdomainname(b.as_ptr().cast(), b.len()) })
    }

    fn loopback_up(&mut self) -> Result<(), Errno> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd == -1 {
            return Err(errno());
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads an ifreq, which `ifr` is.
        let r =
            check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr as *const libc::ifreq) });
        close(fd);
        r
    }

    fn join_network(&mut self, fd: i32) -> Result<(), Errno> {
        // SAFETY: integer arguments; a bad fd is an error, not UB.
        check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })
    }

    fn setsid(&mut self) -> Result<(), Errno> {
        // SAFETY: no arguments.
        check(unsafe { libc::setsid() })
    }

    fn redirect_stdio(&mut self, log_fd: i32) -> Result<(), Errno> {
        // SAFETY: a literal C string.
        let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if null == -1 {
            return Err(errno());
        }
        // SAFETY: both fds are open; dup2 clears close-on-exec on the target.
        let r = check(unsafe { libc::dup2(null, 0) });
        if null != 0 {
            close(null);
        }
        r?;
        // SAFETY: log_fd is the open write end of the log pipe.
        check(unsafe { libc::dup2(log_fd, 1) })?;
        // SAFETY: as above.
        check(unsafe { libc::dup2(log_fd, 2) })
    }

    fn attach_terminal(&mut self, tty_fd: i32) -> Result<(), Errno> {
        for target in 0..=2 {
            // SAFETY: tty_fd is the open terminal the parent passed; dup2
            // clears close-on-exec on the target.
            check(unsafe { libc::dup2(tty_fd, target) })?;
        }
        // SAFETY: TIOCSCTTY takes an integer; 0 means "do not steal a
        // terminal that is another session's controlling terminal".
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY as _, 0 as libc::c_int) })
    }

    fn cloexec_from(&mut self, first: u32) -> Result<(), Errno> {
        // SAFETY: close_range only changes fd flags.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            )
        })
    }

    fn no_core_dumps(&mut self) -> Result<(), Errno> {
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) })
    }

    fn set_process_limit(&mut self, n: u64) -> Result<(), Errno> {
        let lim = libc::rlimit {
            rlim_cur: n as libc::rlim_t,
            rlim_max: n as libc::rlim_t,
        };
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &lim) })
    }

    fn join_session_keyring(&mut self) -> Result<(), Errno> {
        // KEYCTL_JOIN_SESSION_KEYRING with a NULL name: a new anonymous
        // keyring, not one looked up by name.
        const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
        // SAFETY: keyctl takes an integer operation and a NULL name pointer,
        // which the kernel reads as "anonymous"; no memory is passed.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_JOIN_SESSION_KEYRING,
                ptr::null::<libc::c_char>(),
            )
        })
    }

    fn umask(&mut self, mask: u32) {
        // SAFETY: umask cannot fail.
        unsafe {
            libc::umask(mask);
        }
    }

    fn no_address_randomization(&mut self) -> Result<(), Errno> {
        // SAFETY: 0xffffffff queries the persona without changing it.
        let cur = unsafe { libc::personality(0xffff_ffff) };
        if cur == -1 {
            return Err(errno());
        }
        // SAFETY: sets the queried persona plus one flag.
        check(unsafe { libc::personality((cur | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong) })
    }

    fn oom_sacrifice(&mut self) -> Result<(), Errno> {
        // SAFETY: a literal C string.
        let fd = unsafe {
            libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd == -1 {
            return Err(errno());
        }
        let r = self.write_all(fd, b"1000");
        close(fd);
        r
    }

    fn drop_bounding_set(&mut self) -> Result<(), Errno> {
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r == -1 {
                let e = errno();
                // EINVAL past the kernel's last capability ends the list; at
                // capability 0 it means no bounding sets at all: fail closed.
                if e.0 == libc::EINVAL && cap > 0 {
                    return Ok(());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn clear_ambient_caps(&mut self) -> Result<(), Errno> {
        // SAFETY: plain prctl with integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        })
    }

    fn clear_caps(&mut self) -> Result<(), Errno> {
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capset reads a v3 header and two data words, which these are.
        check_long(unsafe {
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
        })
    }

    fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno> {
        // SAFETY: pointer and length describe `gids` (gid_t is u32).
        // Raw syscalls for credentials: glibc's wrappers broadcast the change
        // to every thread it knows of (`__nptl_setxid`), taking locks that
        // another thread of the parent may have held at clone time, so in
        // a cloned child of a multi-threaded process they can hang forever.
        check_long(unsafe { libc::syscall(SYS_SETGROUPS, gids.len(), gids.as_ptr()) })
    }

    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments.
        check_long(unsafe { libc::syscall(SYS_SETRESGID, gid, gid, gid) })?;
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: three writable gid_t.
        check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) })?;
        if (r, e, s) != (gid, gid, gid) {
            return Err(Errno(libc::EPERM));
        }
        Ok(())
    }

    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments.
        check_long(unsafe { libc::syscall(SYS_SETRESUID, uid, uid, uid) })?;
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: three writable uid_t.
        check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) })?;
        if (r, e, s) != (uid, uid, uid) {
            return Err(Errno(libc::EPERM));
        }
        Ok(())
    }

    fn die_with_parent(&mut self) -> Result<(), Errno> {
        // SAFETY: integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        })
    }

    fn no_new_privs(&mut self) -> Result<(), Errno> {
        // SAFETY: integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })
    }

    fn seccomp_filter(&mut self, program: &[SockFilter]) -> Result<(), Errno> {
        let len = u16::try_from(program.len()).map_err(|_| Errno(libc::EINVAL))?;
        let prog = libc::sock_fprog {
            len,
            filter: program.as_ptr().cast_mut().cast::<libc::sock_filter>(),
        };
        // SAFETY: SockFilter is #[repr(C)] with sock_filter's layout (u16,
        // u8, u8, u32); the kernel copies the program during the call and
        // never writes through the pointer.
        check(unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        })
    }

    fn reset_signals(&mut self) -> Result<(), Errno> {
        // Handlers first, the mask last: the child starts with every signal
        // blocked (see `clone_child`), and one that is pending must meet
        // the default action, never a handler of sandoff's.
        // The raw syscall, because glibc refuses to touch the signals it
        // reserves (32 and 33), and an ignored one would survive exec.
        let act = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: `act` is a valid kernel sigaction (SIG_DFL needs no
            // restorer); the old action is not requested; 8 is the kernel's
            // sigset size.
            check_long(unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &act as *const KernelSigaction,
                    ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            })?;
        }
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises `set`.
        check(unsafe { libc::sigemptyset(set.as_mut_ptr()) })?;
        // SAFETY: `set` was initialised by sigemptyset.
        check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), ptr::null_mut()) })
    }

    fn execve(&mut self, exec: &PreparedExec<'_>) -> Errno {
        // SAFETY: a PreparedExec can only be built from a SandboxPlan that it
        // borrows: its arrays are NULL-terminated and point to the plan's C
        // strings, which outlive `exec`.
        unsafe { libc::execve(exec.path().as_ptr(), exec.argv_ptr(), exec.envp_ptr()) };
        errno()
    }

    fn kill_all(&mut self) -> Result<(), Errno> {
        // SAFETY: integer arguments.
        check(unsafe { libc::kill(-1, libc::SIGKILL) })
    }

    fn write_all(&mut self, fd: i32, mut buf: &[u8]) -> Result<(), Errno> {
        while !buf.is_empty() {
            // SAFETY: pointer and length describe `buf`.
            let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = errno();
                if e.0 == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }
}

/// `unshare(CLONE_NEWNET)`: moves the calling thread (only it) into a new
/// network namespace.
pub(crate) fn unshare_network() -> Result<(), Errno> {
    // SAFETY: an integer argument; it changes only this thread's namespace.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })
}

/// What `wait4` reports of a reaped child: its status, and its CPU time and
/// peak resident size (each covering the descendants it reaped itself).
pub(crate) struct Reaped {
    pub(crate) status: libc::c_int,
    pub(crate) cpu: std::time::Duration,
    /// Bytes (the kernel counts KiB).
    pub(crate) max_rss: u64,
}

/// `wait4(pid, WNOHANG if nohang)`: `None` when `nohang` and the child is
/// still running.
pub(crate) fn wait4(pid: libc::pid_t, nohang: bool) -> Result<Option<Reaped>, Errno> {
    let mut status = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero
    // bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let options = if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: both pointers are to live, writable locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, options, &mut ru) };
    match r {
        -1 => Err(errno()),
        0 => Ok(None),
        _ => {
            let tv = |t: libc::timeval| {
                std::time::Duration::from_secs(t.tv_sec.max(0) as u64)
                    + std::time::Duration::from_micros(t.tv_usec.max(0) as u64)
            };
            Ok(Some(Reaped {
                status,
                cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                max_rss: (ru.ru_maxrss.max(0) as u64) * 1024,
            }))
        }
    }
}

/// `CLONE_INTO_CGROUP` (Linux 5.7): the child starts in the cgroup whose
/// directory `clone_args.cgroup` is open on.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The kernel's `struct clone_args` up to `cgroup` (its version 2 layout).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Starts a child in new namespaces (`clone_flags`: `CLONE_NEW*` bits) that
/// runs `child` and `_exit`s with its result. This is the only place sandoff
/// starts a process of its own. Returns the child's pid (in our PID
/// namespace) once the child has exec'd or exited. With `cgroup` (an open
/// cgroup v2 directory) the child starts in that cgroup (`clone3`).
///
/// On x86-64 the child shares this process's memory until it execs, as
/// `posix_spawn` and `vfork` do (`CLONE_VM | CLONE_VFORK`, on a stack of its
/// own), and the calling thread waits meanwhile: copying the page tables of
/// a large multi-threaded process, and the copy-on-write faults on both
/// sides afterwards, cost more than a whole sandbox setup. Elsewhere the
/// child runs on a copy of the process, as after `fork`.
///
/// `child` must be async-signal-safe (no allocation, locks or logging),
/// must not panic, and must not change what belongs to the memory it
/// shares (`PR_SET_DUMPABLE`, `mmap`, globals): only its own task's state
/// (credentials, namespaces, root, signals, rlimits, fds) before `execve`.
/// All signals are blocked in the child until it changes its mask itself.
pub(crate) fn clone_child(
    clone_flags: libc::c_int,
    cgroup: Option<BorrowedFd<'_>>,
    child: &mut dyn FnMut() -> i32,
) -> Result<libc::pid_t, Errno> {
    let _blocked = BlockSignals::all()?;
    #[cfg(target_arch = "x86_64")]
    match vfork::clone(clone_flags, cgroup, child) {
        // No clone3 (before Linux 5.3): only without a cgroup can the
        // child start otherwise (the caller retries without one).
        Err(Errno(libc::ENOSYS)) if cgroup.is_none() => clone_copy(clone_flags, None, child),
        r => r,
    }
    #[cfg(not(target_arch = "x86_64"))]
    clone_copy(clone_flags, cgroup, child)
}

/// Blocks every signal in the calling thread until dropped, so that the
/// child starts with every signal blocked: none of this process's handlers
/// can run in it before it resets them.
struct BlockSignals {
    old: libc::sigset_t,
}

impl BlockSignals {
    fn all() -> Result<BlockSignals, Errno> {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initialises `all`.
        check(unsafe { libc::sigfillset(all.as_mut_ptr()) })?;
        // SAFETY: `all` is initialised; `old` is written by the call when it
        // succeeds (pthread_sigmask returns the error number, not -1).
        let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr()) };
        if r != 0 {
            return Err(Errno(r));
        }
        // SAFETY: initialised by the successful pthread_sigmask above.
        Ok(BlockSignals {
            old: unsafe { old.assume_init() },
        })
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask pthread_sigmask returned.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, ptr::null_mut());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vfork {
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::ptr;

    use super::{errno, CloneArgs, Errno, CLONE_INTO_CGROUP};

    /// The child's stack: the setup steps need a few KiB (the largest
    /// frame holds a 4 KiB symlink buffer); pages are only touched as used.
    const STACK_SIZE: usize = 512 << 10;
    const GUARD: usize = 4096;

    /// The child's stack, unmapped when dropped (after the child exec'd or
    /// exited: the calling thread waited for that in `clone3`).
    struct Stack {
        base: *mut libc::c_void,
    }

    impl Stack {
        fn new() -> Result<Stack, Errno> {
            // SAFETY: an anonymous private mapping at an address the kernel
            // chooses; no existing memory is affected.
            let base = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    STACK_SIZE + GUARD,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(errno());
            }
            let stack = Stack { base };
            // SAFETY: the lowest page of the mapping just made: an overflow
            // faults instead of writing below it.
            if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } == -1 {
                return Err(errno());
            }
            Ok(stack)
        }
    }

    impl Drop for Stack {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made, which nothing
            // uses any more.
            unsafe {
                libc::munmap(self.base, STACK_SIZE + GUARD);
            }
        }
    }

    /// Where the child starts, on its own stack: runs the closure `arg`
    /// points to.
    extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut &mut dyn FnMut` that `clone` passed,
        // alive in the suspended parent's frame until the child is gone.
        let child = unsafe { &mut *(arg as *mut &mut dyn FnMut() -> i32) };
        child()
    }

    pub(super) fn clone(
        clone_flags: libc::c_int,
        cgroup: Option<BorrowedFd<'_>>,
        mut child: &mut dyn FnMut() -> i32,
    ) -> Result<libc::pid_t, Errno> {
        let stack = Stack::new()?;
        let flags = clone_flags as u32 as u64
            | (libc::CLONE_VM | libc::CLONE_VFORK) as u64
            | cgroup.map_or(0, |_| CLONE_INTO_CGROUP);
        let args = CloneArgs {
            flags,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack.base as u64 + GUARD as u64,
            stack_size: STACK_SIZE as u64,
            cgroup: cgroup.map_or(0, |c| c.as_raw_fd() as u64),
            ..CloneArgs::default()
        };
        let arg: *mut &mut dyn FnMut() -> i32 = &mut child;
        let ret: i64;
        // SAFETY: clone3 with CLONE_VM | CLONE_VFORK and a stack: the child
        // starts on the new stack (rsp = stack + stack_size, 16-byte
        // aligned as mmap's result and STACK_SIZE are) with the parent's
        // registers otherwise, so r12/r13 still hold the entry and its
        // argument; it calls `child_entry` (the call leaves rsp as the ABI
        // expects at a function's entry) and exits with its result by the
        // raw `exit` system call, touching nothing of the parent's stack.
        // The parent sleeps in the kernel until the child execs or exits,
        // so the closure, `args` and the stack stay valid for as long as
        // the child uses them. `args` is a valid clone_args (version 2, with
        // `cgroup`) and its size is passed with it. rcx and r11 are
        // clobbered by `syscall`.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r13",
                "call r12",
                "mov edi, eax",
                "mov eax, {exit}",
                "syscall",
                "ud2",
                "2:",
                exit = const libc::SYS_exit,
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") &args as *const CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") child_entry as *const () as usize,
                in("r13") arg as usize,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        drop(stack);
        if ret < 0 {
            return Err(Errno(-ret as i32));
        }
        Ok(ret as libc::pid_t)
    }
}

/// [`clone_child`] as after `fork`: the child runs on a copy of this
/// process's memory and stack.
fn clone_copy(
    clone_flags: libc::c_int,
    cgroup: Option<BorrowedFd<'_>>,
    child: &mut dyn FnMut() -> i32,
) -> Result<libc::pid_t, Errno> {
    let pid = match cgroup {
        None => {
            let flags = (clone_flags | libc::SIGCHLD) as libc::c_ulong;
            // SAFETY: clone with a NULL stack behaves like fork: the child
            // runs on a copy of this stack. No CLONE_VM/CLONE_THREAD, so
            // memory is copied; the child only runs `child`, which the
            // caller guarantees is async-signal-safe, then _exit without
            // running destructors or atexit.
            unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) }
        }
        Some(cgroup) => {
            let args = CloneArgs {
                flags: clone_flags as u32 as u64 | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: cgroup.as_raw_fd() as u64,
                ..CloneArgs::default()
            };
            // SAFETY: as the clone above: a zero stack and stack size make
            // clone3 behave like fork, on a copy of this stack, and the
            // child only runs the async-signal-safe `child`, then _exit.
            // `args` is a valid clone_args (version 2, with `cgroup`) that
            // lives across the call, and its size is passed with it.
            unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &args as *const CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            }
        }
    };
    if pid == -1 {
        return Err(errno());
    }
    if pid == 0 {
        let code = child();
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(code) };
    }
    Ok(pid as libc::pid_t)
}
