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
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::aterm::AtermError;
use super::modulo::expected_output_paths;
use super::{Derivation, DerivationError, DerivationKind, DerivationOutput, DrvHasher};
use crate::bounded::{self, BoundedError};
use crate::store::local::{DrvCheck, DrvOutputs, LocalStore, StoreError};
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
        source: BoundedError,
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

/// Why a derivation could not be read from a store.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("derivation '{drv}' is not valid in the store (add it with `sandoff derivation add`)")]
    NotValid { drv: String },
    #[error("'{drv}' is not a derivation (a .drv store path)")]
    NotDerivation { drv: String },
    #[error("cannot read derivation '{drv}': {source}")]
    Bad {
        drv: String,
        #[source]
        source: CheckError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads the derivation at `path`, which must be a valid `.drv` in
/// `store`: the one way every part of sandoff reads a derivation.
pub fn read_derivation(store: &LocalStore, path: &StorePath) -> Result<Derivation, ReadError> {
    let loc = store.location();
    if !path.is_derivation() {
        return Err(ReadError::NotDerivation {
            drv: loc.logical(path),
        });
    }
    if !store.is_valid(path)? {
        return Err(ReadError::NotValid {
            drv: loc.logical(path),
        });
    }
    read_drv_file(&loc.real_path(path), &loc.dir)
        .map(|(_, drv)| drv)
        .map_err(|source| ReadError::Bad {
            drv: loc.logical(path),
            source,
        })
}

/// Reads and parses a `.drv` file, refusing anything but a regular file of
/// at most [`MAX_DRV_SIZE`] bytes.
pub fn read_drv_file(file: &Path, dir: &StoreDir) -> Result<(Vec<u8>, Derivation), CheckError> {
    let path = file.to_owned();
    let bytes = bounded::read_file_no_follow(file, MAX_DRV_SIZE).map_err(|e| match e {
        BoundedError::NotRegular { .. } => CheckError::NotRegularFile { path },
        BoundedError::TooLarge { .. } => CheckError::TooLarge { path },
        source => CheckError::Read { path, source },
    })?;
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
    let expected = match drv.kind()? {
        // Deferred, floating and impure outputs have no path yet.
        DerivationKind::InputAddressed { deferred: true }
        | DerivationKind::Floating
        | DerivationKind::Impure => return Ok(()),
        kind => expected_output_paths(drv, kind, &name, hasher)?,
    };
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
/// through `find`. Returns its known output paths, by output name.
pub fn check_drv_file(
    dir: &StoreDir,
    info: &ValidPathInfo,
    file: &Path,
    find: &dyn Fn(&StorePath) -> Option<PathBuf>,
) -> Result<DrvOutputs, CheckError> {
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
    check_outputs(&drv, &info.path, &mut hasher)?;
    Ok(drv.output_paths())
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
    ) -> Result<DrvOutputs, Box<dyn std::error::Error + Send + Sync>> {
        check_drv_file(dir, info, files, find).map_err(Into::into)
    }
}

/// Opens the local store at `loc` with [`StoreDrvCheck`]: how every part of
/// sandoff that may add a `.drv` opens a store.
pub fn open_store(loc: StoreLocation) -> Result<LocalStore, StoreError> {
    LocalStore::open_with_drv_check(loc, Box::new(StoreDrvCheck))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileIngestionMethod;

    fn fixtures(store: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/drv")
            .join(store)
    }

    /// Every `.drv` Nix 2.8 wrote in a fixture store, with its store path.
    fn nix_drvs(store: &str) -> Vec<(StorePath, PathBuf)> {
        let mut v: Vec<_> = std::fs::read_dir(fixtures(store))
            .expect("fixtures")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "drv"))
            .map(|p| {
                let base = p.file_name().and_then(|n| n.to_str()).expect("name");
                (
                    StorePath::from_base_name(base).expect("store path"),
                    p.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn info(path: &StorePath, references: BTreeSet<StorePath>) -> ValidPathInfo {
        ValidPathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(b""),
            nar_size: 0,
            references,
            registration_time: 0,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        }
    }

    /// Checks `bytes` as the `.drv` at `path` (its text path when `None`),
    /// with the fixture store's other `.drv` files as inputs.
    fn check_bytes(
        store: &str,
        dir: &StoreDir,
        bytes: &[u8],
        path: Option<StorePath>,
    ) -> Result<(), CheckError> {
        let drv = Derivation::from_aterm(bytes, dir).expect("parses");
        let path = path.unwrap_or_else(|| drv.drv_path(dir).expect("drv path"));
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("drv");
        std::fs::write(&file, bytes).expect("write");
        let find = |p: &StorePath| Some(fixtures(store).join(p.base_name()));
        check_drv_file(dir, &info(&path, drv.references()), &file, &find).map(drop)
    }

    #[test]
    fn every_derivation_nix_wrote_passes() {
        for (store, dir) in [("nix-store", "/nix/store"), ("gnu-store", "/gnu/store")] {
            let dir = StoreDir::new(dir).expect("dir");
            for (path, file) in nix_drvs(store) {
                let bytes = std::fs::read(&file).expect("read");
                check_bytes(store, &dir, &bytes, Some(path.clone()))
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
            }
        }
    }

    fn hello() -> (StoreDir, Derivation) {
        let dir = StoreDir::default();
        let bytes =
            std::fs::read(fixtures("nix-store").join("4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv"))
                .expect("hello");
        (
            dir.clone(),
            Derivation::from_aterm(&bytes, &dir).expect("parses"),
        )
    }

    #[test]
    fn a_derivation_claiming_another_output_is_refused() {
        let (dir, mut drv) = hello();
        // The output of the `dep` fixture, which is valid elsewhere.
        let theirs =
            StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").expect("p");
        let other = StorePath::from_base_name("0zp0x1hm6kq2fwhzfxbvvpk5mnfm08ky-hello").expect("p");
        for o in drv.outputs.values_mut() {
            *o = DerivationOutput::InputAddressed {
                path: other.clone(),
            };
        }
        drv.env
            .insert(b"out".to_vec(), dir.display(&other).into_bytes());
        let err = check_bytes("nix-store", &dir, &drv.to_aterm(&dir), None).unwrap_err();
        assert!(
            matches!(&err, CheckError::WrongOutputPath { output, expected, .. }
                if output == "out" && expected.ends_with(theirs.base_name())),
            "{err}"
        );
    }

    #[test]
    fn an_output_variable_that_differs_from_the_output_is_refused() {
        let (dir, mut drv) = hello();
        drv.env.insert(b"out".to_vec(), b"/tmp/elsewhere".to_vec());
        let err = check_bytes("nix-store", &dir, &drv.to_aterm(&dir), None).unwrap_err();
        assert!(matches!(err, CheckError::WrongOutputEnv { .. }), "{err}");
        // Without the variable the masked hash changes too (the entry is
        // gone, not emptied): refused either way.
        drv.env.remove(b"out".as_slice());
        assert!(check_bytes("nix-store", &dir, &drv.to_aterm(&dir), None).is_err());
    }

    #[test]
    fn a_fixed_output_whose_path_is_not_its_hash_is_refused() {
        let dir = StoreDir::default();
        let file = fixtures("nix-store").join("s8xzw7pp7k22sf2b5ssd7acfrbrya7qv-flat-sha256.drv");
        let mut drv = Derivation::from_aterm(&std::fs::read(file).expect("read"), &dir).expect("p");
        let victim =
            StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5l-hello").expect("p");
        let Some(DerivationOutput::CAFixed { method, hash, .. }) =
            drv.outputs.values().next().cloned()
        else {
            panic!("fixed output");
        };
        drv.outputs.insert(
            crate::derivation::OutputName::out(),
            DerivationOutput::CAFixed {
                method,
                hash: hash.clone(),
                path: victim.clone(),
            },
        );
        drv.env
            .insert(b"out".to_vec(), dir.display(&victim).into_bytes());
        let err = check_bytes("nix-store", &dir, &drv.to_aterm(&dir), None).unwrap_err();
        assert!(matches!(err, CheckError::WrongOutputPath { .. }), "{err}");
        // Another hash with the path left as it was: refused as well.
        let file = fixtures("nix-store").join("s8xzw7pp7k22sf2b5ssd7acfrbrya7qv-flat-sha256.drv");
        let mut drv = Derivation::from_aterm(&std::fs::read(file).expect("read"), &dir).expect("p");
        if let Some(DerivationOutput::CAFixed {
            hash, method: m, ..
        }) = drv.outputs.values_mut().next()
        {
            *hash = HashAlgo::Sha256.digest(b"something else");
            *m = FileIngestionMethod::Flat;
        }
        let err = check_bytes("nix-store", &dir, &drv.to_aterm(&dir), None).unwrap_err();
        assert!(matches!(err, CheckError::WrongOutputPath { .. }), "{err}");
    }

    #[test]
    fn a_drv_not_at_the_text_path_of_its_bytes_is_refused() {
        let (dir, drv) = hello();
        let elsewhere =
            StorePath::from_base_name("4l9f4nj9kcc5vs3rd6n6dpavm0faid7n-hello.drv").expect("p");
        let err = check_bytes("nix-store", &dir, &drv.to_aterm(&dir), Some(elsewhere)).unwrap_err();
        assert!(matches!(err, CheckError::WrongDrvPath { .. }), "{err}");
    }

    #[test]
    fn references_other_than_the_inputs_are_refused() {
        let (dir, drv) = hello();
        let bytes = drv.to_aterm(&dir);
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("drv");
        std::fs::write(&file, &bytes).expect("write");
        let refs = BTreeSet::new();
        let path = dir
            .make_text_path("hello.drv", &HashAlgo::Sha256.digest(&bytes), &refs)
            .expect("path");
        let err = check_drv_file(&dir, &info(&path, refs), &file, &|_| None).unwrap_err();
        assert!(matches!(err, CheckError::WrongReferences { .. }), "{err}");
    }

    #[test]
    fn what_is_not_a_small_regular_derivation_file_is_refused() {
        let dir = StoreDir::default();
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            read_drv_file(tmp.path(), &dir),
            Err(CheckError::NotRegularFile { .. })
        ));
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        assert!(matches!(
            read_drv_file(&fifo, &dir),
            Err(CheckError::NotRegularFile { .. })
        ));
        let big = tmp.path().join("big");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_DRV_SIZE + 1).expect("truncate");
        assert!(matches!(
            read_drv_file(&big, &dir),
            Err(CheckError::TooLarge { .. })
        ));
        let junk = tmp.path().join("junk");
        std::fs::write(&junk, b"not a derivation").expect("write");
        assert!(matches!(
            read_drv_file(&junk, &dir),
            Err(CheckError::Parse(_))
        ));
    }
}
