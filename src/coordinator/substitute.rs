//! Fetching a closure from the coordinator's cache (placeholder until the
//! cache lands).
#![allow(missing_docs, dead_code)]

use std::collections::BTreeSet;

use thiserror::Error;

use crate::store::local::LocalStore;
use crate::store::signature::TrustedKeys;
use crate::store::StorePath;

#[derive(Debug, Error)]
pub enum SubstituteError {
    #[error("not available")]
    Unavailable,
}

pub struct HttpCache {
    base: String,
}

impl HttpCache {
    pub fn new(base: String, _agent: ureq::Agent, _auth: Option<String>, _trusted: TrustedKeys) -> HttpCache {
        HttpCache { base }
    }
    pub fn fetch_closure(&self, _store: &LocalStore, _paths: &BTreeSet<StorePath>) -> Result<usize, SubstituteError> {
        Err(SubstituteError::Unavailable)
    }
}
