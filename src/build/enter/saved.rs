//! The format of a kept build's [`super::SAVED_FILE`]: a
//! [`SandboxSpec`] without its host directories and time limits, plus the
//! derivation, the store and the build users' lock directory, as JSON
//! (derivation bytes as strings when they are UTF-8, else base64).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::sandbox::{BuildUser, InputPath, Limits, SandboxDirs, SandboxSpec, Timeouts, TmpfsSize};
use crate::store::{StoreDir, StoreLocation, StorePath};

/// The format of [`super::SAVED_FILE`]; another is refused, not guessed at.
const FORMAT: u32 = 1;

/// Bytes as JSON: a string when they are UTF-8 (what derivations hold in
/// practice, readable in the file), else base64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Raw { base64: String },
}

impl Bytes {
    fn new(b: &[u8]) -> Bytes {
        match std::str::from_utf8(b) {
            Ok(s) => Bytes::Text(s.to_owned()),
            Err(_) => Bytes::Raw {
                base64: base64::engine::general_purpose::STANDARD.encode(b),
            },
        }
    }

    fn to_vec(&self) -> Result<Vec<u8>, String> {
        match self {
            Bytes::Text(s) => Ok(s.as_bytes().to_vec()),
            Bytes::Raw { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|e| format!("bad base64: {e}")),
        }
    }
}

fn pairs(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(Bytes, Bytes)> {
    map.iter()
        .map(|(k, v)| (Bytes::new(k), Bytes::new(v)))
        .collect()
}

fn unpairs(pairs: &[(Bytes, Bytes)]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    pairs
        .iter()
        .map(|(k, v)| Ok((k.to_vec()?, v.to_vec()?)))
        .collect()
}

/// The store a build used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedStore {
    dir: String,
    root: PathBuf,
    state: PathBuf,
    daemon_db: Option<PathBuf>,
}

/// The build user, as the build saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedUser {
    name: String,
    uid: u32,
    group: String,
    gid: u32,
}

/// [`SAVED_FILE`]: a [`SandboxSpec`] without its host directories and time
/// limits, with the derivation, the store and the user pool's lock directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Saved {
    format: u32,
    pub(super) drv: String,
    store: SavedStore,
    pub(super) user_pool_dir: PathBuf,
    user: SavedUser,
    builder: Bytes,
    args: Vec<Bytes>,
    env: Vec<(Bytes, Bytes)>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    build_dir_name: String,
    fixed_output: bool,
    impure_env: Vec<(Bytes, Bytes)>,
    impure_env_allow: Vec<String>,
    tmp_size: String,
    shm_size: String,
    max_processes: u64,
    cores: u32,
}

impl Saved {
    pub(super) fn new(
        drv: &StorePath,
        loc: &StoreLocation,
        pool: &Path,
        spec: &SandboxSpec,
    ) -> Saved {
        let full = |p: &StorePath| spec.store_dir.display(p);
        Saved {
            format: FORMAT,
            drv: loc.logical(drv),
            store: SavedStore {
                dir: loc.dir.as_str().to_owned(),
                root: loc.root.clone(),
                state: loc.state.clone(),
                daemon_db: loc.daemon_db.clone(),
            },
            user_pool_dir: pool.to_owned(),
            user: SavedUser {
                name: spec.user.user_name().to_owned(),
                uid: spec.user.uid(),
                group: spec.user.group_name().to_owned(),
                gid: spec.user.gid(),
            },
            builder: Bytes::new(&spec.builder),
            args: spec.args.iter().map(|a| Bytes::new(a)).collect(),
            env: pairs(&spec.env),
            inputs: spec.inputs.iter().map(|i| full(&i.path)).collect(),
            outputs: spec.outputs.iter().map(full).collect(),
            build_dir_name: spec.build_dir_name.clone(),
            fixed_output: spec.fixed_output,
            impure_env: pairs(&spec.impure_env),
            impure_env_allow: spec.impure_env_allow.clone(),
            tmp_size: spec.limits.tmp_size.to_string(),
            shm_size: spec.limits.shm_size.to_string(),
            max_processes: spec.limits.max_processes,
            cores: spec.cores,
        }
    }

    /// The store, the user and the spec (with `dirs`), or why not.
    pub(super) fn spec(
        &self,
        dirs: SandboxDirs,
    ) -> Result<(StoreLocation, BuildUser, SandboxSpec), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} (this sandoff reads format {FORMAT})",
                self.format
            ));
        }
        let dir = StoreDir::new(&self.store.dir).map_err(|e| e.to_string())?;
        let loc = StoreLocation {
            dir: dir.clone(),
            root: self.store.root.clone(),
            state: self.store.state.clone(),
            daemon_db: self.store.daemon_db.clone(),
            // A shell in a kept build writes no build log.
            daemon_log_dir: None,
        };
        let user = BuildUser::new(
            self.user.uid,
            self.user.gid,
            &self.user.name,
            &self.user.group,
        )
        .map_err(|e| e.to_string())?;
        let path = |p: &String| dir.parse_path(p).map_err(|e| format!("'{p}': {e}"));
        let inputs = self
            .inputs
            .iter()
            .map(|p| {
                let path = path(p)?;
                Ok(InputPath {
                    // From the store, never from the file.
                    source: loc.real_path(&path),
                    path,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let spec = SandboxSpec {
            store_dir: dir.clone(),
            builder: self.builder.to_vec()?,
            args: self
                .args
                .iter()
                .map(Bytes::to_vec)
                .collect::<Result<_, _>>()?,
            env: unpairs(&self.env)?,
            inputs,
            outputs: self.outputs.iter().map(path).collect::<Result<_, _>>()?,
            dirs,
            build_dir_name: self.build_dir_name.clone(),
            user: user.clone(),
            fixed_output: self.fixed_output,
            impure_env: unpairs(&self.impure_env)?,
            impure_env_allow: self.impure_env_allow.clone(),
            limits: Limits {
                tmp_size: TmpfsSize::parse(&self.tmp_size)?,
                shm_size: TmpfsSize::parse(&self.shm_size)?,
                max_processes: self.max_processes,
            },
            cores: self.cores,
            timeouts: Timeouts::default(),
        };
        Ok((loc, user, spec))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::super::kept_dirs;
    use super::*;

    pub(in crate::build::enter) const BUSYBOX: &str = "7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox";
    const OUT: &str = "1f2dhqa4ycv31xpsaw4bavv0ks2ir2fc-probe";
    pub(in crate::build::enter) const DRV: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-probe.drv";

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("valid")
    }

    fn loc() -> StoreLocation {
        StoreLocation::new(StoreDir::default(), PathBuf::from("/s"))
    }

    pub(in crate::build::enter) fn spec(dirs: SandboxDirs) -> SandboxSpec {
        let loc = loc();
        SandboxSpec {
            store_dir: StoreDir::default(),
            builder: format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
            args: vec![b"sh".to_vec(), b"-c".to_vec(), b"exit 1".to_vec()],
            env: BTreeMap::from([
                (b"out".to_vec(), format!("/nix/store/{OUT}").into_bytes()),
                // Not UTF-8: kept byte for byte.
                (b"odd".to_vec(), vec![0xff, 0x00, b'x']),
            ]),
            inputs: vec![InputPath {
                source: loc.real_path(&sp(BUSYBOX)),
                path: sp(BUSYBOX),
            }],
            outputs: vec![sp(OUT)],
            dirs,
            build_dir_name: "sandoff-build".to_owned(),
            user: BuildUser::new(30001, 30000, "sandoffbld1", "sandoffbld").expect("user"),
            fixed_output: true,
            impure_env: BTreeMap::from([(b"http_proxy".to_vec(), b"http://p".to_vec())]),
            impure_env_allow: vec!["X_*".to_owned()],
            limits: Limits {
                tmp_size: TmpfsSize::Bytes(1 << 30),
                shm_size: TmpfsSize::PercentOfMemory(10),
                max_processes: 77,
            },
            cores: 3,
            timeouts: Timeouts {
                max_silent: Some(Duration::from_secs(5)),
                total: None,
            },
        }
    }
    #[test]
    fn a_saved_sandbox_reads_back_as_the_builds_spec_in_the_kept_directory_without_limits() {
        let built = spec(kept_dirs(Path::new("/old/top")));
        let saved = Saved::new(&sp(DRV), &loc(), Path::new("/run/pool"), &built);
        let json = serde_json::to_string(&saved).expect("json");
        let back: Saved = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, saved);
        assert_eq!(back.drv, format!("/nix/store/{DRV}"));
        let here = kept_dirs(Path::new("/new/top"));
        let (l, user, got) = back.spec(here.clone()).expect("spec");
        assert_eq!(l, loc());
        assert_eq!(user, built.user);
        assert_eq!(got.dirs, here);
        assert_eq!(got.timeouts, Timeouts::default());
        // Everything else is the build's.
        let mut expected = built.clone();
        expected.dirs = here;
        expected.timeouts = Timeouts::default();
        assert_eq!(format!("{got:?}"), format!("{expected:?}"));
        assert!(json.contains(r#""base64""#), "{json}");
    }

    #[test]
    fn another_format_is_refused() {
        let mut saved = Saved::new(
            &sp(DRV),
            &loc(),
            Path::new("/p"),
            &spec(kept_dirs(Path::new("/t"))),
        );
        saved.format = 2;
        let err = saved.spec(kept_dirs(Path::new("/t"))).expect_err("refused");
        assert!(err.contains("format 2"), "{err}");
    }
}
