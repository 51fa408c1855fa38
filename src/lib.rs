//! sandoff builds Nix- and Guix-style derivations, locally in a chroot sandbox
//! or offloaded over SSH.
//!
//! # Architecture
//!
//! Modules form layers; a module uses only modules of lower layers, never
//! one of its own layer or above (a test below reads every `use crate::`
//! line and keeps this true):
//!
//! ```text
//! {termsafe, bounded} < store < derivation < {decide, sandbox, serve_protocol}
//!     < remote < build < {serve, hook, coordinator} < (cli)
//! ```
//!
//! - [`store`]: the store model, byte-compatible with Nix 2.8: store paths and
//!   hashes, NAR, the SQLite registry of valid paths (Nix's schema),
//!   signatures, export archives and reference scanning. It knows nothing of
//!   derivations or builds; what checks a `.drv` before it becomes valid is
//!   passed in from above ([`store::local::DrvCheck`]).
//! - [`derivation`]: the ATerm `.drv` format, `hashDerivationModulo`, output
//!   paths, the JSON of `nix show-derivation`, and the check that a `.drv`
//!   is what its name claims.
//! - [`decide`]: where a derivation is built; Nix and Guix machines files
//!   read into one machine model, and one pure `decide()` for every caller.
//! - [`sandbox`]: the local build sandbox: a pure plan of setup steps, run
//!   by one forked child in fresh namespaces as a pooled build user, in a
//!   cgroup of its own where cgroup v2 allows (killed whole, measured).
//! - [`serve_protocol`]: what both ends of Nix's serve protocol share.
//! - [`remote`]: other machines: SSH, the serve client (zstd-compressed
//!   between sandoff peers), per-machine slots and
//!   backoff, and the offloader that builds one derivation on a machine.
//! - [`build`]: realising derivations: the graph of what is missing,
//!   scheduled in dependency order, each placed by `decide` and built here
//!   in the sandbox or on a machine, its outputs checked and registered (or,
//!   with `--check`, compared with the valid ones); its log kept in
//!   sandoff's layout or, on a daemon's store, the daemon's.
//! - [`serve`] and [`hook`]: front ends over `build` for the daemon side of
//!   each protocol (`sandoff serve`, `sandoff hook`, `sandoff
//!   nix-build-hook`).
//! - [`coordinator`]: the build coordinator: a persistent queue, agents
//!   that dial in over HTTP and build with the same sandbox, and a signed
//!   binary cache of the results.
//!
//! Two leaf modules, below the store, serve them all:
//!
//! - [`termsafe`]: text written by builds (logs, a machine's error
//!   messages) filtered before it reaches a terminal, keeping colours.
//! - [`bounded`]: reading input others control (machines files, key files,
//!   the daemon's lines) with a limit, regular files only.
//!
//! The binary (`src/main.rs`, `src/cli/`) is a thin CLI over these modules.

pub mod bounded;
pub mod build;
pub mod coordinator;
pub mod decide;
pub mod derivation;
pub mod hook;
pub mod remote;
pub mod sandbox;
pub mod serve;
pub mod serve_protocol;
pub mod store;
pub mod termsafe;

#[cfg(test)]
mod layers {
    //! The layer order of the crate docs, checked from the source.

    use std::collections::BTreeMap;
    use std::path::Path;

    /// Each module's layer: a module may use modules of lower layers only.
    const LAYERS: &[(&str, u32)] = &[
        ("termsafe", 0),
        ("bounded", 0),
        ("store", 1),
        ("derivation", 2),
        ("decide", 3),
        ("sandbox", 3),
        ("serve_protocol", 3),
        ("remote", 4),
        ("build", 5),
        ("serve", 6),
        ("hook", 6),
        ("coordinator", 6),
    ];

    /// The top-level modules named by `crate::` paths in `src`, with the
    /// line, leaving out test modules (which may reach anywhere).
    fn uses(src: &str) -> Vec<(String, String)> {
        let code = src.split("#[cfg(test)]").next().unwrap_or(src);
        let mut found = Vec::new();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    group[..end]
                        .split(',')
                        .map(|n| n.trim().split("::").next().unwrap_or(""))
                        .collect()
                } else {
                    vec![rest
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")]
                };
                for n in names.into_iter().filter(|n| !n.is_empty()) {
                    found.push((n.to_owned(), line.trim().to_owned()));
                }
            }
        }
        found
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_module_uses_one_of_its_layer_or_above() {
        let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|c| c.trim_end_matches(".rs"))
                .unwrap_or("");
            let Some(&mine) = layers.get(top) else {
                continue; // lib.rs, main.rs and the CLI sit above every layer
            };
            let text = std::fs::read_to_string(&file).expect("read");
            for (used, line) in uses(&text) {
                match layers.get(used.as_str()) {
                    Some(&theirs) if used != top && theirs >= mine => {
                        wrong.push(format!("{}: {line}", rel.display()))
                    }
                    _ => {}
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "uses of the same or a higher layer:\n{}",
            wrong.join("\n")
        );
        // Every module of lib.rs has a layer.
        let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
        for m in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
            let m = m.trim_end_matches(';');
            assert!(layers.contains_key(m), "module {m} has no layer");
        }
    }

    #[test]
    fn the_check_sees_grouped_and_nested_uses() {
        let found =
            uses("use crate::{store::X, derivation};\nfoo(crate::remote::a());\n// crate::build\n");
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["store", "derivation", "remote"]);
    }
}
