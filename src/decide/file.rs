//! Finding and reading the machines file (the IO around the parsers).
//!
//! The file is `--machines FILE`, else `$SANDOFF_MACHINES`, else the first
//! that exists of [`DEFAULT_LOCATIONS`]. Its format is told from its name
//! and content ([`detect_format`]), so a Guix file works wherever it lives.
//! No file means no machines: everything builds locally.
//!
//! A build hook looks further ([`resolve_for_hook`]): Nix 1.x gives its
//! hook the machines in `NIX_REMOTE_SYSTEMS` (its `remote-systems.conf`,
//! Nix's format without the host-key field), and `guix offload` reads
//! `machines.scm` in Guix's configuration directory or nothing.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::guix_format::{self, Env, GuixMachinesError};
use super::machines::{Machine, MachineFormat};
use super::nix_format::{self, IncludeReader, NixMachinesError};
use crate::bounded::{self, BoundedError, MACHINES_FILE_LIMIT};

/// Where machines files are looked for, in order, when none is given.
pub const DEFAULT_LOCATIONS: [&str; 3] = [
    "/etc/sandoff/machines",
    "/etc/guix/machines.scm",
    "/etc/nix/machines",
];

/// The environment variable naming the machines file.
pub const ENV_VAR: &str = "SANDOFF_MACHINES";

/// Why the machines file could not be used.
#[derive(Debug, Error)]
pub enum MachinesFileError {
    #[error("cannot read machines file '{path}': {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: BoundedError,
    },
    #[error("NIX_REMOTE_SYSTEMS must be an absolute path, not '{}'", path.display())]
    RelativeRemoteSystems { path: PathBuf },
    #[error(transparent)]
    Nix(#[from] NixMachinesError),
    #[error(transparent)]
    Guix(#[from] GuixMachinesError),
}

/// The machines file to use: `explicit` (`--machines`), else `env_value`
/// (`$SANDOFF_MACHINES`), else the first of [`DEFAULT_LOCATIONS`] for which
/// `exists` holds. `None`: no machines file.
pub fn resolve(
    explicit: Option<&Path>,
    env_value: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if let Some(p) = explicit.or(env_value) {
        return Some(p.to_owned());
    }
    DEFAULT_LOCATIONS
        .iter()
        .map(Path::new)
        .find(|p| exists(p))
        .map(Path::to_owned)
}

/// A build hook's machines file, and its format when not told from the
/// file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookMachines {
    /// The file.
    pub path: PathBuf,
    /// `Some(Nix)` for `NIX_REMOTE_SYSTEMS`, whatever it looks like.
    pub format: Option<MachineFormat>,
}

/// The machines file of a build hook: `given` (`--machines`,
/// `$SANDOFF_MACHINES`), else `remote_systems` (`$NIX_REMOTE_SYSTEMS`,
/// which must be absolute, as Nix 1.x requires; read as Nix's format),
/// else the first of `defaults` for which `exists` holds. `Ok(None)`: no
/// machines file.
pub fn resolve_for_hook(
    given: Option<&Path>,
    remote_systems: Option<&Path>,
    defaults: &[PathBuf],
    exists: impl Fn(&Path) -> bool,
) -> Result<Option<HookMachines>, MachinesFileError> {
    if let Some(path) = given {
        return Ok(Some(HookMachines {
            path: path.to_owned(),
            format: None,
        }));
    }
    if let Some(path) = remote_systems {
        if !path.is_absolute() {
            return Err(MachinesFileError::RelativeRemoteSystems {
                path: path.to_owned(),
            });
        }
        return Ok(Some(HookMachines {
            path: path.to_owned(),
            format: Some(MachineFormat::Nix),
        }));
    }
    Ok(defaults
        .iter()
        .find(|p| exists(p))
        .map(|path| HookMachines {
            path: path.clone(),
            format: None,
        }))
}

/// Guix when the name ends in `.scm` or the first thing that is not blank or
/// a comment is `(` or `'` (or a Scheme-only comment `#|`, `#;`); Nix
/// otherwise.
pub fn detect_format(path: &Path, text: &str) -> MachineFormat {
    if path.extension().is_some_and(|e| e == "scm") {
        return MachineFormat::Guix;
    }
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if rest.starts_with("#|") || rest.starts_with("#;") {
            return MachineFormat::Guix;
        }
        if rest.starts_with('#') || rest.starts_with(';') {
            rest = rest.split_once('\n').map_or("", |(_, r)| r);
            continue;
        }
        return if rest.starts_with('(') || rest.starts_with('\'') {
            MachineFormat::Guix
        } else {
            MachineFormat::Nix
        };
    }
}

/// Parses machines-file text in the detected format. `default_system` fills
/// Nix entries without systems.
pub fn parse(
    path: &Path,
    text: &str,
    default_system: &str,
    includes: &dyn IncludeReader,
    env: &dyn Env,
) -> Result<Vec<Machine>, MachinesFileError> {
    parse_as(path, text, None, default_system, includes, env)
}

/// [`parse`] in `format`, or the detected one when `None`.
pub fn parse_as(
    path: &Path,
    text: &str,
    format: Option<MachineFormat>,
    default_system: &str,
    includes: &dyn IncludeReader,
    env: &dyn Env,
) -> Result<Vec<Machine>, MachinesFileError> {
    let name = path.display().to_string();
    Ok(match format.unwrap_or_else(|| detect_format(path, text)) {
        MachineFormat::Guix => guix_format::parse(text, &name, env)?,
        MachineFormat::Nix => nix_format::parse(text, &name, default_system, includes)?,
    })
}

/// Reads the machines file at `path` from the file system (includes
/// relative to the working directory, `getenv` from the process). It must
/// be a regular file of at most [`MACHINES_FILE_LIMIT`] bytes: a FIFO or a
/// device is refused at once instead of hanging or filling memory.
pub fn load(path: &Path, default_system: &str) -> Result<Vec<Machine>, MachinesFileError> {
    load_as(path, None, default_system)
}

/// [`load`] in `format`, or the detected one when `None`.
pub fn load_as(
    path: &Path,
    format: Option<MachineFormat>,
    default_system: &str,
) -> Result<Vec<Machine>, MachinesFileError> {
    let text = bounded::read_file_to_string(path, MACHINES_FILE_LIMIT).map_err(|source| {
        MachinesFileError::Read {
            path: path.to_owned(),
            source,
        }
    })?;
    parse_as(
        path,
        &text,
        format,
        default_system,
        &nix_format::FsIncludes,
        &guix_format::ProcessEnv,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_beats_env_beats_defaults() {
        let a = Path::new("/a");
        let b = Path::new("/b");
        assert_eq!(resolve(Some(a), Some(b), |_| true), Some(a.to_owned()));
        assert_eq!(resolve(None, Some(b), |_| true), Some(b.to_owned()));
        assert_eq!(
            resolve(None, None, |p| p.ends_with("machines.scm")
                || p.starts_with("/etc/nix")),
            Some(PathBuf::from("/etc/guix/machines.scm"))
        );
        assert_eq!(resolve(None, None, |_| false), None);
    }

    #[test]
    fn a_hook_takes_given_then_nix_remote_systems_then_defaults() {
        let given = Path::new("/given");
        let nix = Path::new("/etc/remote-systems.conf");
        let defaults = [PathBuf::from("/d1"), PathBuf::from("/d2")];
        let found = |given, nix, exists: &dyn Fn(&Path) -> bool| {
            resolve_for_hook(given, nix, &defaults, exists).expect("resolved")
        };
        let at = |p: &str, format| {
            Some(HookMachines {
                path: PathBuf::from(p),
                format,
            })
        };
        assert_eq!(found(Some(given), Some(nix), &|_| true), at("/given", None));
        assert_eq!(
            found(None, Some(nix), &|_| true),
            at("/etc/remote-systems.conf", Some(MachineFormat::Nix))
        );
        assert_eq!(found(None, None, &|p| p.ends_with("d2")), at("/d2", None));
        assert_eq!(found(None, None, &|_| false), None);
        // Nix 1.x requires an absolute path; a relative one is refused
        // rather than read from wherever the daemon runs.
        let e = resolve_for_hook(None, Some(Path::new("machines")), &defaults, |_| true)
            .expect_err("relative");
        assert_eq!(
            e.to_string(),
            "NIX_REMOTE_SYSTEMS must be an absolute path, not 'machines'"
        );
    }

    #[test]
    fn detects_format_by_name_and_content() {
        let nix = Path::new("/etc/sandoff/machines");
        assert_eq!(
            detect_format(Path::new("x.scm"), "host"),
            MachineFormat::Guix
        );
        assert_eq!(
            detect_format(nix, "# c\n  ; c\n (list)"),
            MachineFormat::Guix
        );
        assert_eq!(detect_format(nix, "#| c |#"), MachineFormat::Guix);
        assert_eq!(
            detect_format(nix, "# c\nnix@host x86_64-linux"),
            MachineFormat::Nix
        );
        assert_eq!(detect_format(nix, ""), MachineFormat::Nix);
    }
}
