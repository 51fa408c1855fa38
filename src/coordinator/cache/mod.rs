//! The binary cache (see [`super`]). Placeholder interface until the
//! cache lands; every call fails.
#![allow(missing_docs, dead_code)]

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::model::{CachedPath, DrvRecord};
use crate::derivation::Derivation;
use crate::store::signature::SecretKey;
use crate::store::{Hash, StoreDir, StorePath};

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache not available")]
    Unavailable,
}

impl CacheError {
    pub fn is_bad_input(&self) -> bool {
        false
    }
}

pub struct UploadId(String);
impl UploadId {
    pub fn new(s: &str) -> Result<UploadId, CacheError> {
        Ok(UploadId(s.to_owned()))
    }
}

pub enum ClaimKind {
    Output,
    Source,
    Derivation,
}
impl ClaimKind {
    pub fn output(_drv: &Derivation, _name: &str) -> ClaimKind {
        ClaimKind::Output
    }
}

pub struct Claim {
    pub path: StorePath,
    pub kind: ClaimKind,
    pub candidates: BTreeSet<StorePath>,
    pub nar_hash: Option<Hash>,
    pub nar_size: Option<u64>,
    pub deriver: Option<StorePath>,
}

pub struct Accepted {
    pub cached: CachedPath,
    pub drv: Option<DrvRecord>,
}

pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path, _s: StoreDir, _k: SecretKey) -> Result<Cache, CacheError> {
        Ok(Cache { dir: dir.to_owned() })
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn upload_offset(&self, _id: &UploadId) -> Result<u64, CacheError> {
        Err(CacheError::Unavailable)
    }
    pub fn append(&self, _id: &UploadId, _o: u64, _r: &mut dyn Read, _m: u64) -> Result<u64, CacheError> {
        Err(CacheError::Unavailable)
    }
    pub fn discard(&self, _id: &UploadId) -> Result<(), CacheError> {
        Err(CacheError::Unavailable)
    }
    pub fn finish(&self, _id: &UploadId, _c: &Claim) -> Result<Accepted, CacheError> {
        Err(CacheError::Unavailable)
    }
    pub fn write_log(&self, _d: &StorePath, _r: &mut dyn Read, _m: u64) -> Result<(), CacheError> {
        Err(CacheError::Unavailable)
    }
    pub fn read_drv(&self, _d: &StorePath) -> Result<Vec<u8>, CacheError> {
        Err(CacheError::Unavailable)
    }
}
