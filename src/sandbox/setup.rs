//! `sandoff setup`: the one-time, idempotent, root-only preparation of a
//! machine: the build-users group and its users, and the state directories.
//!
//! Users are created with the system's `groupadd`, `useradd` and `usermod`
//! (shadow-utils), as Nix's and Guix's installers do: system accounts, no
//! home, `nologin`, listed as members of the group (the pool reads `gr_mem`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Group, User};

/// The default build-users group.
pub const DEFAULT_GROUP: &str = "sandoffbld";

/// The default number of build users.
pub const DEFAULT_USER_COUNT: u32 = 10;

/// The state sub-directories and their modes.
pub const STATE_DIRS: [(&str, u32); 5] = [
    ("db", 0o755),
    ("keys", 0o700),
    ("log", 0o755),
    ("userpool", 0o700),
    ("locks", 0o700),
];

/// Errors of `sandoff setup`.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Not running as root.
    #[error("setup must run as root (it creates users, groups and root-owned directories)")]
    NotRoot,
    /// An existing group was asked for and does not exist.
    #[error("build users group '{group}' does not exist; create it or omit --build-users-group")]
    NoSuchGroup {
        /// The group name.
        group: String,
    },
    /// A tool could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{program} {args} failed ({status}): {stderr}")]
    Command {
        /// The program.
        program: &'static str,
        /// Its arguments, joined.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Looking up the user database failed.
    #[error("cannot look up '{name}' in the user database: {source}")]
    Lookup {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Which build users to set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildUsers {
    /// Create (if absent) group `group` and users `<group>1..=count`.
    Create {
        /// The group name.
        group: String,
        /// How many users.
        count: u32,
    },
    /// Use an existing group (such as Nix's `nixbld`) as it is.
    Existing {
        /// The group name.
        group: String,
    },
}

/// What setup found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupReport {
    /// The build-users group.
    pub group: String,
    /// Its gid.
    pub gid: u32,
    /// Its members.
    pub members: Vec<String>,
    /// Accounts created (group and users) by this run.
    pub created: Vec<String>,
}

fn run(program: &'static str, args: &[&str]) -> Result<(), SetupError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| SetupError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(SetupError::Command {
            program,
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn lookup_err(name: &str) -> impl FnOnce(nix::Error) -> SetupError + '_ {
    move |e| SetupError::Lookup {
        name: name.to_owned(),
        source: e.into(),
    }
}

fn group(name: &str) -> Result<Option<Group>, SetupError> {
    Group::from_name(name).map_err(lookup_err(name))
}

/// Creates the group and users if absent (idempotent: existing accounts are
/// kept; an existing user missing from the group is added to it).
pub fn ensure_build_users(which: &BuildUsers) -> Result<SetupReport, SetupError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(SetupError::NotRoot);
    }
    let mut created = Vec::new();
    let name = match which {
        BuildUsers::Existing { group: g } => {
            if group(g)?.is_none() {
                return Err(SetupError::NoSuchGroup { group: g.clone() });
            }
            g
        }
        BuildUsers::Create { group: g, count } => {
            if group(g)?.is_none() {
                run("groupadd", &["--system", g])?;
                created.push(g.clone());
            }
            let members = group(g)?.map(|gr| gr.mem).unwrap_or_default();
            for i in 1..=*count {
                let user = format!("{g}{i}");
                if User::from_name(&user).map_err(lookup_err(&user))?.is_none() {
                    let comment = format!("sandoff build user {i}");
                    run(
                        "useradd",
                        &[
                            "--system",
                            "--no-create-home",
                            "--home-dir",
                            "/var/empty",
                            "--shell",
                            "/usr/sbin/nologin",
                            "--gid",
                            g,
                            "--groups",
                            g,
                            "--comment",
                            &comment,
                            &user,
                        ],
                    )?;
                    created.push(user);
                } else if !members.contains(&user) {
                    run("usermod", &["--append", "--groups", g, &user])?;
                }
            }
            g
        }
    };
    let gr = group(name)?.ok_or_else(|| SetupError::NoSuchGroup {
        group: name.clone(),
    })?;
    Ok(SetupReport {
        group: name.clone(),
        gid: gr.gid.as_raw(),
        members: gr.mem,
        created,
    })
}

/// Creates `<state>/{db,keys,log,userpool,locks}` (idempotent; modes are
/// enforced on existing directories too).
pub fn ensure_state_dirs(state: &Path) -> Result<(), SetupError> {
    for (name, mode) in STATE_DIRS {
        let path = state.join(name);
        let err = |source| SetupError::StateDir {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&path)
            .map_err(err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    // TODO(keys): generate this machine's signing key pair in <state>/keys
    // (Nix format) if absent, once the key module lands.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dirs_are_created_idempotently_with_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var/sandoff");
        ensure_state_dirs(&state).expect("first");
        ensure_state_dirs(&state).expect("second");
        for (name, mode) in STATE_DIRS {
            let m = std::fs::metadata(state.join(name))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(m & 0o7777, mode, "{name}");
        }
    }
}
