//! Why realising failed: [`BuildError`] is one derivation (the context)
//! around what went wrong with it ([`BuildErrorKind`], which keeps every
//! cause as a source); [`GraphError`] is what stops a whole graph before any
//! build (a `.drv` that cannot be read, a cycle, the store).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::derivation::attrs::{AttrsError, CheckError as OutputCheckError};
use crate::derivation::check::{CheckError, ReadError};
use crate::derivation::DerivationError;

use super::fetchurl::FetchurlError;
use crate::remote::offloader::OffloadError;
use crate::sandbox::{BuildOutcome, SandboxError, UserError};
use crate::serve_protocol::BuildStatus;
use crate::store::local::StoreError;
use crate::store::nar::NarError;
use crate::store::{StoreDir, StorePath};

/// Why building one derivation failed.
#[derive(Debug)]
pub struct BuildError {
    /// The derivation.
    pub drv: StorePath,
    /// Its store directory, to name it in full.
    dir: StoreDir,
    /// What went wrong (boxed: errors travel far, and most are rare).
    pub kind: Box<BuildErrorKind>,
}

/// What went wrong building a derivation.
#[derive(Debug)]
pub enum BuildErrorKind {
    /// The store failed.
    Store(StoreError),
    /// The sandbox could not run the build.
    Sandbox(SandboxError),
    /// No build user could be leased.
    Users(UserError),
    /// This machine has no usable build users.
    NoUsers(Arc<UserError>),
    /// An input derivation could not be read.
    Read(ReadError),
    /// An input derivation does not have an output that is used.
    NoSuchOutput {
        /// The input derivation, in full.
        input: String,
        /// The output's name.
        output: String,
    },
    /// The `.drv` is not what its name claims: refused before any build.
    Refused(CheckError),
    /// sandoff cannot build this (kind of) derivation.
    Unsupported {
        /// Why.
        reason: String,
    },
    /// The derivation's kind is invalid.
    Derivation(DerivationError),
    /// The builder failed or was killed.
    Failed {
        /// How it ended.
        outcome: BuildOutcome,
        /// The build directory, when kept (`--keep-failed`).
        kept: Option<PathBuf>,
        /// The last lines of the log.
        tail: Vec<String>,
    },
    /// The build was killed for writing more than `limit` bytes of log
    /// (`--max-log-size`).
    LogLimit {
        /// The limit.
        limit: u64,
        /// The build directory, when kept (`--keep-failed`).
        kept: Option<PathBuf>,
    },
    /// `--check` of a derivation whose outputs are not all valid.
    CheckInvalid,
    /// `--check`: building again gave different outputs.
    NotDeterministic {
        /// Each output that differs.
        differences: Vec<super::check::Difference>,
    },
    /// An output was not produced.
    MissingOutput {
        /// The output name.
        output: String,
        /// The output path, in full.
        path: String,
    },
    /// A file in an output is not owned by the build user.
    ForeignFile {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The build user.
        build_uid: u32,
    },
    /// A file in an output is not a regular file, directory or symlink.
    UnsupportedType {
        /// The file.
        path: PathBuf,
    },
    /// A fixed output's hash is not the declared one.
    HashMismatch {
        /// The declared hash.
        specified: String,
        /// The output's hash.
        got: String,
    },
    /// A flat fixed output is not a regular non-executable file.
    FlatNotRegular,
    /// A fixed output refers to store paths.
    FixedReferences {
        /// One reference, in full.
        reference: String,
    },
    /// Reading an output failed.
    Nar {
        /// The output's place.
        path: PathBuf,
        /// The cause.
        source: NarError,
    },
    /// Writing the log or handling build directories failed.
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A build failed after the builder ran, and its directory was kept.
    Kept {
        /// The failure.
        error: Box<BuildErrorKind>,
        /// The kept build directory.
        dir: PathBuf,
    },
    /// The build failed on a build machine.
    RemoteFailed {
        /// The machine.
        machine: String,
        /// How the machine reported it.
        status: BuildStatus,
        /// The machine's message.
        message: String,
        /// The last lines of the log.
        tail: Vec<String>,
    },
    /// Offloading failed in a way another machine would not fix (outputs
    /// refused, the local store failing).
    Offload {
        /// The machine.
        machine: String,
        /// The cause.
        source: Box<OffloadError>,
    },
    /// Choosing where to build failed (slot or backoff files).
    Placement(Box<OffloadError>),
    /// A built-in builder is not supported, or `builtin:fetchurl` could not
    /// start (a download that fails is a [`BuildErrorKind::Failed`] build,
    /// its reason in the log).
    Builtin(FetchurlError),
    /// The derivation's structured attributes, references graphs or output
    /// checks cannot be used (refused before the build).
    Attributes(AttrsError),
    /// The outputs failed their checks (`allowedReferences`,
    /// `outputChecks`…); nothing was registered.
    OutputCheck(OutputCheckError),
}

impl BuildError {
    /// `kind`, for `drv` in `dir`.
    pub fn new(dir: &StoreDir, drv: &StorePath, kind: impl Into<BuildErrorKind>) -> BuildError {
        BuildError {
            drv: drv.clone(),
            dir: dir.clone(),
            kind: Box::new(kind.into()),
        }
    }
}

impl From<StoreError> for BuildErrorKind {
    fn from(e: StoreError) -> BuildErrorKind {
        BuildErrorKind::Store(e)
    }
}

impl From<ReadError> for BuildErrorKind {
    fn from(e: ReadError) -> BuildErrorKind {
        BuildErrorKind::Read(e)
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.describe(&self.dir.display(&self.drv), f)
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

impl BuildErrorKind {
    /// This failure, its build directory kept at `dir` (`--keep-failed`):
    /// a builder's failure or a log over its limit names it, any other
    /// failure is wrapped in [`BuildErrorKind::Kept`].
    pub fn kept_at(self, dir: PathBuf) -> BuildErrorKind {
        match self {
            BuildErrorKind::Failed { outcome, tail, .. } => BuildErrorKind::Failed {
                outcome,
                kept: Some(dir),
                tail,
            },
            BuildErrorKind::LogLimit { limit, .. } => BuildErrorKind::LogLimit {
                limit,
                kept: Some(dir),
            },
            error => BuildErrorKind::Kept {
                error: Box::new(error),
                dir,
            },
        }
    }

    /// The message for this failure of `drv` (in full), in the words Nix
    /// uses where it has them.
    fn describe(&self, drv: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BuildErrorKind as K;
        match self {
            K::Store(e) => write!(f, "{e}"),
            K::Sandbox(e) => write!(f, "cannot run the builder of '{drv}': {e}"),
            K::Users(e) => write!(f, "no build user for '{drv}': {e}"),
            K::NoUsers(e) => write!(f, "cannot build '{drv}': no build users: {e}"),
            K::Read(e) => write!(f, "{e}"),
            K::NoSuchOutput { input, output } => {
                write!(f, "input derivation '{input}' has no output '{output}'")
            }
            K::Refused(e) => write!(f, "refusing to build '{drv}': {e}"),
            K::Unsupported { reason } => write!(f, "cannot build '{drv}': {reason}"),
            K::Derivation(e) => write!(f, "derivation '{drv}': {e}"),
            K::Failed {
                outcome,
                kept,
                tail,
            } => write!(
                f,
                "builder for '{drv}' failed: {outcome}{}{}",
                kept_note(kept),
                tail_note(tail)
            ),
            K::LogLimit { limit, kept } => write!(
                f,
                "building '{drv}' killed after writing more than {limit} bytes of log output{}",
                kept_note(kept)
            ),
            K::CheckInvalid => write!(
                f,
                "some outputs of '{drv}' are not valid, so checking is not possible"
            ),
            K::NotDeterministic { differences } => {
                write!(f, "derivation '{drv}' may not be deterministic: ")?;
                for (i, d) in differences.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "output '{}' differs", d.output.display())?;
                    if let Some(kept) = &d.kept {
                        write!(f, " from '{}'", kept.display())?;
                    }
                }
                Ok(())
            }
            K::MissingOutput { output, path } => write!(
                f,
                "builder for '{drv}' did not produce output '{output}' ({path})"
            ),
            K::ForeignFile {
                path,
                uid,
                build_uid,
            } => write!(
                f,
                "output of '{drv}': '{}' is owned by uid {uid}, not the build user {build_uid} (a hard link to a file the build does not own?): rejecting the build output",
                path.display()
            ),
            K::UnsupportedType { path } => write!(
                f,
                "output of '{drv}': '{}' has an unsupported type (only regular files, directories and symlinks)",
                path.display()
            ),
            K::HashMismatch { specified, got } => write!(
                f,
                "hash mismatch in fixed-output derivation '{drv}': specified {specified}, got {got}"
            ),
            K::FlatNotRegular => write!(
                f,
                "output of fixed-output derivation '{drv}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)"
            ),
            K::FixedReferences { reference } => write!(
                f,
                "fixed-output derivation '{drv}' must not reference store paths (it refers to {reference})"
            ),
            K::Nar { path, source } => {
                write!(f, "cannot read output '{}': {source}", path.display())
            }
            K::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} '{}': {source}", path.display()),
            K::Kept { error, dir } => {
                error.describe(drv, f)?;
                write!(f, "{}", kept_note(&Some(dir.clone())))
            }
            K::RemoteFailed {
                machine,
                status,
                message,
                tail,
            } => write!(
                f,
                "builder for '{drv}' failed on '{machine}': {}{}",
                remote_message(status, message),
                tail_note(tail)
            ),
            K::Offload { machine, source } => {
                write!(f, "cannot build '{drv}' on '{machine}': {source}")
            }
            K::Placement(e) => write!(f, "cannot place '{drv}': {e}"),
            K::Builtin(e) => write!(f, "cannot build '{drv}': {e}"),
            K::Attributes(e) => write!(f, "cannot build '{drv}': {e}"),
            K::OutputCheck(e) => write!(
                f,
                "outputs of '{drv}' fail their checks, nothing was registered: {e}"
            ),
        }
    }

    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        use BuildErrorKind as K;
        match self {
            K::Store(e) => Some(e),
            K::Sandbox(e) => Some(e),
            K::Users(e) => Some(e),
            K::NoUsers(e) => Some(&**e),
            K::Read(e) => Some(e),
            K::Refused(e) => Some(e),
            K::Derivation(e) => Some(e),
            K::Nar { source, .. } => Some(source),
            K::Io { source, .. } => Some(source),
            K::Kept { error, .. } => error.source(),
            K::Offload { source, .. } => Some(&**source),
            K::Placement(e) => Some(&**e),
            K::Builtin(e) => Some(e),
            K::Attributes(e) => Some(e),
            K::OutputCheck(e) => Some(e),
            _ => None,
        }
    }
}

/// What stops a whole graph before (or instead of) building it.
#[derive(Debug, Error)]
pub enum GraphError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A `.drv` could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Derivations that depend on themselves (impossible for `.drv` files
    /// named after their contents, so one of them is not).
    #[error("derivations depend on themselves: {}", cycle.join(" -> "))]
    Cycle {
        /// The derivations of the cycle, the first one repeated at the end.
        cycle: Vec<String>,
    },
    /// One derivation cannot be built at all (refused, unsupported).
    #[error(transparent)]
    Build(Box<BuildError>),
}

impl From<BuildError> for GraphError {
    fn from(e: BuildError) -> GraphError {
        GraphError::Build(Box::new(e))
    }
}

/// Where a kept build directory is, and the command that enters its
/// sandbox (see [`super::enter`]).
fn kept_note(kept: &Option<PathBuf>) -> String {
    kept.as_ref()
        .map(|k| {
            format!(
                "; build directory kept at {}; to investigate in its sandbox: sandoff enter {}",
                k.display(),
                shell_word(&k.to_string_lossy())
            )
        })
        .unwrap_or_default()
}

/// `word` as one word for a POSIX shell: as it is when it holds only
/// characters no shell reads specially, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn remote_message(status: &BuildStatus, message: &str) -> String {
    if message.is_empty() {
        format!("{status:?}")
    } else {
        format!("{status:?}: {message}")
    }
}

fn tail_note(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last log lines: {}", tail.join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enter_command_quotes_a_directory_only_when_a_shell_needs_it() {
        assert_eq!(
            shell_word("/var/b/.tmpA1/sandoff-build-x_Y"),
            "/var/b/.tmpA1/sandoff-build-x_Y"
        );
        assert_eq!(shell_word("/my builds/x"), "'/my builds/x'");
        assert_eq!(shell_word("/a'b;c"), r"'/a'\''b;c'");
    }
}
