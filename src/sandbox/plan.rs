//! The pure half of the sandbox: a [`SandboxSpec`] (plain data about one
//! build) becomes a [`SandboxPlan`], the exact list of [`SetupOp`]s the child
//! runs between `clone` and `execve`, plus the builder's argv and environment.
//!
//! Nothing here touches the system, so every decision about what the build can
//! see is unit-tested by looking at the list (bubblewrap's design: one loop
//! over declarative operations).
//!
//! # Layout inside the sandbox
//!
//! ```text
//! /                 tmpfs, remounted read-only before exec
//! /dev              null zero full random urandom tty (bind mounts of the host's),
//!                   pts (private devpts), ptmx -> pts/ptmx, shm (tmpfs of
//!                   Limits::shm_size),
//!                   fd stdin stdout stderr -> /proc/self/fd/...
//! /proc             fresh procfs of the build's PID namespace; nosuid,nodev,noexec;
//!                   sys, sysrq-trigger, irq, bus read-only
//! /etc              passwd, group, hosts (see etc_passwd and friends); 0555
//! /tmp              tmpfs 01777 (size: Limits::tmp_size) holding the build
//!                   directory /tmp/<build dir name>, bound from the host's disk
//! <store dir>       the per-build scratch store (01775 root:<build gid>) where
//!                   the builder creates its outputs, with each input path
//!                   bind-mounted read-only, nosuid, nodev at its logical path
//! ```
//!
//! # The build directory
//!
//! The build directory is `/tmp/<build_dir_name>`, writable, with
//! [`DEFAULT_BUILD_DIR_NAME`] = `sandoff-build`: fixed, so a local and a remote
//! build of one derivation see the same `$NIX_BUILD_TOP` (it leaks into
//! outputs more often than one would like). It is under `/tmp` as Guix's is
//! (`/tmp/guix-build-<name>.drv-0`, which depends on the derivation), so a
//! caller that wants bit-identical outputs with Guix can pass Guix's name
//! instead; Nix's `/build` is not under `/tmp`.
//!
//! # Outputs
//!
//! Outputs are not pre-created: a builder may make `$out` a file, a directory
//! or a symlink, so (as in Nix) it creates them in the store directory, which
//! is the writable per-build scratch store [`SandboxDirs::store`]. After the
//! build they are at `<scratch store>/<base name>` on the host.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::{HashAlgo, StoreDir, StorePath};

use super::seccomp::{build_filter, SockFilter};
use super::SandboxError;

/// The default name of the build directory under `/tmp` in the sandbox.
pub const DEFAULT_BUILD_DIR_NAME: &str = "sandoff-build";

/// The user and group names written to the sandbox's `/etc/passwd` and
/// `/etc/group`. Nix and Guix both write `nixbld` whatever the host account is
/// called, so a build that runs `id -un` gets the same answer everywhere.
pub const SANDBOX_USER_NAME: &str = "nixbld";

/// The hostname inside the sandbox (as Nix).
pub const SANDBOX_HOSTNAME: &str = "localhost";

/// The NIS domain name inside the sandbox (as Nix and Guix).
pub const SANDBOX_DOMAINNAME: &str = "(none)";

/// `HOME` for builders: a path that does not exist, as Nix.
pub const HOMELESS_SHELTER: &str = "/homeless-shelter";

/// `PATH` for builders, as Nix.
pub const PATH_NOT_SET: &str = "/path-not-set";

/// The host's device nodes that are bound into the sandbox's `/dev`.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The parts of `/proc` that are bound read-only over themselves (as bubblewrap).
const PROC_READ_ONLY: [&str; 4] = ["sys", "sysrq-trigger", "irq", "bus"];

/// A host account from the build-user pool that a build runs as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BuildUser {
    uid: u32,
    gid: u32,
    user_name: String,
    group_name: String,
}

impl BuildUser {
    /// Checks and wraps a build user. Root is refused: the sandbox relies on
    /// the setuid transition to drop every capability, and killing "all
    /// processes of the build user" must never mean all of root's.
    pub fn new(
        uid: u32,
        gid: u32,
        user_name: &str,
        group_name: &str,
    ) -> Result<BuildUser, SandboxError> {
        let invalid = |reason: String| SandboxError::InvalidSpec {
            field: "build user",
            reason,
        };
        if uid == 0 || gid == 0 {
            return Err(invalid(format!(
                "'{user_name}' has uid {uid} gid {gid}; a build user must not be root"
            )));
        }
        for name in [user_name, group_name] {
            if name.is_empty() || name.bytes().any(|b| b == b':' || b == b'\n' || b == 0) {
                return Err(invalid(format!("bad account name '{name}'")));
            }
        }
        Ok(BuildUser {
            uid,
            gid,
            user_name: user_name.to_owned(),
            group_name: group_name.to_owned(),
        })
    }

    /// The host uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The host gid of the build-users group.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The host account name (for logs; the sandbox shows [`SANDBOX_USER_NAME`]).
    pub fn user_name(&self) -> &str {
        &self.user_name
    }

    /// The host group name.
    pub fn group_name(&self) -> &str {
        &self.group_name
    }
}

/// One path of the input closure: where its files are on this machine and the
/// store path it appears as in the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputPath {
    /// Physical location (e.g. under a chroot store's root).
    pub source: PathBuf,
    /// The store path; it appears at `<store dir>/<base name>`.
    pub path: StorePath,
}

/// Host directories prepared for one build (see `HostDirs::create`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxDirs {
    /// An empty directory; the sandbox's root tmpfs is mounted on it inside
    /// the build's private mount namespace, so the host never sees it.
    pub root: PathBuf,
    /// The build directory (owned by the build user, mode 0700), bound at
    /// `/tmp/<build dir name>`.
    pub build: PathBuf,
    /// The scratch store (`root:<build gid>`, 01775), bound at the store dir;
    /// outputs appear here.
    pub store: PathBuf,
}

/// The time limits of one build; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Kill the build after this long without log output (`--max-silent-time`).
    pub max_silent: Option<Duration>,
    /// Kill the build after this long in total (`--timeout`).
    pub total: Option<Duration>,
}

/// The size of a tmpfs: `size=` in the mount options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmpfsSize {
    /// This many bytes (rounded up to pages by the kernel).
    Bytes(u64),
    /// This percentage of physical memory (tmpfs computes it at mount).
    PercentOfMemory(u8),
}

impl TmpfsSize {
    /// Parses `268435456`, `256k`, `256m`, `2g` (binary units) or `25%`.
    pub fn parse(s: &str) -> Result<TmpfsSize, String> {
        let bad =
            || format!("'{s}' is not a size (bytes, or with k, m, g, or a percentage: 256m, 25%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(format!("'{s}': a percentage of memory from 1% to 100%"));
            }
            return Ok(TmpfsSize::PercentOfMemory(p));
        }
        let (digits, unit) = match s.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_lowercase()),
            _ => (s, 'b'),
        };
        let shift = match unit {
            'b' => 0,
            'k' => 10,
            'm' => 20,
            'g' => 30,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n
            .checked_mul(1 << shift)
            .ok_or_else(|| format!("'{s}' is too large"))?;
        if bytes == 0 {
            // tmpfs reads size=0 as "unlimited": never what a bound means.
            return Err(format!("'{s}': a tmpfs size must not be 0"));
        }
        Ok(TmpfsSize::Bytes(bytes))
    }

    /// The value of `size=`.
    pub fn mount_option(self) -> String {
        match self {
            TmpfsSize::Bytes(b) => b.to_string(),
            TmpfsSize::PercentOfMemory(p) => format!("{p}%"),
        }
    }
}

impl fmt::Display for TmpfsSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TmpfsSize::Bytes(b) if b % (1 << 30) == 0 => write!(f, "{}g", b >> 30),
            TmpfsSize::Bytes(b) if b % (1 << 20) == 0 => write!(f, "{}m", b >> 20),
            TmpfsSize::Bytes(b) => write!(f, "{b}"),
            TmpfsSize::PercentOfMemory(p) => write!(f, "{p}%"),
        }
    }
}

/// The default size of the sandbox's `/tmp` tmpfs: a quarter of physical
/// memory. The build directory is not on it (it is bound from the host's
/// disk), so it holds only what tools write to a hard-coded `/tmp`; a
/// quarter stays clear of the whole memory even with a few builds at once.
pub const DEFAULT_TMP_SIZE: TmpfsSize = TmpfsSize::PercentOfMemory(25);

/// The default size of `/dev/shm`: 256 MiB, four times Docker's 64 MiB,
/// enough for the POSIX shared memory of test suites (Python's
/// multiprocessing, browsers' tests).
pub const DEFAULT_SHM_SIZE: TmpfsSize = TmpfsSize::Bytes(256 << 20);

/// The default `RLIMIT_NPROC` of a build (its processes and threads):
/// far above what `make -j` of a big package runs, far below what a fork
/// bomb needs to hurt the host.
pub const DEFAULT_MAX_PROCESSES: u64 = 8192;

/// Resource bounds of one build (see the constants for the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `size=` of the `/tmp` tmpfs.
    pub tmp_size: TmpfsSize,
    /// `size=` of the `/dev/shm` tmpfs.
    pub shm_size: TmpfsSize,
    /// `RLIMIT_NPROC` of the build user (at least 1).
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            tmp_size: DEFAULT_TMP_SIZE,
            shm_size: DEFAULT_SHM_SIZE,
            max_processes: DEFAULT_MAX_PROCESSES,
        }
    }
}

/// The `impureEnvVars` a fixed-output build may receive by default: what
/// Nixpkgs' fetchers (`lib.fetchers.proxyImpureEnvVars`, fetchurl, fetchgit)
/// and Guix's (`url-fetch`, `git-fetch` leaked variables) ask for. Entries
/// ending in `*` are prefixes (`NIX_MIRRORS_<site>`).
pub const DEFAULT_IMPURE_ENV_ALLOW: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NIX_CURL_FLAGS",
    "NIX_HASHED_MIRRORS",
    "NIX_CONNECT_TIMEOUT",
    "NIX_MIRRORS_*",
    "NIX_SSL_CERT_FILE",
    "NIX_GIT_SSL_CAINFO",
    "SSL_CERT_FILE",
    "GIT_PROXY_COMMAND",
    "SOCKS_SERVER",
    "LANG",
    "LC_ALL",
    "LC_MESSAGES",
    "COLUMNS",
    // Guix's git-fetch.
    "USER",
];

/// Whether a fixed-output build may receive the variable `name` from
/// sandoff's environment: listed in [`DEFAULT_IMPURE_ENV_ALLOW`] or `extra`
/// (same syntax), and never a `SANDOFF_*` variable (sandoff's own
/// configuration, whatever a list says).
pub fn impure_env_allowed(name: &[u8], extra: &[String]) -> bool {
    if name.starts_with(b"SANDOFF_") || name.is_empty() {
        return false;
    }
    let matches = |pattern: &[u8]| match pattern.strip_suffix(b"*") {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    };
    DEFAULT_IMPURE_ENV_ALLOW
        .iter()
        .map(|p| p.as_bytes())
        .chain(extra.iter().map(|p| p.as_bytes()))
        .any(matches)
}

/// Everything the sandbox needs to know about one build, as plain data.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// The logical store directory (`/nix/store`, `/gnu/store`).
    pub store_dir: StoreDir,
    /// The derivation's `builder` (a logical path inside the sandbox).
    pub builder: Vec<u8>,
    /// The derivation's `args`.
    pub args: Vec<Vec<u8>>,
    /// The derivation's `env`. `passAsFile` in it is honoured as Nix does.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The input closure: input sources, outputs of input derivations and all
    /// their references.
    pub inputs: Vec<InputPath>,
    /// The outputs being built (created by the builder in the scratch store).
    pub outputs: Vec<StorePath>,
    /// Host directories for this build.
    pub dirs: SandboxDirs,
    /// The build directory's name under `/tmp` (default [`DEFAULT_BUILD_DIR_NAME`]).
    pub build_dir_name: String,
    /// The build user from the pool.
    pub user: BuildUser,
    /// A fixed-output derivation: shares the host network (with the host's
    /// `resolv.conf`, `services`, `hosts` and CA bundle), gets
    /// `NIX_OUTPUT_CHECKED=1` and `impure_env`.
    pub fixed_output: bool,
    /// Values of the derivation's `impureEnvVars` as resolved by the caller;
    /// passed only to fixed-output derivations (as Nix), and only those
    /// [`impure_env_allowed`] with `impure_env_allow`.
    pub impure_env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Names (or `PREFIX*`) allowed in `impure_env` besides
    /// [`DEFAULT_IMPURE_ENV_ALLOW`].
    pub impure_env_allow: Vec<String>,
    /// Resource bounds.
    pub limits: Limits,
    /// `NIX_BUILD_CORES` (0 is passed through: stdenv reads it as "all cores").
    pub cores: u32,
    /// Silence and total time limits.
    pub timeouts: Timeouts,
}

/// Mount flags for a bind mount, applied by a bind remount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountFlags {
    /// `MS_RDONLY`.
    pub readonly: bool,
    /// `MS_NOSUID`.
    pub nosuid: bool,
    /// `MS_NODEV`.
    pub nodev: bool,
    /// `MS_NOEXEC`.
    pub noexec: bool,
}

impl MountFlags {
    /// Read-only, nosuid, nodev: input store paths and host files.
    pub const INPUT: MountFlags = MountFlags {
        readonly: true,
        nosuid: true,
        nodev: true,
        noexec: false,
    };
    /// Writable, nosuid, nodev: the build directory and the scratch store.
    pub const WRITABLE: MountFlags = MountFlags {
        readonly: false,
        nosuid: true,
        nodev: true,
        noexec: false,
    };
    /// Device nodes: nosuid, noexec, but devices must work.
    pub const DEVICE: MountFlags = MountFlags {
        readonly: false,
        nosuid: true,
        nodev: false,
        noexec: true,
    };
    /// Read-only parts of `/proc`.
    pub const PROC_RO: MountFlags = MountFlags {
        readonly: true,
        nosuid: true,
        nodev: true,
        noexec: true,
    };

    /// The `MS_*` bits.
    pub fn bits(self) -> libc::c_ulong {
        let mut f = 0;
        if self.readonly {
            f |= libc::MS_RDONLY;
        }
        if self.nosuid {
            f |= libc::MS_NOSUID;
        }
        if self.nodev {
            f |= libc::MS_NODEV;
        }
        if self.noexec {
            f |= libc::MS_NOEXEC;
        }
        f
    }
}

impl fmt::Display for MountFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.readonly { "ro" } else { "rw" })?;
        for (on, name) in [
            (self.nosuid, ",nosuid"),
            (self.nodev, ",nodev"),
            (self.noexec, ",noexec"),
        ] {
            if on {
                f.write_str(name)?;
            }
        }
        Ok(())
    }
}

/// One step of sandbox setup, run by the child in order; any failure aborts
/// the build before `execve`. Paths are pre-converted to `CString` so the
/// child allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupOp {
    /// `PR_SET_PDEATHSIG(SIGKILL)`: the build dies with sandoff. Set again
    /// after the uid change, which clears it.
    DieWithParent,
    /// `setsid()`: no controlling terminal (no TIOCSTI injection).
    NewSession,
    /// stdin from `/dev/null`, stdout and stderr to the log pipe.
    Stdio,
    /// Interactive runs only ([`plan_interactive`]): stdin, stdout and
    /// stderr onto the terminal the caller passed (a pty slave whose master
    /// it holds), which becomes the controlling terminal (`TIOCSCTTY`, after
    /// [`SetupOp::NewSession`]).
    Terminal,
    /// Bring up `lo` in the new network namespace.
    LoopbackUp,
    /// `sethostname`.
    Hostname(CString),
    /// `setdomainname`.
    Domainname(CString),
    /// `/` recursively private, so no mount leaks to the host (systemd makes `/` shared).
    MakeMountsPrivate,
    /// Mount a fresh tmpfs (`data` holds e.g. `mode=0755`).
    MountTmpfs {
        target: CString,
        data: CString,
        flags: MountFlags,
    },
    /// `mkdir` one directory (parents come first in the list).
    Mkdir { path: CString, mode: u32 },
    /// Bind `source` at `target` (created as a file or directory like the
    /// source), then remount with `flags`. A symlink source is copied as a
    /// symlink instead, as Nix does: binding would follow it. `optional`:
    /// a missing source is skipped.
    Bind {
        source: CString,
        target: CString,
        flags: MountFlags,
        optional: bool,
    },
    /// A fresh procfs (nosuid, nodev, noexec).
    MountProc { target: CString },
    /// A private devpts instance (`newinstance,ptmxmode=0666,mode=0620`).
    MountDevpts { target: CString },
    /// `symlink(contents, link)`.
    Symlink { contents: CString, link: CString },
    /// Create a new file (`O_EXCL|O_NOFOLLOW`) with `contents` and `mode`,
    /// optionally owned by `owner` (uid, gid).
    WriteFile {
        path: CString,
        contents: Vec<u8>,
        mode: u32,
        owner: Option<(u32, u32)>,
    },
    /// `chmod`.
    Chmod { path: CString, mode: u32 },
    /// `pivot_root` into `new_root` and detach the old root, so nothing of
    /// the host's tree stays reachable.
    PivotRoot { new_root: CString },
    /// Remount `/` read-only, nosuid, nodev.
    RemountRootReadOnly,
    /// `chdir`.
    Chdir(CString),
    /// Mark every fd above 2 close-on-exec (`close_range`).
    CloseFds,
    /// `RLIMIT_CORE` = 0, as Nix (no core dumps in outputs).
    NoCoreDumps,
    /// `RLIMIT_NPROC` (soft and hard) = this many processes and threads of
    /// the build user: each build has its own uid, so this bounds one build
    /// (a fork bomb stops with `EAGAIN`). Set before the uid change, whose
    /// own check it then also bounds.
    ProcessLimit(u64),
    /// `umask`.
    Umask(u32),
    /// `personality(ADDR_NO_RANDOMIZE)`, as Nix, for reproducibility.
    NoAddressRandomization,
    /// `oom_score_adj` = 1000: under memory pressure the kernel kills a
    /// build before sandoff (as Guix's `oomSacrifice`).
    OomSacrifice,
    /// Drop every capability from the bounding set (needs CAP_SETPCAP, so
    /// before the uid change).
    DropBoundingSet,
    /// Clear the ambient capability set.
    ClearAmbientCaps,
    /// `setgroups`.
    SetGroups(Vec<u32>),
    /// `setresgid`, verified.
    SetGid(u32),
    /// `setresuid`, verified.
    SetUid(u32),
    /// `capset` with empty effective, permitted and inheritable sets.
    ClearCaps,
    /// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: a fresh anonymous
    /// session keyring, so the session keyring of whoever started sandoff
    /// is not the build's. After the uid change, so the build user owns it.
    /// A kernel without keyrings (`ENOSYS`) has nothing to share: skipped.
    NewSessionKeyring,
    /// `PR_SET_NO_NEW_PRIVS`: no setuid or file capabilities can raise privileges.
    NoNewPrivs,
    /// Install the seccomp filter (see [`super::seccomp`]); needs no_new_privs.
    Seccomp(Vec<SockFilter>),
    /// Empty signal mask and default dispositions (Rust ignores SIGPIPE).
    ResetSignals,
    /// `execve` the builder; the last step.
    Exec,
}

impl fmt::Display for SetupOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            SetupOp::DieWithParent => write!(f, "set parent-death signal"),
            SetupOp::NewSession => write!(f, "setsid"),
            SetupOp::Stdio => write!(f, "redirect stdio to the log"),
            SetupOp::Terminal => write!(f, "attach the terminal"),
            SetupOp::LoopbackUp => {
                write!(
                    f,
                    "bring up loopback (or join a network namespace made ahead)"
                )
            }
            SetupOp::Hostname(h) => write!(f, "set hostname '{}'", s(h)),
            SetupOp::Domainname(d) => write!(f, "set domain name '{}'", s(d)),
            SetupOp::MakeMountsPrivate => write!(f, "make mounts private"),
            SetupOp::MountTmpfs {
                target,
                data,
                flags,
            } => {
                write!(f, "mount tmpfs on {} ({}, {})", s(target), s(data), flags)
            }
            SetupOp::Mkdir { path, mode } => write!(f, "mkdir {} ({:o})", s(path), mode),
            SetupOp::Bind {
                source,
                target,
                flags,
                optional,
            } => write!(
                f,
                "bind {} on {} ({}{})",
                s(source),
                s(target),
                flags,
                if *optional { ", optional" } else { "" }
            ),
            SetupOp::MountProc { target } => write!(f, "mount proc on {}", s(target)),
            SetupOp::MountDevpts { target } => write!(f, "mount devpts on {}", s(target)),
            SetupOp::Symlink { contents, link } => {
                write!(f, "symlink {} -> {}", s(link), s(contents))
            }
            SetupOp::WriteFile { path, mode, .. } => write!(f, "write {} ({:o})", s(path), mode),
            SetupOp::Chmod { path, mode } => write!(f, "chmod {:o} {}", mode, s(path)),
            SetupOp::PivotRoot { new_root } => write!(f, "pivot_root into {}", s(new_root)),
            SetupOp::RemountRootReadOnly => write!(f, "remount / read-only"),
            SetupOp::Chdir(p) => write!(f, "chdir {}", s(p)),
            SetupOp::CloseFds => write!(f, "close inherited fds"),
            SetupOp::NoCoreDumps => write!(f, "set RLIMIT_CORE 0"),
            SetupOp::ProcessLimit(n) => write!(f, "set RLIMIT_NPROC {n}"),
            SetupOp::Umask(m) => write!(f, "umask {:03o}", m),
            SetupOp::NoAddressRandomization => write!(f, "personality ADDR_NO_RANDOMIZE"),
            SetupOp::OomSacrifice => write!(f, "set oom_score_adj 1000"),
            SetupOp::DropBoundingSet => write!(f, "drop the capability bounding set"),
            SetupOp::ClearAmbientCaps => write!(f, "clear ambient capabilities"),
            SetupOp::SetGroups(g) => write!(f, "setgroups {g:?}"),
            SetupOp::SetGid(g) => write!(f, "setgid {g}"),
            SetupOp::SetUid(u) => write!(f, "setuid {u}"),
            SetupOp::ClearCaps => write!(f, "clear capabilities"),
            SetupOp::NewSessionKeyring => write!(f, "join a new session keyring"),
            SetupOp::NoNewPrivs => write!(f, "set no_new_privs"),
            SetupOp::Seccomp(p) => write!(f, "install seccomp filter ({} instructions)", p.len()),
            SetupOp::ResetSignals => write!(f, "reset signals"),
            SetupOp::Exec => write!(f, "exec builder"),
        }
    }
}

/// What the builder is executed as, pre-converted for `execve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSpec {
    /// The builder's logical path.
    pub path: CString,
    /// `argv`: the builder's base name (as Nix), then the derivation's args.
    pub argv: Vec<CString>,
    /// `envp`: `NAME=value`, sorted by name.
    pub env: Vec<CString>,
}

/// The result of planning: namespaces, setup steps and the exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPlan {
    /// Whether the build gets its own network namespace (all but fixed-output).
    pub new_network: bool,
    /// The steps, in order; the last is [`SetupOp::Exec`].
    pub ops: Vec<SetupOp>,
    /// The builder's argv and environment.
    pub exec: ExecSpec,
    /// The final environment, before conversion (for inspection and tests).
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The build directory's logical path (`/tmp/<name>`).
    pub build_dir: String,
    /// Each output's logical path and where the builder leaves it on the host
    /// (in the scratch store), for the checks and registration after the build.
    pub outputs: Vec<(String, PathBuf)>,
    /// Time limits, carried through for the runner.
    pub timeouts: Timeouts,
    /// The cgroup v2 directory the child is cloned into (`clone3` with
    /// `CLONE_INTO_CGROUP`), if any: it is in it from its first
    /// instruction, and no process is moved (moving one takes a lock
    /// whose release waits for an RCU grace period, ~10 ms a build).
    pub cgroup: Option<PathBuf>,
}

/// `/etc/passwd` in the sandbox: the build user and `nobody`, no root (as
/// Guix); the build user's home is the build directory (as Nix).
pub fn etc_passwd(uid: u32, gid: u32, build_dir: &str) -> String {
    format!(
        "{SANDBOX_USER_NAME}:x:{uid}:{gid}:Nix build user:{build_dir}:/noshell\n\
         nobody:x:65534:65534:Nobody:/:/noshell\n"
    )
}

/// `/etc/group` in the sandbox: the build group and `nogroup`.
pub fn etc_group(gid: u32) -> String {
    format!("{SANDBOX_USER_NAME}:!:{gid}:\nnogroup:x:65534:\n")
}

/// `/etc/hosts` in the sandbox (not for fixed-output builds, which see the host's).
pub const ETC_HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

/// `/etc/nsswitch.conf` for fixed-output builds, as Nix.
pub const FOD_NSSWITCH: &str = "hosts: files dns\nservices: files\n";

/// The host files a fixed-output build sees (if present), as Nix.
const FOD_HOST_FILES: [&str; 3] = ["/etc/resolv.conf", "/etc/services", "/etc/hosts"];

/// The CA bundle bound for fixed-output builds, at the same path.
const FOD_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The file name Nix gives a `passAsFile` attribute: `.attr-<nix32(sha256(name))>`.
pub fn pass_as_file_name(attr: &[u8]) -> String {
    format!(".attr-{}", HashAlgo::Sha256.digest(attr).to_nix32())
}

fn cstring(field: &'static str, bytes: impl Into<Vec<u8>>) -> Result<CString, SandboxError> {
    CString::new(bytes).map_err(|e| SandboxError::InvalidSpec {
        field,
        reason: format!("contains a NUL byte at {}", e.nul_position()),
    })
}

fn cpath(field: &'static str, p: &Path) -> Result<CString, SandboxError> {
    cstring(field, p.as_os_str().as_bytes())
}

/// `root` joined with an absolute logical path.
fn under(root: &Path, logical: &str) -> PathBuf {
    root.join(logical.trim_start_matches('/'))
}

/// The builder's environment, in Nix's order (`initEnv`, `initTmpDir`);
/// later entries override earlier ones:
/// 1. `PATH`, `HOME`, `NIX_STORE`, `NIX_BUILD_CORES`;
/// 2. the derivation's env, in byte order of names; a `passAsFile` attribute
///    becomes `<name>Path` (so a derivation's own `<name>Path` sorting after
///    `<name>` overrides it, exactly as in Nix);
/// 3. `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` = build dir;
/// 4. fixed-output only: `NIX_OUTPUT_CHECKED=1` and the impure variables;
/// 5. `NIX_LOG_FD=2`, `TERM=xterm-256color`.
///
/// Returns the environment and the `passAsFile` files (name, contents).
#[allow(clippy::type_complexity)]
pub fn builder_env(
    spec: &SandboxSpec,
    build_dir: &str,
) -> (BTreeMap<Vec<u8>, Vec<u8>>, Vec<(String, Vec<u8>)>) {
    let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let set = |env: &mut BTreeMap<Vec<u8>, Vec<u8>>, k: &str, v: &[u8]| {
        env.insert(k.as_bytes().to_vec(), v.to_vec());
    };
    set(&mut env, "PATH", PATH_NOT_SET.as_bytes());
    set(&mut env, "HOME", HOMELESS_SHELTER.as_bytes());
    set(&mut env, "NIX_STORE", spec.store_dir.as_str().as_bytes());
    set(
        &mut env,
        "NIX_BUILD_CORES",
        spec.cores.to_string().as_bytes(),
    );

    // Nix's tokenizeString with its default separators " \t\n\r".
    let pass_as_file: BTreeSet<&[u8]> = spec
        .env
        .get(b"passAsFile".as_slice())
        .map(|v| {
            v.split(|b| b" \t\n\r".contains(b))
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut files = Vec::new();
    for (k, v) in &spec.env {
        if pass_as_file.contains(k.as_slice()) {
            let name = pass_as_file_name(k);
            let mut var = k.clone();
            var.extend_from_slice(b"Path");
            env.insert(var, format!("{build_dir}/{name}").into_bytes());
            files.push((name, v.clone()));
        } else {
            env.insert(k.clone(), v.clone());
        }
    }

    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(&mut env, k, build_dir.as_bytes());
    }
    if spec.fixed_output {
        set(&mut env, "NIX_OUTPUT_CHECKED", b"1");
        for (k, v) in &spec.impure_env {
            if impure_env_allowed(k, &spec.impure_env_allow) {
                env.insert(k.clone(), v.clone());
            }
        }
    }
    set(&mut env, "NIX_LOG_FD", b"2");
    set(&mut env, "TERM", b"xterm-256color");
    (env, files)
}

/// Collects the setup steps, creating each directory once.
struct Ops {
    ops: Vec<SetupOp>,
    made: BTreeSet<PathBuf>,
}

impl Ops {
    fn push(&mut self, op: SetupOp) {
        self.ops.push(op);
    }

    /// `mkdir -p` of `logical` under `root`, as explicit steps; `mode` for
    /// the last component, 0755 for parents.
    fn mkdir_all(&mut self, root: &Path, logical: &str, mode: u32) -> Result<(), SandboxError> {
        let comps: Vec<&str> = logical.split('/').filter(|c| !c.is_empty()).collect();
        let mut p = root.to_path_buf();
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            if self.made.insert(p.clone()) {
                let mode = if i + 1 == comps.len() { mode } else { 0o755 };
                self.push(SetupOp::Mkdir {
                    path: cpath("path", &p)?,
                    mode,
                });
            }
        }
        Ok(())
    }
}

fn check_spec(spec: &SandboxSpec) -> Result<(), SandboxError> {
    let invalid = |field: &'static str, reason: String| SandboxError::InvalidSpec { field, reason };
    let name = &spec.build_dir_name;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(invalid(
            "build dir name",
            format!("'{name}' must be one path component"),
        ));
    }
    if !spec.builder.starts_with(b"/") {
        return Err(invalid(
            "builder",
            format!(
                "'{}' is not an absolute path",
                String::from_utf8_lossy(&spec.builder)
            ),
        ));
    }
    for (field, p) in [
        ("dirs.root", &spec.dirs.root),
        ("dirs.build", &spec.dirs.build),
        ("dirs.store", &spec.dirs.store),
    ] {
        if !p.is_absolute() {
            return Err(invalid(field, format!("'{}' is not absolute", p.display())));
        }
    }
    let store_top = spec
        .store_dir
        .as_str()
        .split('/')
        .find(|c| !c.is_empty())
        .unwrap_or_default();
    if ["dev", "proc", "etc", "tmp"].contains(&store_top) {
        return Err(invalid(
            "store dir",
            format!(
                "'{}' clashes with the sandbox's /{store_top}",
                spec.store_dir
            ),
        ));
    }
    if spec.limits.max_processes == 0 {
        return Err(invalid(
            "limits.max_processes",
            "0 would stop the builder from starting".to_owned(),
        ));
    }
    let outputs: BTreeSet<&StorePath> = spec.outputs.iter().collect();
    for input in &spec.inputs {
        if outputs.contains(&input.path) {
            return Err(invalid(
                "inputs",
                format!(
                    "'{}' is also an output",
                    spec.store_dir.display(&input.path)
                ),
            ));
        }
        if !input.source.is_absolute() {
            return Err(invalid(
                "inputs",
                format!("source '{}' is not absolute", input.source.display()),
            ));
        }
    }
    Ok(())
}

/// What runs in a build's sandbox instead of its builder, for `sandoff
/// enter` ([`plan_interactive`]): a shell or a command, as the build user,
/// in the build directory, with the build's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interactive {
    /// The program, a logical path inside the sandbox.
    pub program: Vec<u8>,
    /// Its `argv`, `argv[0]` included.
    pub argv: Vec<Vec<u8>>,
    /// Variables set over the build's environment (`TERM`, `PS1`).
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// How the program's stdin, stdout and stderr are given.
    pub stdio: InteractiveStdio,
}

/// The standard fds of an [`Interactive`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InteractiveStdio {
    /// A terminal the runner passes (a fresh pty it proxies to the user's
    /// terminal): stdin, stdout and stderr, and the controlling terminal.
    Terminal,
    /// The caller's own fds, as they are (pipes, files): no controlling
    /// terminal, as for a build.
    Inherit,
}

/// Plans the sandbox for one build. Pure: the result depends only on `spec`.
pub fn plan(spec: &SandboxSpec) -> Result<SandboxPlan, SandboxError> {
    plan_with(spec, None)
}

/// Plans the sandbox of a build that ran already (its build directory and
/// scratch store as it left them) with `run` in place of the builder: the
/// same steps as [`plan`] (namespaces, mounts, `/etc`, ids, capabilities,
/// seccomp), except that
/// - stdio is `run.stdio` instead of the log pipe;
/// - `passAsFile` files are not written: the build wrote them, and its
///   directory is as it was left (the builder may have changed them);
/// - the environment is the builder's with `run.env` over it;
/// - there are no time limits: a person is at the keyboard.
pub fn plan_interactive(
    spec: &SandboxSpec,
    run: &Interactive,
) -> Result<SandboxPlan, SandboxError> {
    plan_with(spec, Some(run))
}

fn plan_with(
    spec: &SandboxSpec,
    interactive: Option<&Interactive>,
) -> Result<SandboxPlan, SandboxError> {
    check_spec(spec)?;
    let root = spec.dirs.root.as_path();
    let build_dir = format!("/tmp/{}", spec.build_dir_name);
    let uid = spec.user.uid;
    let gid = spec.user.gid;
    let mut o = Ops {
        ops: Vec::new(),
        made: BTreeSet::new(),
    };

    // Process state first: nothing below may outlive sandoff or own a terminal.
    o.push(SetupOp::DieWithParent);
    o.push(SetupOp::NewSession);
    if !spec.fixed_output {
        o.push(SetupOp::LoopbackUp);
    }
    o.push(SetupOp::Hostname(cstring("hostname", SANDBOX_HOSTNAME)?));
    o.push(SetupOp::Domainname(cstring(
        "domainname",
        SANDBOX_DOMAINNAME,
    )?));

    // The new root: a tmpfs in our private mount namespace, invisible to the host.
    o.push(SetupOp::MakeMountsPrivate);
    o.push(SetupOp::MountTmpfs {
        target: cpath("dirs.root", root)?,
        data: cstring("tmpfs", "mode=0755")?,
        flags: MountFlags {
            readonly: false,
            nosuid: true,
            nodev: true,
            noexec: false,
        },
    });
    o.made.insert(root.to_path_buf());

    // /tmp and the build directory.
    o.mkdir_all(root, "/tmp", 0o1777)?;
    o.push(SetupOp::MountTmpfs {
        target: cpath("path", &under(root, "/tmp"))?,
        data: cstring(
            "tmpfs",
            format!("mode=01777,size={}", spec.limits.tmp_size.mount_option()),
        )?,
        flags: MountFlags::WRITABLE,
    });
    let build_target = under(root, &build_dir);
    o.push(SetupOp::Mkdir {
        path: cpath("path", &build_target)?,
        mode: 0o700,
    });
    o.push(SetupOp::Bind {
        source: cpath("dirs.build", &spec.dirs.build)?,
        target: cpath("path", &build_target)?,
        flags: MountFlags::WRITABLE,
        optional: false,
    });

    // The store: the scratch store, then each input read-only on top.
    let store_target = under(root, spec.store_dir.as_str());
    o.mkdir_all(root, spec.store_dir.as_str(), 0o755)?;
    o.push(SetupOp::Bind {
        source: cpath("dirs.store", &spec.dirs.store)?,
        target: cpath("path", &store_target)?,
        flags: MountFlags::WRITABLE,
        optional: false,
    });
    let mut seen = BTreeSet::new();
    for input in &spec.inputs {
        if !seen.insert(&input.path) {
            continue;
        }
        o.push(SetupOp::Bind {
            source: cpath("inputs", &input.source)?,
            target: cpath("inputs", &store_target.join(input.path.base_name()))?,
            flags: MountFlags::INPUT,
            optional: false,
        });
    }

    // /dev, as bubblewrap's --dev and Nix.
    o.mkdir_all(root, "/dev", 0o755)?;
    for dev in DEVICES {
        o.push(SetupOp::Bind {
            source: cpath("device", &Path::new("/dev").join(dev))?,
            target: cpath("device", &under(root, &format!("/dev/{dev}")))?,
            flags: MountFlags::DEVICE,
            optional: false,
        });
    }
    o.mkdir_all(root, "/dev/shm", 0o1777)?;
    o.push(SetupOp::MountTmpfs {
        target: cpath("path", &under(root, "/dev/shm"))?,
        data: cstring(
            "tmpfs",
            format!("mode=01777,size={}", spec.limits.shm_size.mount_option()),
        )?,
        flags: MountFlags::WRITABLE,
    });
    o.mkdir_all(root, "/dev/pts", 0o755)?;
    o.push(SetupOp::MountDevpts {
        target: cpath("path", &under(root, "/dev/pts"))?,
    });
    for (link, contents) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        o.push(SetupOp::Symlink {
            contents: cstring("symlink", contents)?,
            link: cpath("path", &under(root, &format!("/dev/{link}")))?,
        });
    }

    // /proc of the new PID namespace, with the kernel knobs read-only.
    o.mkdir_all(root, "/proc", 0o555)?;
    let proc_target = under(root, "/proc");
    o.push(SetupOp::MountProc {
        target: cpath("path", &proc_target)?,
    });
    for p in PROC_READ_ONLY {
        let t = cpath("path", &proc_target.join(p))?;
        o.push(SetupOp::Bind {
            source: t.clone(),
            target: t,
            flags: MountFlags::PROC_RO,
            optional: true,
        });
    }

    // /etc.
    o.mkdir_all(root, "/etc", 0o755)?;
    let etc = |name: &str| cpath("path", &under(root, &format!("/etc/{name}")));
    o.push(SetupOp::WriteFile {
        path: etc("passwd")?,
        contents: etc_passwd(uid, gid, &build_dir).into_bytes(),
        mode: 0o444,
        owner: None,
    });
    o.push(SetupOp::WriteFile {
        path: etc("group")?,
        contents: etc_group(gid).into_bytes(),
        mode: 0o444,
        owner: None,
    });
    if spec.fixed_output {
        o.push(SetupOp::WriteFile {
            path: etc("nsswitch.conf")?,
            contents: FOD_NSSWITCH.as_bytes().to_vec(),
            mode: 0o444,
            owner: None,
        });
        for f in FOD_HOST_FILES {
            o.push(SetupOp::Bind {
                source: cstring("path", f)?,
                target: cpath("path", &under(root, f))?,
                flags: MountFlags::INPUT,
                optional: true,
            });
        }
        o.mkdir_all(root, "/etc/ssl/certs", 0o755)?;
        o.push(SetupOp::Bind {
            source: cstring("path", FOD_CA_BUNDLE)?,
            target: cpath("path", &under(root, FOD_CA_BUNDLE))?,
            flags: MountFlags::INPUT,
            optional: true,
        });
    } else {
        o.push(SetupOp::WriteFile {
            path: etc("hosts")?,
            contents: ETC_HOSTS.as_bytes().to_vec(),
            mode: 0o444,
            owner: None,
        });
    }
    o.push(SetupOp::Chmod {
        path: cpath("path", &under(root, "/etc"))?,
        mode: 0o555,
    });

    // passAsFile, written as root through the bind (O_EXCL, O_NOFOLLOW) and
    // handed to the build user, as Nix's chownToBuilder.
    let (mut env, mut files) = builder_env(spec, &build_dir);
    if let Some(run) = interactive {
        files.clear();
        env.extend(run.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for (name, contents) in files {
        o.push(SetupOp::WriteFile {
            path: cpath("path", &build_target.join(name))?,
            contents,
            mode: 0o600,
            owner: Some((uid, gid)),
        });
    }

    // Enter the new root; nothing of the host stays reachable.
    o.push(SetupOp::PivotRoot {
        new_root: cpath("dirs.root", root)?,
    });
    o.push(SetupOp::RemountRootReadOnly);
    // After the pivot, so stdin is the sandbox's /dev/null, not an fd on a
    // host mount outside the new root. An interactive run gets what its
    // caller chose instead.
    match interactive.map(|r| r.stdio) {
        None => o.push(SetupOp::Stdio),
        Some(InteractiveStdio::Terminal) => o.push(SetupOp::Terminal),
        Some(InteractiveStdio::Inherit) => {}
    }
    o.push(SetupOp::Chdir(cstring("build dir", build_dir.as_str())?));
    o.push(SetupOp::CloseFds);
    o.push(SetupOp::NoCoreDumps);
    o.push(SetupOp::ProcessLimit(spec.limits.max_processes));
    o.push(SetupOp::Umask(0o022));
    o.push(SetupOp::NoAddressRandomization);
    o.push(SetupOp::OomSacrifice);

    // Privileges: bounding set while we still have CAP_SETPCAP, then the ids,
    // then whatever the uid change left, then lock it with no_new_privs.
    o.push(SetupOp::DropBoundingSet);
    o.push(SetupOp::ClearAmbientCaps);
    o.push(SetupOp::SetGroups(Vec::new()));
    o.push(SetupOp::SetGid(gid));
    o.push(SetupOp::SetUid(uid));
    o.push(SetupOp::DieWithParent);
    o.push(SetupOp::NewSessionKeyring);
    o.push(SetupOp::ClearCaps);
    o.push(SetupOp::NoNewPrivs);
    o.push(SetupOp::Seccomp(build_filter()));
    o.push(SetupOp::ResetSignals);
    o.push(SetupOp::Exec);

    let (path, argv) = match interactive {
        None => {
            let base = spec
                .builder
                .rsplit(|b| *b == b'/')
                .next()
                .unwrap_or_default()
                .to_vec();
            let mut argv = vec![cstring("builder", base)?];
            for a in &spec.args {
                argv.push(cstring("args", a.clone())?);
            }
            (cstring("builder", spec.builder.clone())?, argv)
        }
        Some(run) => {
            if !run.program.starts_with(b"/") || run.argv.is_empty() {
                return Err(SandboxError::InvalidSpec {
                    field: "interactive program",
                    reason: format!(
                        "'{}' needs an absolute path and an argv[0]",
                        String::from_utf8_lossy(&run.program)
                    ),
                });
            }
            let argv = run
                .argv
                .iter()
                .map(|a| cstring("interactive argv", a.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            (cstring("interactive program", run.program.clone())?, argv)
        }
    };
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in &env {
        let mut kv = k.clone();
        kv.push(b'=');
        kv.extend_from_slice(v);
        envp.push(cstring("env", kv)?);
    }
    Ok(SandboxPlan {
        new_network: !spec.fixed_output,
        ops: o.ops,
        exec: ExecSpec {
            path,
            argv,
            env: envp,
        },
        env,
        build_dir,
        outputs: spec
            .outputs
            .iter()
            .map(|o| {
                (
                    spec.store_dir.display(o),
                    spec.dirs.store.join(o.base_name()),
                )
            })
            .collect(),
        cgroup: None,
        timeouts: if interactive.is_some() {
            Timeouts::default()
        } else {
            spec.timeouts
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("valid test store path")
    }

    const BUSYBOX: &str = "7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox";
    const OUT: &str = "1f2dhqa4ycv31xpsaw4bavv0ks2ir2fc-probe";

    pub(crate) fn spec() -> SandboxSpec {
        SandboxSpec {
            store_dir: StoreDir::default(),
            builder: format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
            args: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
            env: BTreeMap::from([(b"out".to_vec(), format!("/nix/store/{OUT}").into_bytes())]),
            inputs: vec![InputPath {
                source: PathBuf::from(format!("/s/nix/store/{BUSYBOX}")),
                path: sp(BUSYBOX),
            }],
            outputs: vec![sp(OUT)],
            dirs: SandboxDirs {
                root: PathBuf::from("/w/root"),
                build: PathBuf::from("/w/top/build"),
                store: PathBuf::from("/w/store"),
            },
            build_dir_name: DEFAULT_BUILD_DIR_NAME.to_owned(),
            user: BuildUser::new(30001, 30000, "sandoffbld1", "sandoffbld").expect("valid user"),
            fixed_output: false,
            impure_env: BTreeMap::new(),
            impure_env_allow: Vec::new(),
            limits: Limits::default(),
            cores: 4,
            timeouts: Timeouts::default(),
        }
    }

    fn s(x: &str) -> CString {
        CString::new(x).expect("no NUL")
    }

    fn env_str(plan: &SandboxPlan) -> Vec<(String, String)> {
        plan.env
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn env_is_exactly_nix_initenv() {
        let plan = plan(&spec()).expect("plan");
        let expected: Vec<(String, String)> = [
            ("HOME", "/homeless-shelter"),
            ("NIX_BUILD_CORES", "4"),
            ("NIX_BUILD_TOP", "/tmp/sandoff-build"),
            ("NIX_LOG_FD", "2"),
            ("NIX_STORE", "/nix/store"),
            ("PATH", "/path-not-set"),
            ("PWD", "/tmp/sandoff-build"),
            ("TEMP", "/tmp/sandoff-build"),
            ("TEMPDIR", "/tmp/sandoff-build"),
            ("TERM", "xterm-256color"),
            ("TMP", "/tmp/sandoff-build"),
            ("TMPDIR", "/tmp/sandoff-build"),
            ("out", &format!("/nix/store/{OUT}")),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env_str(&plan), expected);
        assert_eq!(plan.exec.env.len(), expected.len());
        assert_eq!(plan.exec.env[0], s("HOME=/homeless-shelter"));
    }

    #[test]
    fn derivation_env_cannot_override_build_dir_or_log_fd_but_can_override_path() {
        let mut sp = spec();
        for (k, v) in [
            ("PATH", "/x/bin"),
            ("HOME", "/h"),
            ("TMPDIR", "/evil"),
            ("NIX_LOG_FD", "7"),
            ("TERM", "dumb"),
        ] {
            sp.env.insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        let env = plan(&sp).expect("plan").env;
        assert_eq!(env[b"PATH".as_slice()], b"/x/bin");
        assert_eq!(env[b"HOME".as_slice()], b"/h");
        assert_eq!(env[b"TMPDIR".as_slice()], b"/tmp/sandoff-build");
        assert_eq!(env[b"NIX_LOG_FD".as_slice()], b"2");
        assert_eq!(env[b"TERM".as_slice()], b"xterm-256color");
    }

    #[test]
    fn pass_as_file_becomes_path_var_and_file_owned_by_builder() {
        let mut sp = spec();
        sp.env
            .insert(b"passAsFile".to_vec(), b" text\tother ".to_vec());
        sp.env.insert(b"text".to_vec(), b"hello\n".to_vec());
        sp.env.insert(b"other".to_vec(), b"x".to_vec());
        let p = plan(&sp).expect("plan");
        let name = pass_as_file_name(b"text");
        assert_eq!(name.len(), ".attr-".len() + 52);
        assert_eq!(
            p.env[b"textPath".as_slice()],
            format!("/tmp/sandoff-build/{name}").as_bytes()
        );
        assert!(!p.env.contains_key(b"text".as_slice()));
        assert!(!p.env.contains_key(b"other".as_slice()));
        assert_eq!(p.env[b"passAsFile".as_slice()], b" text\tother ");
        let write = p
            .ops
            .iter()
            .find(|op| matches!(op, SetupOp::WriteFile { path, .. } if path.to_bytes().ends_with(name.as_bytes())))
            .expect("passAsFile write");
        assert_eq!(
            write,
            &SetupOp::WriteFile {
                path: s(&format!("/w/root/tmp/sandoff-build/{name}")),
                contents: b"hello\n".to_vec(),
                mode: 0o600,
                owner: Some((30001, 30000)),
            }
        );
    }

    #[test]
    fn pass_as_file_name_matches_nix() {
        // nix-hash --type sha256 --to-base32 $(printf text | sha256sum | cut -d" " -f1)
        assert_eq!(
            pass_as_file_name(b"text"),
            ".attr-1lf969yddshzhld7sr1vbagr07bnygg99lgl6gk5kxcnp4z9wbcq"
        );
    }

    #[test]
    fn a_derivations_own_name_path_var_overrides_pass_as_file_as_in_nix() {
        let mut sp = spec();
        sp.env.insert(b"passAsFile".to_vec(), b"text".to_vec());
        sp.env.insert(b"text".to_vec(), b"x".to_vec());
        sp.env.insert(b"textPath".to_vec(), b"mine".to_vec());
        assert_eq!(
            plan(&sp).expect("plan").env[b"textPath".as_slice()],
            b"mine"
        );
    }

    #[test]
    fn fixed_output_gets_network_checked_flag_and_impure_env() {
        let mut sp = spec();
        sp.fixed_output = true;
        sp.impure_env
            .insert(b"http_proxy".to_vec(), b"http://p".to_vec());
        let p = plan(&sp).expect("plan");
        assert!(!p.new_network);
        assert_eq!(p.env[b"NIX_OUTPUT_CHECKED".as_slice()], b"1");
        assert_eq!(p.env[b"http_proxy".as_slice()], b"http://p");
        assert!(!p.ops.contains(&SetupOp::LoopbackUp));
        assert!(p.ops.iter().any(|op| matches!(op, SetupOp::Bind { source, optional: true, .. } if source == &s("/etc/resolv.conf"))));
        assert!(!p.ops.iter().any(
            |op| matches!(op, SetupOp::WriteFile { path, .. } if path == &s("/w/root/etc/hosts"))
        ));

        let sandboxed = plan(&spec()).expect("plan");
        assert!(sandboxed.new_network);
        assert!(!sandboxed.env.contains_key(b"NIX_OUTPUT_CHECKED".as_slice()));
        assert!(sandboxed.ops.contains(&SetupOp::LoopbackUp));
    }

    #[test]
    fn outputs_map_to_the_scratch_store() {
        let p = plan(&spec()).expect("plan");
        assert_eq!(
            p.outputs,
            vec![(
                format!("/nix/store/{OUT}"),
                PathBuf::from(format!("/w/store/{OUT}"))
            )]
        );
    }

    #[test]
    fn argv0_is_builder_basename() {
        let p = plan(&spec()).expect("plan");
        assert_eq!(
            p.exec.argv,
            vec![s("busybox"), s("sh"), s("-c"), s("echo hi")]
        );
        assert_eq!(p.exec.path, s(&format!("/nix/store/{BUSYBOX}/bin/busybox")));
    }

    #[test]
    fn etc_files_equal_golden_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/etc");
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect("fixture");
        assert_eq!(
            etc_passwd(30001, 30000, "/tmp/sandoff-build"),
            read("passwd")
        );
        assert_eq!(etc_group(30000), read("group"));
        assert_eq!(ETC_HOSTS, read("hosts"));
        let p = plan(&spec()).expect("plan");
        for (name, contents) in [
            ("passwd", read("passwd")),
            ("group", read("group")),
            ("hosts", read("hosts")),
        ] {
            let want = SetupOp::WriteFile {
                path: s(&format!("/w/root/etc/{name}")),
                contents: contents.into_bytes(),
                mode: 0o444,
                owner: None,
            };
            assert!(p.ops.contains(&want), "missing {want}");
        }
    }

    fn index(p: &SandboxPlan, pred: impl Fn(&SetupOp) -> bool) -> usize {
        p.ops.iter().position(pred).expect("op present")
    }

    #[test]
    fn order_is_fail_closed_and_privileges_drop_last() {
        let p = plan(&spec()).expect("plan");
        let private = index(&p, |o| *o == SetupOp::MakeMountsPrivate);
        let first_mount = index(&p, |o| matches!(o, SetupOp::MountTmpfs { .. }));
        let pivot = index(&p, |o| matches!(o, SetupOp::PivotRoot { .. }));
        let last_mount = p
            .ops
            .iter()
            .rposition(|o| {
                matches!(
                    o,
                    SetupOp::Bind { .. } | SetupOp::MountProc { .. } | SetupOp::MountTmpfs { .. }
                )
            })
            .expect("mounts");
        let ro = index(&p, |o| *o == SetupOp::RemountRootReadOnly);
        let bounding = index(&p, |o| *o == SetupOp::DropBoundingSet);
        let setuid = index(&p, |o| *o == SetupOp::SetUid(30001));
        let setgid = index(&p, |o| *o == SetupOp::SetGid(30000));
        let groups = index(&p, |o| *o == SetupOp::SetGroups(vec![]));
        let clear = index(&p, |o| *o == SetupOp::ClearCaps);
        let nnp = index(&p, |o| *o == SetupOp::NoNewPrivs);
        let seccomp = index(&p, |o| matches!(o, SetupOp::Seccomp(_)));
        assert!(private < first_mount);
        assert!(last_mount < pivot && pivot < ro);
        assert!(ro < bounding && bounding < groups && groups < setgid && setgid < setuid);
        assert!(setuid < clear && clear < nnp && nnp < seccomp);
        assert_eq!(p.ops.last(), Some(&SetupOp::Exec));
        assert_eq!(p.ops.iter().filter(|o| **o == SetupOp::Exec).count(), 1);
        // The death signal is re-armed after the uid change, which clears it.
        assert!(p.ops[setuid..].contains(&SetupOp::DieWithParent));
    }

    #[test]
    fn inputs_are_bound_read_only_nosuid_nodev_at_their_logical_path() {
        let p = plan(&spec()).expect("plan");
        assert!(p.ops.contains(&SetupOp::Bind {
            source: s(&format!("/s/nix/store/{BUSYBOX}")),
            target: s(&format!("/w/root/nix/store/{BUSYBOX}")),
            flags: MountFlags::INPUT,
            optional: false,
        }));
        assert_eq!(
            MountFlags::INPUT.bits(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV
        );
        // The scratch store comes first, so inputs land on top of it.
        let store = index(
            &p,
            |o| matches!(o, SetupOp::Bind { source, .. } if source == &s("/w/store")),
        );
        let input = index(
            &p,
            |o| matches!(o, SetupOp::Bind { flags, .. } if *flags == MountFlags::INPUT),
        );
        assert!(store < input);
    }

    #[test]
    fn root_holds_only_dev_etc_proc_tmp_and_the_store() {
        let p = plan(&spec()).expect("plan");
        let mut top: BTreeSet<String> = BTreeSet::new();
        for op in &p.ops {
            let path = match op {
                SetupOp::Mkdir { path, .. } | SetupOp::WriteFile { path, .. } => path,
                SetupOp::Symlink { link, .. } => link,
                _ => continue,
            };
            let rel = Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()))
                .strip_prefix("/w/root")
                .expect("under root")
                .to_path_buf();
            top.insert(
                rel.components()
                    .next()
                    .expect("non-empty")
                    .as_os_str()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        assert_eq!(
            top,
            BTreeSet::from(["dev", "etc", "nix", "proc", "tmp"].map(String::from))
        );
    }

    #[test]
    fn mkdir_all_creates_each_directory_once_parents_first() {
        let p = plan(&spec()).expect("plan");
        let dirs: Vec<String> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                SetupOp::Mkdir { path, .. } => Some(path.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let unique: BTreeSet<&String> = dirs.iter().collect();
        assert_eq!(unique.len(), dirs.len());
        let nix = dirs.iter().position(|d| d == "/w/root/nix").expect("nix");
        let store = dirs
            .iter()
            .position(|d| d == "/w/root/nix/store")
            .expect("store");
        assert!(nix < store);
    }

    #[test]
    fn guix_store_dir_works() {
        let mut sp = spec();
        sp.store_dir = StoreDir::new("/gnu/store").expect("valid");
        sp.inputs[0].source = PathBuf::from("/s/gnu/store/x");
        sp.builder = format!("/gnu/store/{BUSYBOX}/bin/busybox").into_bytes();
        let p = plan(&sp).expect("plan");
        assert_eq!(p.env[b"NIX_STORE".as_slice()], b"/gnu/store");
        assert!(p.ops.iter().any(|o| matches!(o, SetupOp::Bind { target, .. } if target == &s(&format!("/w/root/gnu/store/{BUSYBOX}")))));
    }

    #[test]
    fn rejects_bad_specs() {
        let mut a = spec();
        a.build_dir_name = "../x".to_owned();
        assert!(matches!(
            plan(&a),
            Err(SandboxError::InvalidSpec {
                field: "build dir name",
                ..
            })
        ));
        let mut b = spec();
        b.env.insert(b"x".to_vec(), b"a\0b".to_vec());
        assert!(matches!(
            plan(&b),
            Err(SandboxError::InvalidSpec { field: "env", .. })
        ));
        let mut c = spec();
        c.outputs.push(sp(BUSYBOX));
        assert!(matches!(
            plan(&c),
            Err(SandboxError::InvalidSpec {
                field: "inputs",
                ..
            })
        ));
        let mut d = spec();
        d.builder = b"busybox".to_vec();
        assert!(matches!(
            plan(&d),
            Err(SandboxError::InvalidSpec {
                field: "builder",
                ..
            })
        ));
        let mut e = spec();
        e.store_dir = StoreDir::new("/tmp/store").expect("valid");
        assert!(matches!(
            plan(&e),
            Err(SandboxError::InvalidSpec {
                field: "store dir",
                ..
            })
        ));
        assert!(BuildUser::new(0, 30000, "root", "x").is_err());
        assert!(BuildUser::new(30001, 30000, "a:b", "x").is_err());
    }

    #[test]
    fn every_build_gets_a_new_session_keyring_as_the_build_user_before_seccomp() {
        let p = plan(&spec()).expect("plan");
        let setuid = index(&p, |o| *o == SetupOp::SetUid(30001));
        let keyring = index(&p, |o| *o == SetupOp::NewSessionKeyring);
        let seccomp = index(&p, |o| matches!(o, SetupOp::Seccomp(_)));
        // After the uid change (the build user owns it), before the filter
        // that refuses keyctl.
        assert!(setuid < keyring && keyring < seccomp);
        assert_eq!(
            p.ops
                .iter()
                .filter(|o| **o == SetupOp::NewSessionKeyring)
                .count(),
            1
        );
    }

    #[test]
    fn process_limit_is_set_before_the_uid_change() {
        let mut sp = spec();
        sp.limits.max_processes = 77;
        let p = plan(&sp).expect("plan");
        let limit = index(&p, |o| *o == SetupOp::ProcessLimit(77));
        let setuid = index(&p, |o| *o == SetupOp::SetUid(30001));
        assert!(limit < setuid);
        sp.limits.max_processes = 0;
        assert!(matches!(
            plan(&sp),
            Err(SandboxError::InvalidSpec {
                field: "limits.max_processes",
                ..
            })
        ));
    }

    #[test]
    fn tmp_and_shm_are_bounded_tmpfs() {
        let tmpfs = |p: &SandboxPlan, target: &str| {
            p.ops
                .iter()
                .find_map(|o| match o {
                    SetupOp::MountTmpfs {
                        target: t, data, ..
                    } if t == &s(target) => Some(data.to_string_lossy().into_owned()),
                    _ => None,
                })
                .expect("tmpfs mount")
        };
        let p = plan(&spec()).expect("plan");
        assert_eq!(tmpfs(&p, "/w/root/tmp"), "mode=01777,size=25%");
        assert_eq!(tmpfs(&p, "/w/root/dev/shm"), "mode=01777,size=268435456");
        let mut sp = spec();
        sp.limits.tmp_size = TmpfsSize::Bytes(8 << 30);
        sp.limits.shm_size = TmpfsSize::PercentOfMemory(50);
        let p = plan(&sp).expect("plan");
        assert_eq!(tmpfs(&p, "/w/root/tmp"), "mode=01777,size=8589934592");
        assert_eq!(tmpfs(&p, "/w/root/dev/shm"), "mode=01777,size=50%");
    }

    #[test]
    fn tmpfs_sizes_parse_and_print() {
        for (text, size) in [
            ("4096", TmpfsSize::Bytes(4096)),
            ("256k", TmpfsSize::Bytes(256 << 10)),
            ("256m", TmpfsSize::Bytes(256 << 20)),
            ("2G", TmpfsSize::Bytes(2 << 30)),
            ("25%", TmpfsSize::PercentOfMemory(25)),
        ] {
            assert_eq!(TmpfsSize::parse(text), Ok(size), "{text}");
        }
        for bad in [
            "",
            "0",
            "0m",
            "m",
            "1t",
            "-1",
            "0%",
            "101%",
            "x%",
            "99999999999g",
        ] {
            assert!(TmpfsSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(DEFAULT_SHM_SIZE.to_string(), "256m");
        assert_eq!(DEFAULT_TMP_SIZE.to_string(), "25%");
        assert_eq!(
            TmpfsSize::parse(&DEFAULT_SHM_SIZE.to_string()),
            Ok(DEFAULT_SHM_SIZE)
        );
    }

    #[test]
    fn impure_env_passes_only_allowlisted_names_and_never_sandoff_settings() {
        let mut sp = spec();
        sp.fixed_output = true;
        for (k, v) in [
            ("http_proxy", "http://proxy:3128"),
            ("NIX_MIRRORS_gnu", "https://ftp.gnu.org/"),
            ("SANDOFF_STATE_DIR", "/var/sandoff"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("MY_TOKEN", "t"),
        ] {
            sp.impure_env.insert(k.into(), v.into());
        }
        let env = plan(&sp).expect("plan").env;
        assert_eq!(env[b"http_proxy".as_slice()], b"http://proxy:3128");
        assert_eq!(env[b"NIX_MIRRORS_gnu".as_slice()], b"https://ftp.gnu.org/");
        for k in ["SANDOFF_STATE_DIR", "AWS_SECRET_ACCESS_KEY", "MY_TOKEN"] {
            assert!(!env.contains_key(k.as_bytes()), "{k} passed");
        }
        // The allowlist extends; SANDOFF_* stays out whatever it says.
        sp.impure_env_allow = vec!["MY_TOKEN".into(), "SANDOFF_*".into(), "*".into()];
        let env = plan(&sp).expect("plan").env;
        assert_eq!(env[b"MY_TOKEN".as_slice()], b"t");
        assert!(!env.contains_key(b"SANDOFF_STATE_DIR".as_slice()));
        assert!(!impure_env_allowed(
            b"SANDOFF_STATE_DIR",
            &["SANDOFF_STATE_DIR".into()]
        ));
        assert!(impure_env_allowed(b"HTTPS_PROXY", &[]));
        assert!(!impure_env_allowed(b"NIX_MIRRORS", &[]));
    }

    #[test]
    fn duplicate_inputs_are_bound_once() {
        let mut sp = spec();
        sp.inputs.push(sp.inputs[0].clone());
        let p = plan(&sp).expect("plan");
        let n = p
            .ops
            .iter()
            .filter(|o| matches!(o, SetupOp::Bind { flags, .. } if *flags == MountFlags::INPUT))
            .count();
        assert_eq!(n, 1);
    }

    fn shell(stdio: InteractiveStdio) -> Interactive {
        Interactive {
            program: format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
            argv: vec![b"busybox".to_vec(), b"sh".to_vec()],
            env: BTreeMap::from([
                (b"TERM".to_vec(), b"screen".to_vec()),
                (b"PS1".to_vec(), b"$ ".to_vec()),
            ]),
            stdio,
        }
    }

    #[test]
    fn an_interactive_plan_is_the_builds_with_only_stdio_exec_and_limits_changed() {
        let mut sp = spec();
        sp.env.insert(b"passAsFile".to_vec(), b"text".to_vec());
        sp.env.insert(b"text".to_vec(), b"x".to_vec());
        sp.timeouts = Timeouts {
            max_silent: Some(Duration::from_secs(1)),
            total: Some(Duration::from_secs(2)),
        };
        let build = plan(&sp).expect("plan");
        let enter = plan_interactive(&sp, &shell(InteractiveStdio::Terminal)).expect("plan");
        // Every step of the build but its stdio and the passAsFile file
        // (left in the build directory by the build) is taken over as is:
        // the same mounts, ids, capabilities and seccomp filter.
        let expected: Vec<SetupOp> = build
            .ops
            .iter()
            .filter(|op| !matches!(op, SetupOp::WriteFile { owner: Some(_), .. }))
            .map(|op| match op {
                SetupOp::Stdio => SetupOp::Terminal,
                op => op.clone(),
            })
            .collect();
        assert_eq!(enter.ops, expected);
        assert_eq!(enter.new_network, build.new_network);
        let new_session = index(&enter, |o| *o == SetupOp::NewSession);
        let terminal = index(&enter, |o| *o == SetupOp::Terminal);
        let pivot = index(&enter, |o| matches!(o, SetupOp::PivotRoot { .. }));
        let setuid = index(&enter, |o| *o == SetupOp::SetUid(30001));
        assert!(new_session < pivot && pivot < terminal && terminal < setuid);
        assert_eq!(
            enter.exec.path,
            s(&format!("/nix/store/{BUSYBOX}/bin/busybox"))
        );
        assert_eq!(enter.exec.argv, vec![s("busybox"), s("sh")]);
        assert_eq!(enter.timeouts, Timeouts::default());
        // The build's environment, with the caller's TERM and PS1 over it.
        let mut env = build.env.clone();
        env.insert(b"TERM".to_vec(), b"screen".to_vec());
        env.insert(b"PS1".to_vec(), b"$ ".to_vec());
        assert_eq!(enter.env, env);
        assert!(enter.exec.env.contains(&s("TERM=screen")));
    }

    #[test]
    fn an_interactive_run_without_a_terminal_keeps_the_callers_fds_and_no_terminal() {
        let enter = plan_interactive(&spec(), &shell(InteractiveStdio::Inherit)).expect("plan");
        assert!(!enter.ops.contains(&SetupOp::Stdio));
        assert!(!enter.ops.contains(&SetupOp::Terminal));
        // Still its own session: no controlling terminal to inject input into.
        assert!(enter.ops.contains(&SetupOp::NewSession));
    }

    #[test]
    fn an_interactive_program_needs_an_absolute_path_and_argv0() {
        let mut run = shell(InteractiveStdio::Inherit);
        run.program = b"sh".to_vec();
        assert!(matches!(
            plan_interactive(&spec(), &run),
            Err(SandboxError::InvalidSpec {
                field: "interactive program",
                ..
            })
        ));
        let mut run = shell(InteractiveStdio::Inherit);
        run.argv.clear();
        assert!(plan_interactive(&spec(), &run).is_err());
    }
}
