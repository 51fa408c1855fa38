//! That a `.drv` in a store is what its name claims, as Nix's
//! `checkDerivationOutputs`: its store path is the text path of its bytes
//! and references, its references are its inputs, and each output path (and
//! the environment variable named after it) is the one the derivation
//! gives: `hashDerivationModulo` for input-addressed outputs, the declared
//! hash for a fixed output.
//!
//! Without this, a `.drv` copied in by `store import` or the serve
//! protocol could name another derivation's output (or an input that is
//! already valid) as its own: building it would then "succeed" at once, or
//! write what the real derivation later reuses. The check runs wherever a
//! `.drv` becomes valid (the store calls [`StoreDrvCheck`], whatever the
//! route) and again before a derivation is built ([`check_outputs`]), since
//! a store may hold `.drv` files registered before the check existed or by
//! another program.
//!
//! Output names follow the `.drv` file's name, as Nix's (`nameFromPath`):
//! the name a derivation's outputs carry is the one its path shows.
//! Floating content-addressed and impure outputs have no path to check.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::aterm::AtermError;
use super::{
    Derivation, DerivationError, DerivationKind, DerivationOutput, DrvHashKind, DrvHasher,
};
use crate::store::local::{DrvCheck, LocalStore, StoreError};
use crate::store::path::output_path_name;
use crate::store::{HashAlgo, StoreDir, StoreLocation, StorePath, ValidPathInfo};

/// The largest `.drv` file read: real ones are at most a few MiB (Nixpkgs'
/// largest hold long inline scripts), so this bounds memory, not use.
pub const MAX_DRV_SIZE: u64 = 64 << 20;

/// Why a `.drv` was refused.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("cannot read '{path}': {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}' is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("'{path}' is larger than {MAX_DRV_SIZE} bytes, more than any real derivation")]
    TooLarge { path: PathBuf },
    #[error("not a derivation: {0}")]
    Parse(#[from] AtermError),
    #[error("its contents and references give the path '{computed}'")]
    WrongDrvPath { computed: String },
    #[error("its references ({given}) are not its inputs ({inputs})")]
    WrongReferences { given: String, inputs: String },
    #[error("output '{output}' is '{given}', but the derivation gives '{expected}'")]
    WrongOutputPath {
        output: String,
        expected: String,
        given: String,
    },
    #[error(
        "environment variable '{output}' is '{given}', but should be the output path '{expected}'"
    )]
    WrongOutputEnv {
        output: String,
        expected: String,
        given: String,
    },
    #[error("input derivation '{path}' is neither valid nor imported with it")]
    MissingInput { path: String },
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("cannot compute a store path: {0}")]
    Path(#[from] crate::store::PathError),
}

/// Reads and parses a `.drv` file, refusing anything but a regular file of
/// at most [`MAX_DRV_SIZE`] bytes.
pub fn read_drv_file(file: &Path, dir: &StoreDir) -> Result<(Vec<u8>, Derivation), CheckError> {
    let read = |source| CheckError::Read {
        path: file.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(file)
        .map_err(read)?;
    if !f.metadata().map_err(read)?.is_file() {
        return Err(CheckError::NotRegularFile {
            path: file.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_DRV_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_DRV_SIZE {
        return Err(CheckError::TooLarge {
            path: file.to_owned(),
        });
    }
    let drv = Derivation::from_aterm(&bytes, dir)?;
    Ok((bytes, drv))
}

/// Checks that `drv`, stored at `drv_path`, has the output paths (and output
/// environment variables) its contents give, reading input derivations
/// through `hasher`.
pub fn check_outputs<F, E>(
    drv: &Derivation,
    drv_path: &StorePath,
    hasher: &mut DrvHasher<F>,
) -> Result<(), CheckError>
where
    F: FnMut(&StorePath) -> Result<Derivation, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let dir = hasher.store_dir().clone();
    let name = drv_path
        .name()
        .strip_suffix(".drv")
        .unwrap_or(drv_path.name())
        .to_owned();
    let mut expected = Vec::new();
    match drv.kind()? {
        DerivationKind::InputAddressed { deferred: false } => {
            let h = hasher.hash_modulo(drv, true)?;
            if h.kind == DrvHashKind::Deferred {
                return Err(DerivationError::UnsupportedKind(
                    "input-addressed with content-addressed inputs",
                )
                .into());
            }
            for (o, hash) in &h.hashes {
                expected.push((o.clone(), dir.make_output_path(o.as_str(), hash, &name)?));
            }
        }
        DerivationKind::Fixed => {
            for (o, output) in &drv.outputs {
                if let DerivationOutput::CAFixed { method, hash, .. } = output {
                    let out_name = output_path_name(&name, o.as_str());
                    let path = dir.make_fixed_output_path(*method, hash, &out_name, [], false)?;
                    expected.push((o.clone(), path));
                }
            }
        }
        // Deferred, floating and impure outputs have no path yet.
        _ => {}
    }
    for (o, path) in expected {
        let full = dir.display(&path);
        let given = drv.outputs.get(&o).and_then(DerivationOutput::path);
        if given != Some(&path) {
            return Err(CheckError::WrongOutputPath {
                output: o.to_string(),
                expected: full,
                given: given.map(|g| dir.display(g)).unwrap_or_default(),
            });
        }
        let env = drv.env.get(o.as_str().as_bytes());
        if env.map(Vec::as_slice) != Some(full.as_bytes()) {
            return Err(CheckError::WrongOutputEnv {
                output: o.to_string(),
                expected: full,
                given: env
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// Checks a `.drv` about to become valid as `info.path` with its file at
/// `file`: a text path of its bytes and references, references that are
/// exactly its inputs, and [`check_outputs`], with input derivations read
/// through `find`.
pub fn check_drv_file(
    dir: &StoreDir,
    info: &ValidPathInfo,
    file: &Path,
    find: &dyn Fn(&StorePath) -> Option<PathBuf>,
) -> Result<(), CheckError> {
    let (bytes, drv) = read_drv_file(file, dir)?;
    let computed = dir.make_text_path(
        info.path.name(),
        &HashAlgo::Sha256.digest(&bytes),
        &info.references,
    )?;
    if computed != info.path {
        return Err(CheckError::WrongDrvPath {
            computed: dir.display(&computed),
        });
    }
    let inputs = drv.references();
    if inputs != info.references {
        let show = |s: &BTreeSet<StorePath>| {
            s.iter()
                .map(|p| dir.display(p))
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Err(CheckError::WrongReferences {
            given: show(&info.references),
            inputs: show(&inputs),
        });
    }
    let mut hasher = DrvHasher::new(dir.clone(), |p: &StorePath| {
        let file = find(p).ok_or_else(|| CheckError::MissingInput {
            path: dir.display(p),
        })?;
        read_drv_file(&file, dir).map(|(_, d)| d)
    });
    check_outputs(&drv, &info.path, &mut hasher)
}

/// The store's [`DrvCheck`]: [`check_drv_file`].
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreDrvCheck;

impl DrvCheck for StoreDrvCheck {
    fn check(
        &self,
        dir: &StoreDir,
        info: &ValidPathInfo,
        files: &Path,
        find: &dyn Fn(&StorePath) -> Option<PathBuf>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        check_drv_file(dir, info, files, find).map_err(Into::into)
    }
}

/// Opens the local store at `loc` with [`StoreDrvCheck`]: how every part of
/// sandoff that may add a `.drv` opens a store.
pub fn open_store(loc: StoreLocation) -> Result<LocalStore, StoreError> {
    LocalStore::open_with_drv_check(loc, Box::new(StoreDrvCheck))
}
