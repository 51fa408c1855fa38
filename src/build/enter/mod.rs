//! Entering a failed build's sandbox (`sandoff enter DIR`): the build's own
//! world, to investigate the failure in.
//!
//! When a local build fails and its directory is kept (`--keep-failed`),
//! [`save`] writes `sandbox.json` beside its `build/`, `store/` and `root/`
//! directories: what is needed to set its sandbox up again, as a
//! [`SandboxSpec`] without what depends on where the directory is (the host
//! directories, found next to the file) or on the run (time limits). The
//! failure message then names `sandoff enter <dir>`. The file's format is
//! `saved.rs`'s.
//!
//! [`KeptBuild::open`] reads it back, [`KeptBuild::check_inputs`] checks
//! that every path of the input closure is still valid in the store (a
//! path deleted since is a clear error, not a missing mount), and
//! [`KeptBuild::run`] runs [`crate::sandbox::run_interactive`]: the same
//! plan as the build's (namespaces, mounts, input closure, `/etc`, build
//! user, capabilities, seccomp filter), in the build directory as the build
//! left it, with the builder replaced by a shell or a command. The same
//! build user is leased first, through the lock directory the build used,
//! so that no build runs as that uid meanwhile, and its processes are killed
//! before and after as for a build.
//!
//! # Choices
//!
//! - The file is root's (0600 in a directory only root can write), and
//!   [`KeptBuild::open`] refuses it otherwise: it decides what is mounted
//!   where, as root. The host directories are never taken from it, and the
//!   input paths' places on the host come from the recorded store, not from
//!   the file.
//! - The store is recorded in the file (directory, root, state, a daemon's
//!   database), so the printed command works without the store options of
//!   the build that failed.
//! - The shell, unless `--shell PATH` names one (a path inside the
//!   sandbox): the first `bin/bash`, then the first `bin/sh` of the input
//!   closure (the builder's own store path first), else `busybox sh` from
//!   a `bin/busybox` of the closure, as a Nix user gets bash from
//!   `nix develop`, `breakpointHook` or `cntr attach`; no shell in the
//!   closure is an error that says to pass `--shell`. A command (`sandoff
//!   enter DIR -- CMD...`) is run by that shell as `"$@"`, so builtins and
//!   (for busybox) applets need no `PATH`.
//! - The environment is the builder's initial one (as Nix and
//!   [`crate::sandbox::plan::builder_env`] give it: `PATH=/path-not-set`
//!   unless the derivation sets it; what the builder exported later is
//!   gone, as in `nix-shell` before `source $stdenv/setup`), plus the
//!   user's `TERM` and a prompt `PS1` that says where the shell is.
//! - The exit status of the shell or command is `sandoff enter`'s (128 +
//!   the signal if it was killed).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::bounded::{self, BoundedError};
use crate::sandbox::{
    run_interactive, BuildOutcome, BuildUser, InputPath, Interactive, InteractiveStdio,
    SandboxDirs, SandboxError, SandboxSpec, UserError, UserLease, UserPool,
};
use crate::store::local::StoreError;
use crate::store::{StoreLocation, StorePath};

use super::builds_dir;

mod saved;

use saved::Saved;

/// The file of a kept build directory that [`save`] writes.
pub const SAVED_FILE: &str = "sandbox.json";

/// The most [`SAVED_FILE`] may hold (a derivation's environment can be
/// large, and `.drv` files are bounded at 64 MiB).
const SAVED_LIMIT: u64 = 128 << 20;

/// The prompt of an interactive shell: where it is, as `nix-shell`'s
/// `[nix-shell:\w]$ ` says so (bash and busybox sh both expand `\w`).
pub const PROMPT: &str = "[sandoff-enter:\\w]\\$ ";

/// Why a kept build cannot be entered.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// Only root can set a sandbox up.
    #[error("entering a build's sandbox needs root (it mounts and changes to the build user)")]
    NotRoot,
    /// The directory has no [`SAVED_FILE`].
    #[error("{dir} is not a kept build directory that can be entered (it has no {SAVED_FILE}: give the directory `sandoff build --keep-failed` named, kept by a sandoff that saves it)")]
    NotSaved {
        /// The directory.
        dir: PathBuf,
    },
    /// Reading or writing failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BoundedError,
    },
    /// Someone besides root could have changed what would be mounted.
    #[error("refusing {path}: {reason}")]
    Unsafe {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is not what [`save`] writes.
    #[error("{path} is not a saved sandbox: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The build user is gone or changed since the build.
    #[error("the build ran as '{user}' (uid {uid}, group '{group}' gid {gid}), which {reason}")]
    UserGone {
        /// The user's name.
        user: String,
        /// Its uid then.
        uid: u32,
        /// The group's name.
        group: String,
        /// Its gid then.
        gid: u32,
        /// What changed.
        reason: String,
    },
    /// An input of the build is no longer in the store.
    #[error("input '{path}' of the build is no longer valid in the store (deleted since the build failed?): the sandbox cannot be set up as it was; build again with --keep-failed")]
    InputGone {
        /// The store path, in full.
        path: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No shell was given and none is in the input closure.
    #[error("no shell in the build's input closure (no bin/bash, bin/sh or bin/busybox in its {inputs} paths): name one with --shell PATH (a path inside the sandbox)")]
    NoShell {
        /// How many input paths were searched.
        inputs: usize,
    },
    /// `--shell` is not a path inside the sandbox.
    #[error("--shell '{shell}' is not an absolute path (it names a program inside the sandbox, such as /tmp/sandoff-build/bin/sh)")]
    RelativeShell {
        /// What was given.
        shell: String,
    },
    /// The build user could not be leased.
    #[error(transparent)]
    Users(#[from] UserError),
    /// The sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// Where the host directories of a kept build are: `build`, `store` and
/// `root` under its top directory (see [`crate::sandbox::HostDirs`]).
fn kept_dirs(top: &Path) -> SandboxDirs {
    SandboxDirs {
        root: top.join("root"),
        build: top.join("build"),
        store: top.join("store"),
    }
}

/// Writes [`SAVED_FILE`] into `top`, the kept directory of the failed build
/// of `drv` in `loc` that ran `spec`, its user leased from `pool`: root's,
/// mode 0600 (it may hold proxy settings of a fixed-output build).
pub fn save(
    top: &Path,
    drv: &StorePath,
    loc: &StoreLocation,
    pool: &UserPool,
    spec: &SandboxSpec,
) -> Result<(), EnterError> {
    let path = top.join(SAVED_FILE);
    let saved = Saved::new(drv, loc, pool.lock_dir(), spec);
    let json = serde_json::to_vec_pretty(&saved).expect("plain data serialises");
    let io_err = |action| {
        let path = path.clone();
        move |source| EnterError::Io {
            action,
            path,
            source,
        }
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err("create"))?;
    file.write_all(&json).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("write"))
}

/// [`save`] for a build whose directory is being kept; a failure is a
/// warning (the directory is still kept, only `sandoff enter` will refuse
/// it, saying why).
pub fn save_or_warn(
    top: &Path,
    drv: &StorePath,
    loc: &StoreLocation,
    pool: &UserPool,
    spec: &SandboxSpec,
) {
    if let Err(e) = save(top, drv, loc, pool, spec) {
        tracing::warn!(dir = %top.display(), "cannot save the sandbox for `sandoff enter`: {e}");
    }
}

/// A kept build directory read back: what [`save`] wrote, checked.
#[derive(Debug)]
pub struct KeptBuild {
    top: PathBuf,
    drv: String,
    loc: StoreLocation,
    pool_dir: PathBuf,
    spec: SandboxSpec,
}

/// Refuses `path` unless it is root's and only root can write it.
fn root_only(path: &Path, meta: &fs::Metadata, max_mode: u32) -> Result<(), EnterError> {
    let unsafe_ = |reason: String| EnterError::Unsafe {
        path: path.to_owned(),
        reason,
    };
    if meta.uid() != 0 {
        return Err(unsafe_(format!("owned by uid {}, not root", meta.uid())));
    }
    if meta.mode() & 0o7777 & !max_mode != 0 {
        return Err(unsafe_(format!(
            "mode {:o} lets others change it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

impl KeptBuild {
    /// Reads the kept build directory `top` (what `sandoff build
    /// --keep-failed` named). Needs root.
    pub fn open(top: &Path) -> Result<KeptBuild, EnterError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(EnterError::NotRoot);
        }
        let meta = fs::symlink_metadata(top).map_err(|source| EnterError::Io {
            action: "read",
            path: top.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(EnterError::Unsafe {
                path: top.to_owned(),
                reason: "not a directory".to_owned(),
            });
        }
        root_only(top, &meta, 0o755)?;
        let path = top.join(SAVED_FILE);
        let bytes = match bounded::read_file_no_follow(&path, SAVED_LIMIT) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(EnterError::NotSaved {
                    dir: top.to_owned(),
                })
            }
            Err(source) => return Err(EnterError::Read { path, source }),
        };
        let meta = fs::symlink_metadata(&path).map_err(|source| EnterError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        root_only(&path, &meta, 0o600)?;
        let invalid = |reason: String| EnterError::Invalid {
            path: path.clone(),
            reason,
        };
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let dirs = kept_dirs(top);
        for dir in [&dirs.root, &dirs.build, &dirs.store] {
            match fs::symlink_metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(EnterError::Unsafe {
                        path: dir.clone(),
                        reason: "not a directory".to_owned(),
                    })
                }
                Err(source) => {
                    return Err(EnterError::Io {
                        action: "read",
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        let (loc, user, spec) = saved.spec(dirs).map_err(invalid)?;
        check_mount_points(&spec)?;
        check_user(&user)?;
        Ok(KeptBuild {
            top: top.to_owned(),
            drv: saved.drv,
            loc,
            pool_dir: saved.user_pool_dir,
            spec,
        })
    }

    /// The derivation whose build this was, in full.
    pub fn drv(&self) -> &str {
        &self.drv
    }

    /// The build user.
    pub fn user(&self) -> &BuildUser {
        &self.spec.user
    }

    /// The sandbox as it will be set up (host directories of the kept build).
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// Checks that every input path is still valid in the store and on disk:
    /// the sandbox binds them all, as the build had them.
    pub fn check_inputs(&self) -> Result<(), EnterError> {
        let store = crate::derivation::check::open_store(self.loc.clone())?;
        for input in &self.spec.inputs {
            let gone = || EnterError::InputGone {
                path: self.loc.logical(&input.path),
            };
            if !store.is_valid(&input.path)? {
                return Err(gone());
            }
            if fs::symlink_metadata(&input.source).is_err() {
                return Err(gone());
            }
        }
        Ok(())
    }

    /// The shell to run: `chosen` (a path inside the sandbox), else the
    /// first `bin/bash`, then `bin/sh` of the input closure (the builder's
    /// store path first), else `busybox sh`; see the module docs.
    pub fn shell(&self, chosen: Option<&[u8]>) -> Result<Shell, EnterError> {
        if let Some(path) = chosen {
            if !path.starts_with(b"/") {
                return Err(EnterError::RelativeShell {
                    shell: String::from_utf8_lossy(path).into_owned(),
                });
            }
            return Ok(Shell::at(path, &[]));
        }
        let builder_path = self.spec.inputs.iter().find(|i| {
            let dir = format!("{}/", self.loc.logical(&i.path));
            self.spec.builder.starts_with(dir.as_bytes())
        });
        let order: Vec<&InputPath> = builder_path
            .into_iter()
            .chain(self.spec.inputs.iter())
            .collect();
        for (file, args) in [
            ("bin/bash", &[][..]),
            ("bin/sh", &[][..]),
            ("bin/busybox", &[&b"sh"[..]][..]),
        ] {
            for input in &order {
                if fs::symlink_metadata(input.source.join(file)).is_ok() {
                    let path = format!("{}/{file}", self.loc.logical(&input.path));
                    return Ok(Shell::at(path.as_bytes(), args));
                }
            }
        }
        Err(EnterError::NoShell {
            inputs: self.spec.inputs.len(),
        })
    }

    /// What to run: `shell`, or `command` run by it, with the stdio
    /// given; `term` is the user's `TERM` (passed on, so their terminal
    /// works as outside).
    pub fn interactive(
        &self,
        shell: &Shell,
        command: &[Vec<u8>],
        stdio: InteractiveStdio,
        term: Option<Vec<u8>>,
    ) -> Interactive {
        let mut argv = shell.argv.clone();
        if !command.is_empty() {
            // `"$@"`: the command's words as given, found by the shell
            // (builtins, busybox applets, PATH).
            argv.extend([
                b"-c".to_vec(),
                b"\"$@\"".to_vec(),
                b"sandoff-enter".to_vec(),
            ]);
            argv.extend(command.iter().cloned());
        }
        let mut env = BTreeMap::from([(b"PS1".to_vec(), PROMPT.as_bytes().to_vec())]);
        if let Some(term) = term.filter(|t| !t.is_empty()) {
            env.insert(b"TERM".to_vec(), term);
        }
        Interactive {
            program: shell.program.clone(),
            argv,
            env,
            stdio,
        }
    }

    /// Leases the build's user (through the lock directory the build
    /// used): `None` if a build is running as it, when `wait` is `None`;
    /// else checks again every `wait` until it is free.
    pub fn lease(&self, wait: Option<Duration>) -> Result<Option<UserLease>, EnterError> {
        let pool = UserPool::new(vec![self.spec.user.clone()], &self.pool_dir)?;
        Ok(match wait {
            None => pool.try_acquire()?,
            Some(poll) => Some(pool.acquire(poll)?),
        })
    }

    /// Runs `run` in the build's sandbox as `lease`'s user, in the build
    /// directory as the build left it; returns how it ended.
    pub fn run(&self, lease: &UserLease, run: &Interactive) -> Result<BuildOutcome, EnterError> {
        tracing::debug!(dir = %self.top.display(), drv = %self.drv, "entering a kept build");
        Ok(run_interactive(lease, &self.spec, run)?)
    }
}

/// The shell `sandoff enter` runs: a path inside the sandbox and its argv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shell {
    /// The program, inside the sandbox.
    pub program: Vec<u8>,
    /// Its argv (`argv[0]` its base name, as for a builder).
    pub argv: Vec<Vec<u8>>,
}

impl Shell {
    fn at(path: &[u8], args: &[&[u8]]) -> Shell {
        let base = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
        let mut argv = vec![base.to_vec()];
        argv.extend(args.iter().map(|a| a.to_vec()));
        Shell {
            program: path.to_vec(),
            argv,
        }
    }
}

/// In the scratch store, which the builder could write, an input's name
/// can only be the mount point the build's setup made (root's, and busy
/// while the build ran): anything else (a symlink the setup's bind would
/// follow) is refused rather than mounted on.
fn check_mount_points(spec: &SandboxSpec) -> Result<(), EnterError> {
    for input in &spec.inputs {
        let point = spec.dirs.store.join(input.path.base_name());
        let meta = match fs::symlink_metadata(&point) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(EnterError::Io {
                    action: "read",
                    path: point,
                    source,
                })
            }
        };
        if meta.file_type().is_symlink() || meta.uid() != 0 {
            return Err(EnterError::Unsafe {
                path: point,
                reason: "an input's mount point in the scratch store is not the one the build's setup made".to_owned(),
            });
        }
    }
    Ok(())
}

/// The build user must still be the account the build ran as: same name,
/// uid, group and gid.
fn check_user(user: &BuildUser) -> Result<(), EnterError> {
    let gone = |reason: String| EnterError::UserGone {
        user: user.user_name().to_owned(),
        uid: user.uid(),
        group: user.group_name().to_owned(),
        gid: user.gid(),
        reason,
    };
    let lookup = |e: nix::Error| gone(format!("cannot be looked up: {e}"));
    match nix::unistd::User::from_name(user.user_name()).map_err(lookup)? {
        None => return Err(gone("no longer exists".to_owned())),
        Some(pw) if pw.uid.as_raw() != user.uid() => {
            return Err(gone(format!("now has uid {}", pw.uid)))
        }
        Some(_) => {}
    }
    match nix::unistd::Group::from_name(user.group_name()).map_err(lookup)? {
        None => Err(gone("has no group of that name any more".to_owned())),
        Some(gr) if gr.gid.as_raw() != user.gid() => {
            Err(gone(format!("has a group that now has gid {}", gr.gid)))
        }
        Some(_) => Ok(()),
    }
}

/// The newest kept directory of a failed build of `drv` (in full) under
/// `loc`'s build directories, for `sandoff build --shell-on-failure`.
pub fn find_kept(loc: &StoreLocation, drv: &str) -> Option<PathBuf> {
    #[derive(Deserialize)]
    struct DrvOnly {
        drv: String,
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for slot in fs::read_dir(builds_dir(loc)).ok()?.flatten() {
        let Ok(tops) = fs::read_dir(slot.path()) else {
            continue;
        };
        for top in tops.flatten() {
            let file = top.path().join(SAVED_FILE);
            let Ok(bytes) = bounded::read_file_no_follow(&file, SAVED_LIMIT) else {
                continue;
            };
            let Ok(saved) = serde_json::from_slice::<DrvOnly>(&bytes) else {
                continue;
            };
            let Ok(modified) = fs::symlink_metadata(&file).and_then(|m| m.modified()) else {
                continue;
            };
            if saved.drv == drv && newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, top.path()));
            }
        }
    }
    newest.map(|(_, p)| p)
}
#[cfg(test)]
mod tests {
    use super::saved::tests::{spec, BUSYBOX, DRV};
    use super::*;
    use crate::store::StoreDir;

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("valid")
    }

    fn kept(inputs: &[(&str, &[&str])]) -> (tempfile::TempDir, KeptBuild) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let loc = StoreLocation::new(StoreDir::default(), tmp.path().to_owned());
        let mut sp_ = spec(kept_dirs(tmp.path()));
        sp_.inputs = inputs
            .iter()
            .map(|(base, files)| {
                let path = sp(base);
                let source = loc.real_path(&path);
                for f in *files {
                    let file = source.join(f);
                    fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
                    fs::write(file, "").expect("write");
                }
                InputPath { source, path }
            })
            .collect();
        let kept = KeptBuild {
            top: tmp.path().to_owned(),
            drv: format!("/nix/store/{DRV}"),
            loc,
            pool_dir: PathBuf::from("/p"),
            spec: sp_,
        };
        (tmp, kept)
    }

    const BASH: &str = "0c0v0kbrrdc2cqgisi78jdqxn73n3401-bash";
    const COREUTILS: &str = "1c0v0kbrrdc2cqgisi78jdqxn73n3401-coreutils";

    #[test]
    fn the_shell_is_bash_then_sh_of_the_closure_then_busybox_sh() {
        let (_t, k) = kept(&[
            (BUSYBOX, &["bin/busybox"]),
            (COREUTILS, &["bin/sh"]),
            (BASH, &["bin/bash", "bin/sh"]),
        ]);
        let bash = k.shell(None).expect("shell");
        assert_eq!(
            bash.program,
            format!("/nix/store/{BASH}/bin/bash").into_bytes()
        );
        assert_eq!(bash.argv, vec![b"bash".to_vec()]);

        let (_t, k) = kept(&[(BUSYBOX, &["bin/busybox"]), (COREUTILS, &["bin/sh"])]);
        assert_eq!(
            k.shell(None).expect("shell").program,
            format!("/nix/store/{COREUTILS}/bin/sh").into_bytes()
        );

        let (_t, k) = kept(&[(BUSYBOX, &["bin/busybox"]), (COREUTILS, &["bin/ls"])]);
        let bb = k.shell(None).expect("shell");
        assert_eq!(
            bb.program,
            format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes()
        );
        assert_eq!(bb.argv, vec![b"busybox".to_vec(), b"sh".to_vec()]);

        let (_t, k) = kept(&[(COREUTILS, &["bin/ls"])]);
        assert!(matches!(
            k.shell(None),
            Err(EnterError::NoShell { inputs: 1 })
        ));
        // --shell chooses, whatever the closure holds.
        let chosen = k.shell(Some(b"/tmp/sandoff-build/bin/sh")).expect("chosen");
        assert_eq!(chosen.argv, vec![b"sh".to_vec()]);
        assert!(matches!(
            k.shell(Some(b"sh")),
            Err(EnterError::RelativeShell { .. })
        ));
    }

    #[test]
    fn the_builders_own_store_path_gives_the_shell_first() {
        let (_t, mut k) = kept(&[(COREUTILS, &["bin/sh"]), (BASH, &["bin/sh"])]);
        k.spec.builder = format!("/nix/store/{BASH}/bin/sh").into_bytes();
        assert_eq!(
            k.shell(None).expect("shell").program,
            format!("/nix/store/{BASH}/bin/sh").into_bytes()
        );
    }

    #[test]
    fn a_command_runs_through_the_shell_with_the_users_term_and_a_prompt() {
        let (_t, k) = kept(&[(BUSYBOX, &["bin/busybox"])]);
        let shell = k.shell(None).expect("shell");
        let run = k.interactive(
            &shell,
            &[b"id".to_vec(), b"-u".to_vec()],
            InteractiveStdio::Inherit,
            Some(b"screen-256color".to_vec()),
        );
        assert_eq!(
            run.argv,
            ["busybox", "sh", "-c", "\"$@\"", "sandoff-enter", "id", "-u"]
                .map(|a| a.as_bytes().to_vec())
        );
        assert_eq!(run.env[b"TERM".as_slice()], b"screen-256color");
        assert_eq!(run.env[b"PS1".as_slice()], PROMPT.as_bytes());
        let run = k.interactive(&shell, &[], InteractiveStdio::Terminal, None);
        assert_eq!(run.argv, shell.argv);
        assert!(!run.env.contains_key(b"TERM".as_slice()));
    }

    #[test]
    fn a_build_user_gone_or_changed_since_the_build_is_refused_naming_it() {
        let gone =
            BuildUser::new(30001, 30000, "sandoff-no-such-user", "sandoffbld").expect("user");
        let err = check_user(&gone).expect_err("gone");
        assert!(
            err.to_string()
                .contains("'sandoff-no-such-user' (uid 30001"),
            "{err}"
        );
        assert!(err.to_string().ends_with("no longer exists"), "{err}");
        let moved = BuildUser::new(12345, 12345, "root", "root").expect("user");
        let err = check_user(&moved).expect_err("changed");
        assert!(err.to_string().ends_with("now has uid 0"), "{err}");
    }
}
