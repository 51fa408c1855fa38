//! A fake [`Syscall`] that records each call, for unit tests of the setup
//! sequence (compiled only for tests: see [`super::syscall`]).

use std::ffi::{CStr, CString};

use super::exec::PreparedExec;
use super::seccomp::SockFilter;
use super::syscall::{Errno, FileKind, Syscall};

/// One recorded call of [`RecordingSyscalls`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `mount(source, target, fstype, flags, data)`.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// `umount2(target, flags)`.
    Umount2 {
        target: CString,
        flags: i32,
    },
    /// `pivot_root(new_root, put_old)`.
    PivotRoot {
        new_root: CString,
        put_old: CString,
    },
    /// `chdir(path)`.
    Chdir(CString),
    /// `mkdir(path, mode)`.
    Mkdir(CString, u32),
    /// `create_file(path, mode)`.
    CreateFile(CString, u32),
    /// `write_file(path, contents, mode, owner)`.
    WriteFile {
        path: CString,
        contents: Vec<u8>,
        mode: u32,
        owner: Option<(u32, u32)>,
    },
    /// `lstat(path)`.
    Lstat(CString),
    /// `readlink(path)`.
    Readlink(CString),
    /// `symlink(contents, link)`.
    Symlink {
        contents: CString,
        link: CString,
    },
    /// `chmod(path, mode)`.
    Chmod(CString, u32),
    /// `sethostname`.
    Hostname(CString),
    /// `setdomainname`.
    Domainname(CString),
    /// `lo` up.
    LoopbackUp,
    JoinNetwork(i32),
    /// `setsid`.
    Setsid,
    /// stdio onto the log fd.
    RedirectStdio(i32),
    /// stdio onto a terminal, which becomes the controlling one.
    AttachTerminal(i32),
    /// close-on-exec from fd.
    CloexecFrom(u32),
    /// `RLIMIT_CORE` 0.
    NoCoreDumps,
    /// `RLIMIT_NPROC`.
    ProcessLimit(u64),
    /// A new anonymous session keyring.
    JoinSessionKeyring,
    /// `umask`.
    Umask(u32),
    /// `personality`.
    NoAddressRandomization,
    /// `oom_score_adj` raised.
    OomSacrifice,
    /// bounding set dropped.
    DropBoundingSet,
    /// ambient set cleared.
    ClearAmbientCaps,
    /// `capset` 0.
    ClearCaps,
    /// `setgroups`.
    SetGroups(Vec<u32>),
    /// `setresgid`.
    SetResGid(u32),
    /// `setresuid`.
    SetResUid(u32),
    /// `PR_SET_PDEATHSIG`.
    DieWithParent,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// seccomp filter installed (by length).
    Seccomp(usize),
    /// signals reset.
    ResetSignals,
    /// `execve(path, argv, envp)` (argv and env recorded by count).
    Execve {
        path: CString,
        argc: usize,
        envc: usize,
    },
    /// `kill(-1, SIGKILL)`.
    KillAll,
    /// `write(fd, buf)`.
    Write(i32, Vec<u8>),
}

/// A fake [`Syscall`] that records every call and succeeds, except where told
/// to fail. For unit tests of the setup sequence; never used after `clone`.
#[derive(Debug, Default)]
pub struct RecordingSyscalls {
    /// The calls so far, in order.
    pub calls: Vec<Call>,
    /// Fail the call with this index (0-based, counting all calls) with this errno.
    pub fail_at: Option<(usize, Errno)>,
    /// What `lstat` reports for a path; absent paths are directories, unless
    /// listed in `missing`.
    pub kinds: Vec<(CString, FileKind)>,
    /// Paths for which `lstat` fails with ENOENT.
    pub missing: Vec<CString>,
    /// What `readlink` returns.
    pub link_target: Vec<u8>,
}

impl RecordingSyscalls {
    fn record(&mut self, call: Call) -> Result<(), Errno> {
        let i = self.calls.len();
        self.calls.push(call);
        match self.fail_at {
            Some((at, e)) if at == i => Err(e),
            _ => Ok(()),
        }
    }
}

impl Syscall for RecordingSyscalls {
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), Errno> {
        self.record(Call::Mount {
            source: source.map(CStr::to_owned),
            target: target.to_owned(),
            fstype: fstype.map(CStr::to_owned),
            flags,
            data: data.map(CStr::to_owned),
        })
    }
    fn umount2(&mut self, target: &CStr, flags: i32) -> Result<(), Errno> {
        self.record(Call::Umount2 {
            target: target.to_owned(),
            flags,
        })
    }
    fn pivot_root(&mut self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        self.record(Call::PivotRoot {
            new_root: new_root.to_owned(),
            put_old: put_old.to_owned(),
        })
    }
    fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
        self.record(Call::Chdir(path.to_owned()))
    }
    fn mkdir(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        self.record(Call::Mkdir(path.to_owned(), mode))
    }
    fn create_file(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        self.record(Call::CreateFile(path.to_owned(), mode))
    }
    fn write_file(
        &mut self,
        path: &CStr,
        contents: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), Errno> {
        self.record(Call::WriteFile {
            path: path.to_owned(),
            contents: contents.to_vec(),
            mode,
            owner,
        })
    }
    fn lstat_kind(&mut self, path: &CStr) -> Result<FileKind, Errno> {
        self.record(Call::Lstat(path.to_owned()))?;
        if self.missing.iter().any(|m| m.as_c_str() == path) {
            return Err(Errno(libc::ENOENT));
        }
        Ok(self
            .kinds
            .iter()
            .find(|(p, _)| p.as_c_str() == path)
            .map(|(_, k)| *k)
            .unwrap_or(FileKind::Directory))
    }
    fn readlink(&mut self, path: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
        self.record(Call::Readlink(path.to_owned()))?;
        let n = self.link_target.len().min(buf.len());
        buf[..n].copy_from_slice(&self.link_target[..n]);
        Ok(n)
    }
    fn symlink(&mut self, contents: &CStr, link: &CStr) -> Result<(), Errno> {
        self.record(Call::Symlink {
            contents: contents.to_owned(),
            link: link.to_owned(),
        })
    }
    fn chmod(&mut self, path: &CStr, mode: u32) -> Result<(), Errno> {
        self.record(Call::Chmod(path.to_owned(), mode))
    }
    fn sethostname(&mut self, name: &CStr) -> Result<(), Errno> {
        self.record(Call::Hostname(name.to_owned()))
    }
    fn setdomainname(&mut self, name: &CStr) -> Result<(), Errno> {
        self.record(Call::Domainname(name.to_owned()))
    }
    fn loopback_up(&mut self) -> Result<(), Errno> {
        self.record(Call::LoopbackUp)
    }
    fn join_network(&mut self, fd: i32) -> Result<(), Errno> {
        self.record(Call::JoinNetwork(fd))
    }
    fn setsid(&mut self) -> Result<(), Errno> {
        self.record(Call::Setsid)
    }
    fn attach_terminal(&mut self, tty_fd: i32) -> Result<(), Errno> {
        self.record(Call::AttachTerminal(tty_fd))
    }
    fn redirect_stdio(&mut self, log_fd: i32) -> Result<(), Errno> {
        self.record(Call::RedirectStdio(log_fd))
    }
    fn cloexec_from(&mut self, first: u32) -> Result<(), Errno> {
        self.record(Call::CloexecFrom(first))
    }
    fn no_core_dumps(&mut self) -> Result<(), Errno> {
        self.record(Call::NoCoreDumps)
    }
    fn set_process_limit(&mut self, n: u64) -> Result<(), Errno> {
        self.record(Call::ProcessLimit(n))
    }
    fn join_session_keyring(&mut self) -> Result<(), Errno> {
        self.record(Call::JoinSessionKeyring)
    }
    fn umask(&mut self, mask: u32) {
        let _ = self.record(Call::Umask(mask));
    }
    fn no_address_randomization(&mut self) -> Result<(), Errno> {
        self.record(Call::NoAddressRandomization)
    }
    fn oom_sacrifice(&mut self) -> Result<(), Errno> {
        self.record(Call::OomSacrifice)
    }
    fn drop_bounding_set(&mut self) -> Result<(), Errno> {
        self.record(Call::DropBoundingSet)
    }
    fn clear_ambient_caps(&mut self) -> Result<(), Errno> {
        self.record(Call::ClearAmbientCaps)
    }
    fn clear_caps(&mut self) -> Result<(), Errno> {
        self.record(Call::ClearCaps)
    }
    fn setgroups(&mut self, gids: &[u32]) -> Result<(), Errno> {
        self.record(Call::SetGroups(gids.to_vec()))
    }
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        self.record(Call::SetResGid(gid))
    }
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        self.record(Call::SetResUid(uid))
    }
    fn die_with_parent(&mut self) -> Result<(), Errno> {
        self.record(Call::DieWithParent)
    }
    fn no_new_privs(&mut self) -> Result<(), Errno> {
        self.record(Call::NoNewPrivs)
    }
    fn seccomp_filter(&mut self, program: &[SockFilter]) -> Result<(), Errno> {
        self.record(Call::Seccomp(program.len()))
    }
    fn reset_signals(&mut self) -> Result<(), Errno> {
        self.record(Call::ResetSignals)
    }
    fn execve(&mut self, exec: &PreparedExec<'_>) -> Errno {
        let call = Call::Execve {
            path: exec.path().to_owned(),
            argc: exec.argc(),
            envc: exec.envc(),
        };
        match self.record(call) {
            Err(e) => e,
            // A real execve that succeeds does not return; the fake reports success as 0.
            Ok(()) => Errno(0),
        }
    }
    fn kill_all(&mut self) -> Result<(), Errno> {
        self.record(Call::KillAll)
    }
    fn write_all(&mut self, fd: i32, buf: &[u8]) -> Result<(), Errno> {
        self.record(Call::Write(fd, buf.to_vec()))
    }
}
