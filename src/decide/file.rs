//! Finding and reading the machines file (the IO around the parsers).
//!
//! The file is `--machines FILE`, else `$SANDOFF_MACHINES`, else the first
//! that exists of [`DEFAULT_LOCATIONS`]. Its format is told from its name
//! and content ([`detect_format`]), so a Guix file works wherever it lives.
//! No file means no machines: everything builds locally.

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
    let name = path.display().to_string();
    Ok(match detect_format(path, text) {
        MachineFormat::Guix => guix_format::parse(text, &name, env)?,
        MachineFormat::Nix => nix_format::parse(text, &name, default_system, includes)?,
    })
}

/// Reads the machines file at `path` from the file system (includes
/// relative to the working directory, `getenv` from the process). It must
/// be a regular file of at most [`MACHINES_FILE_LIMIT`] bytes: a FIFO or a
/// device is refused at once instead of hanging or filling memory.
pub fn load(path: &Path, default_system: &str) -> Result<Vec<Machine>, MachinesFileError> {
    let text = bounded::read_file_to_string(path, MACHINES_FILE_LIMIT).map_err(|source| {
        MachinesFileError::Read {
            path: path.to_owned(),
            source,
        }
    })?;
    parse(
        path,
        &text,
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
