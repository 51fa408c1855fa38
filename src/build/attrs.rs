//! The store's side of [`crate::derivation::attrs`] for a local build:
//! before the build, the builder's environment, the files of its build
//! directory (references graphs, `.attrs.json`, `.attrs.sh`) and the paths
//! the graphs add to the sandbox; after it, the output checks, with the
//! facts of the paths the outputs reach read from the store.
//!
//! # Choices
//!
//! - A graph may only be asked of a path in the build's input closure (as
//!   Nix 2.8; Guix's daemon takes any valid path, but Guix's
//!   `#:references-graphs` makes the paths inputs anyway, so its
//!   derivations pass). A path inside a store path stands for it.
//! - A graph holds the closure of its paths and, for each derivation in
//!   it, the closures of that derivation's outputs (as Nix and Guix). An
//!   output that is not valid is refused with a message naming it (Nix
//!   fails on it too, less clearly).
//! - Every path of a graph is made available in the sandbox and is a
//!   candidate when the outputs are scanned for references. Nix 2.8 only
//!   binds the input closure, so derivation outputs that a graph names
//!   are listed but missing there; here the builder can read what the
//!   graph lists, and an output that embeds such a path records the
//!   reference instead of holding a dangling one.
//! - The files are written by sandoff (root) into the fresh host build
//!   directory before the builder starts, `O_EXCL | O_NOFOLLOW`, mode 0600
//!   and owned by the build user, as `passAsFile` files are (Nix leaves
//!   graph files root's, 0644; either way the builder reads them and can
//!   replace them in its own directory). Nothing of the build user's can
//!   run yet, and the directory's parent is root-only, so nothing can be
//!   raced.
//! - Output placeholders are replaced by the output paths in the
//!   arguments, the environment and the attribute files, as Nix's
//!   `inputRewrites` do for a sandboxed build with known output paths.
//! - The output checks run after every output is copied, scanned and (if
//!   fixed) hash-checked, before anything is registered: a failure drops
//!   every staged output, those that passed included (Nix registers none
//!   either).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::BuildErrorKind;
use crate::derivation::attrs::{
    self, check_outputs, graph, AttrsError, GraphPath, GraphRequest, OutputChecks, PathFacts,
};
use crate::derivation::Derivation;
use crate::store::local::LocalStore;
use crate::store::{StorePath, ValidPathInfo};

/// What a derivation's attributes make of its build.
#[derive(Debug)]
pub struct Prepared {
    /// The derivation's part of the builder's environment: its variables,
    /// or with structured attributes only `NIX_ATTRS_*_FILE`; output
    /// placeholders replaced by the output paths, as Nix does.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The builder's arguments, placeholders replaced likewise.
    pub args: Vec<Vec<u8>>,
    /// Files to write into the build directory, by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Paths of references graphs outside the input closure, which the
    /// sandbox must hold too.
    pub extra_inputs: BTreeSet<StorePath>,
    /// The checks of the outputs, for [`check_built_outputs`].
    pub checks: OutputChecks,
}

/// Reads `drv`'s structured attributes, references graphs and output
/// checks; `closure` is its input closure, `build_dir` the build
/// directory's path inside the sandbox.
pub fn prepare(
    store: &LocalStore,
    drv: &Derivation,
    closure: &BTreeSet<StorePath>,
    build_dir: &str,
) -> Result<Prepared, BuildErrorKind> {
    let dir = &store.location().dir;
    let structured = attrs::structured_attrs(&drv.env).map_err(BuildErrorKind::Attributes)?;
    let requests = match &structured {
        Some(a) => graph::structured_requests(a, dir),
        None => match drv.env.get(b"exportReferencesGraph".as_slice()) {
            Some(v) => graph::env_requests(v, dir),
            None => Ok(Vec::new()),
        },
    }
    .map_err(BuildErrorKind::Attributes)?;

    let mut extra_inputs = BTreeSet::new();
    let mut graphs = Vec::new();
    for request in &requests {
        let infos = graph_infos(store, request, closure)?;
        extra_inputs.extend(infos.keys().filter(|p| !closure.contains(*p)).cloned());
        graphs.push((request.name.clone(), infos));
    }

    let outputs: BTreeMap<String, String> = drv
        .output_paths()
        .into_iter()
        .map(|(name, p)| (name, dir.display(&p)))
        .collect();
    let rewrites = attrs::placeholder_rewrites(&outputs);
    let args = drv
        .args
        .iter()
        .map(|a| attrs::rewrite_bytes(a, &rewrites))
        .collect();
    let mut files = BTreeMap::new();
    let (env, checks) = match &structured {
        Some(a) => {
            let json_graphs = graphs
                .iter()
                .map(|(name, infos)| (name.clone(), graph::graph_json(dir, &graph_paths(infos))))
                .collect();
            let f = attrs::attrs_files(a, &outputs, json_graphs);
            files.insert(attrs::ATTRS_JSON.to_owned(), f.json.into_bytes());
            files.insert(attrs::ATTRS_SH.to_owned(), f.sh.into_bytes());
            let checks = OutputChecks::from_structured(a).map_err(BuildErrorKind::Attributes)?;
            (attrs::attrs_env(build_dir), checks)
        }
        None => {
            for (name, infos) in &graphs {
                let text = graph::validity_registration(
                    dir,
                    infos.iter().map(|(p, i)| (p, &i.references)),
                );
                // A later graph of the same name replaces an earlier one,
                // as Nix's writeFile does.
                files.insert(name.clone(), text.into_bytes());
            }
            let env = drv
                .env
                .iter()
                .map(|(k, v)| {
                    (
                        attrs::rewrite_bytes(k, &rewrites),
                        attrs::rewrite_bytes(v, &rewrites),
                    )
                })
                .collect();
            (env, OutputChecks::from_env(&drv.env))
        }
    };
    Ok(Prepared {
        env,
        args,
        files,
        extra_inputs,
        checks,
    })
}

/// The path infos of the graph `request` asks for (see the module docs).
fn graph_infos(
    store: &LocalStore,
    request: &GraphRequest,
    closure: &BTreeSet<StorePath>,
) -> Result<BTreeMap<StorePath, ValidPathInfo>, BuildErrorKind> {
    let loc = store.location();
    let refused = |e: AttrsError| BuildErrorKind::Attributes(e);
    for p in &request.paths {
        if !closure.contains(p) {
            return Err(refused(AttrsError::NotInInputClosure {
                path: loc.logical(p),
            }));
        }
    }
    let mut paths = store.closure(&request.paths)?;
    let mut outputs = BTreeSet::new();
    for drv in paths.iter().filter(|p| p.is_derivation()) {
        for (output, path) in store.derivation_outputs(drv)? {
            if !store.is_valid(&path)? {
                return Err(refused(AttrsError::GraphOutputNotValid {
                    name: request.name.clone(),
                    drv: loc.logical(drv),
                    output,
                    path: loc.logical(&path),
                }));
            }
            outputs.insert(path);
        }
    }
    paths.extend(store.closure(&outputs)?);
    let mut infos = BTreeMap::new();
    for p in paths {
        let info = store.query_path_info(&p)?.ok_or_else(|| {
            crate::store::local::StoreError::NotValid {
                path: loc.logical(&p),
            }
        })?;
        infos.insert(p, info);
    }
    Ok(infos)
}

/// The JSON facts of a graph (closed under references), closure sizes
/// included.
fn graph_paths(infos: &BTreeMap<StorePath, ValidPathInfo>) -> Vec<GraphPath> {
    infos
        .values()
        .map(|info| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![&info.path];
            let mut closure_size = 0u64;
            while let Some(p) = todo.pop() {
                if !seen.insert(p) {
                    continue;
                }
                // The graph is a closure: every reference is in `infos`.
                if let Some(i) = infos.get(p) {
                    closure_size = closure_size.saturating_add(i.nar_size);
                    todo.extend(i.references.iter());
                }
            }
            GraphPath {
                path: info.path.clone(),
                references: info.references.clone(),
                nar_hash: info.nar_hash.clone(),
                nar_size: info.nar_size,
                ca: info.ca.clone(),
                closure_size,
            }
        })
        .collect()
}

/// Writes `files` into the host build directory `dir` for the build user
/// `uid`:`gid` (see the module docs).
pub fn write_files(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    uid: u32,
    gid: u32,
) -> Result<(), BuildErrorKind> {
    for (name, contents) in files {
        let path = dir.join(name);
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| BuildErrorKind::Io {
                action,
                path,
                source,
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io("create"))?;
        f.write_all(contents).map_err(io("write"))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io("chown"))?;
    }
    Ok(())
}

/// Runs the output checks of `checks` over the outputs `built` (their
/// path infos as they will be registered), reading the facts of the valid
/// paths they reach from the store. Nothing is read when there is nothing
/// to check.
pub fn check_built_outputs(
    store: &LocalStore,
    drv: &Derivation,
    checks: &OutputChecks,
    built: &[&ValidPathInfo],
) -> Result<(), BuildErrorKind> {
    if checks.is_empty() {
        return Ok(());
    }
    let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
        built.iter().map(|i| (&i.path, *i)).collect();
    let mut outputs = BTreeMap::new();
    for (name, path) in drv.output_paths() {
        if let Some(info) = by_path.get(&path) {
            outputs.insert(
                name,
                (
                    path,
                    PathFacts {
                        references: info.references.clone(),
                        nar_size: info.nar_size,
                    },
                ),
            );
        }
    }
    let reached: BTreeSet<StorePath> = built
        .iter()
        .flat_map(|i| i.references.iter())
        .filter(|r| !by_path.contains_key(r))
        .cloned()
        .collect();
    let mut valid = BTreeMap::new();
    for p in store.closure(&reached)? {
        if let Some(info) = store.query_path_info(&p)? {
            valid.insert(
                p,
                PathFacts {
                    references: info.references,
                    nar_size: info.nar_size,
                },
            );
        }
    }
    check_outputs(&store.location().dir, checks, &outputs, &valid)
        .map_err(BuildErrorKind::OutputCheck)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn files_are_private_to_the_build_user_and_never_follow_links() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let me = std::fs::metadata(tmp.path()).expect("stat");
        let files = BTreeMap::from([
            ("g".to_owned(), b"graph\n".to_vec()),
            (attrs::ATTRS_JSON.to_owned(), b"{}".to_vec()),
        ]);
        write_files(tmp.path(), &files, me.uid(), me.gid()).expect("write");
        for (name, contents) in &files {
            let p = tmp.path().join(name);
            assert_eq!(&std::fs::read(&p).expect("read"), contents);
            let meta = std::fs::metadata(&p).expect("stat");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
            assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        }
        // A name already taken (here by a symlink out of the directory) is
        // an error, not a write through the link.
        let other = tempfile::tempdir().expect("tempdir");
        let target = other.path().join("target");
        std::os::unix::fs::symlink(&target, tmp.path().join("h")).expect("symlink");
        let files = BTreeMap::from([("h".to_owned(), b"x".to_vec())]);
        let err = write_files(tmp.path(), &files, me.uid(), me.gid()).expect_err("taken");
        assert!(
            matches!(
                err,
                BuildErrorKind::Io {
                    action: "create",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!target.exists());
    }
}
