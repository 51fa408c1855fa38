//! A local store: files under the physical root, the registry in SQLite.
//!
//! CONTRACT (stub): signatures fixed so that other modules can code against
//! them; bodies are filled in by the registry change.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::signature::Signature;
use super::{FileIngestionMethod, Hash, HashAlgo, StoreLocation, StorePath, ValidPathInfo};

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not implemented yet: {0}")]
    Unimplemented(&'static str),
}

/// An open local store.
pub struct LocalStore {
    loc: StoreLocation,
}

/// A NAR restored into a temporary directory inside the store, not yet
/// valid. Dropping it removes the files.
pub struct StagedPath {
    /// Where the files are now.
    pub tmp: PathBuf,
    /// SHA-256 of the NAR that was read, and its size.
    pub nar_hash: Hash,
    pub nar_size: u64,
}

impl LocalStore {
    /// Opens (creating if needed) the store at `loc`: directories and database.
    pub fn open(loc: StoreLocation) -> Result<LocalStore, StoreError> {
        Ok(LocalStore { loc })
    }

    pub fn location(&self) -> &StoreLocation {
        &self.loc
    }

    /// The registry's record of `path`, or `None` when it is not valid.
    pub fn query_path_info(&self, _path: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        Err(StoreError::Unimplemented("query_path_info"))
    }

    pub fn is_valid(&self, _path: &StorePath) -> Result<bool, StoreError> {
        Err(StoreError::Unimplemented("is_valid"))
    }

    /// `paths` and everything they reference, transitively.
    pub fn closure(&self, _paths: &BTreeSet<StorePath>) -> Result<BTreeSet<StorePath>, StoreError> {
        Err(StoreError::Unimplemented("closure"))
    }

    /// `paths` ordered so that every path comes after its references (among `paths`).
    pub fn topo_sort(&self, _paths: &BTreeSet<StorePath>) -> Result<Vec<StorePath>, StoreError> {
        Err(StoreError::Unimplemented("topo_sort"))
    }

    /// Adds a file or tree as a content-addressed path named after its file
    /// name (`nix-store --add` is `Recursive` + `Sha256`; `--add-fixed` the rest).
    pub fn add_path(&self, _src: &Path, _method: FileIngestionMethod, _algo: HashAlgo) -> Result<StorePath, StoreError> {
        Err(StoreError::Unimplemented("add_path"))
    }

    /// Adds a text file (e.g. a `.drv`) as a `text` path. For a derivation,
    /// `derivation_outputs` fills the `DerivationOutputs` table.
    pub fn add_text(
        &self,
        _name: &str,
        _contents: &[u8],
        _references: &BTreeSet<StorePath>,
        _derivation_outputs: &BTreeMap<String, StorePath>,
    ) -> Result<StorePath, StoreError> {
        Err(StoreError::Unimplemented("add_text"))
    }

    /// Restores one NAR from `nar` (reading exactly its bytes) into a
    /// temporary directory in the store, hashing it on the way.
    pub fn stage_nar(&self, _nar: &mut dyn Read) -> Result<StagedPath, StoreError> {
        Err(StoreError::Unimplemented("stage_nar"))
    }

    /// Makes a staged path valid as `info.path`: checks the NAR hash and size
    /// against `info`, that every reference is valid (or is the path itself),
    /// canonicalises, moves it into place and registers it in one transaction.
    /// Already valid: the staged copy is dropped and new signatures are merged.
    pub fn commit_staged(&self, _staged: StagedPath, _info: &ValidPathInfo) -> Result<(), StoreError> {
        Err(StoreError::Unimplemented("commit_staged"))
    }

    /// `stage_nar` then `commit_staged`.
    pub fn add_nar(&self, info: &ValidPathInfo, nar: &mut dyn Read) -> Result<(), StoreError> {
        let staged = self.stage_nar(nar)?;
        self.commit_staged(staged, info)
    }

    /// Adds signatures to a valid path.
    pub fn add_signatures(&self, _path: &StorePath, _sigs: &BTreeSet<Signature>) -> Result<(), StoreError> {
        Err(StoreError::Unimplemented("add_signatures"))
    }

    /// The outputs a valid derivation file declares (`DerivationOutputs`).
    pub fn derivation_outputs(&self, _drv: &StorePath) -> Result<BTreeMap<String, StorePath>, StoreError> {
        Err(StoreError::Unimplemented("derivation_outputs"))
    }
}
