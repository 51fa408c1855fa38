//! The client side of a submission: send the coordinator what it lacks
//! of the derivations' closure (the `.drv` files and input sources, in
//! dependency order, as zstd-compressed NARs through resumable uploads),
//! then submit the builds. The coordinator checks each path against what
//! its name claims and creates builds for missing dependencies itself.

use std::collections::BTreeSet;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use thiserror::Error;

use super::api::{FinishUpload, Paths, Submit, SubmitAnswer, UploadKind};
use super::client::{Client, ClientError};
use super::model::NewBuild;
use crate::store::local::{LocalStore, StoreError};
use crate::store::{nar, StorePath};

/// Why a submission failed.
#[derive(Debug, Error)]
pub enum SubmitError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("'{0}' is not valid in this store")]
    NotValid(String),
    #[error("compressing '{path}': {source}")]
    Compress {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// What [`upload_closure`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Paths uploaded.
    pub paths: usize,
    /// Compressed bytes sent.
    pub bytes: u64,
}

/// Uploads what the coordinator lacks of the closure of `drvs` (the
/// `.drv` files and their references: input derivations and sources;
/// never outputs, which the coordinator builds or has).
pub fn upload_closure(
    client: &Client,
    store: &LocalStore,
    drvs: &BTreeSet<StorePath>,
    spool: &Path,
    zstd_level: i32,
) -> Result<Sent, SubmitError> {
    let loc = store.location();
    for d in drvs {
        if !store.is_valid(d)? {
            return Err(SubmitError::NotValid(loc.logical(d)));
        }
    }
    let closure = store.closure(drvs)?;
    let logical: Vec<String> = closure.iter().map(|p| loc.logical(p)).collect();
    let missing: Paths = client.post("/client/v1/missing", &Paths { paths: logical })?;
    let missing: BTreeSet<String> = missing.paths.into_iter().collect();
    let mut sent = Sent::default();
    for path in store.topo_sort(&closure)? {
        let full = loc.logical(&path);
        if !missing.contains(&full) {
            continue;
        }
        let info = store
            .query_path_info(&path)?
            .ok_or_else(|| SubmitError::NotValid(full.clone()))?;
        let file = spool.join(format!("{}.nar.zst", path.hash_part()));
        compress_nar(&loc.real_path(&path), &file, zstd_level).map_err(|source| {
            SubmitError::Compress {
                path: full.clone(),
                source,
            }
        })?;
        let url = format!("/client/v1/uploads/{}", path.base_name());
        let uploaded = client.upload(&url, &file);
        let _ = std::fs::remove_file(&file);
        sent.bytes += uploaded?;
        let finish = FinishUpload {
            kind: if path.is_derivation() {
                UploadKind::Derivation
            } else {
                UploadKind::Source
            },
            references: info.references.iter().map(|r| loc.logical(r)).collect(),
            nar_hash: info.nar_hash.to_nix32_prefixed(),
            nar_size: info.nar_size,
        };
        client.post_only(&format!("{url}/finish"), Some(&finish))?;
        sent.paths += 1;
    }
    Ok(sent)
}

/// Uploads the closure, then submits `builds`.
pub fn submit(
    client: &Client,
    store: &LocalStore,
    builds: Vec<NewBuild>,
    spool: &Path,
) -> Result<(Sent, SubmitAnswer), SubmitError> {
    let dir = &store.location().dir;
    let mut drvs = BTreeSet::new();
    for b in &builds {
        drvs.insert(
            dir.parse_path(&b.drv)
                .map_err(|_| SubmitError::NotValid(b.drv.clone()))?,
        );
    }
    let sent = upload_closure(client, store, &drvs, spool, 3)?;
    let answer = client.post("/client/v1/builds", &Submit { builds })?;
    Ok((sent, answer))
}

/// Writes the zstd-compressed NAR of `src` to `to`: what a client or an
/// agent uploads, spooled first so that an upload can resume.
pub(crate) fn compress_nar(src: &Path, to: &Path, level: i32) -> io::Result<()> {
    let file = std::fs::File::create(to)?;
    let mut enc =
        zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 16, file), level)?;
    nar::dump(src, &mut enc).map_err(io::Error::other)?;
    enc.finish()?.flush()
}
