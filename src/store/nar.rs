//! NAR (Nix ARchive): writer from a filesystem tree, strict reader.
//!
//! CONTRACT (stub): signatures fixed for other modules; filled in by the NAR change.

use std::io::{Read, Write};
use std::path::Path;

use thiserror::Error;

use super::Hash;

/// Why a NAR could not be written or read.
#[derive(Debug, Error)]
pub enum NarError {
    #[error("not implemented yet")]
    Unimplemented,
}

/// Writes the NAR serialisation of the file, symlink or directory at `path`.
pub fn dump(_path: &Path, _sink: &mut dyn Write) -> Result<(), NarError> {
    Err(NarError::Unimplemented)
}

/// SHA-256 of the NAR of `path`, and the NAR's size.
pub fn hash_path(_path: &Path) -> Result<(Hash, u64), NarError> {
    Err(NarError::Unimplemented)
}

/// Reads exactly one NAR from `source` (never a byte past its end) and
/// restores it at `dest`, which must not exist.
pub fn restore(_source: &mut dyn Read, _dest: &Path) -> Result<(), NarError> {
    Err(NarError::Unimplemented)
}
