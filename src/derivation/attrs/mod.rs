//! The attributes that change what a build sees and what its outputs may
//! be, read from a derivation as Nix 2.8 reads them: structured attributes
//! (`__json`), references graphs (`exportReferencesGraph`) and output
//! checks (`allowedReferences` and friends, `outputChecks`).
//!
//! Everything here is pure; what needs the store (closures, path infos)
//! is computed by the caller (`build::attrs`) and passed in as data.
//!
//! - [`json`]: JSON text as Nix writes it (nlohmann's `dump()`).
//! - [`shell`]: `.attrs.sh`, the attributes as bash `declare` lines.
//! - [`graph`]: which references graphs are asked for, and their text and
//!   JSON forms.
//! - [`checks`]: the output checks, from the environment or
//!   `outputChecks`, and the pure check.
//!
//! # Structured attributes
//!
//! A derivation with a `__json` variable has structured attributes (Nix's
//! `__structuredAttrs = true`; Guix has none). Its builder then gets, as
//! in Nix 2.8:
//! - none of the derivation's variables (not even `__json` or `out`), only
//!   the fixed ones every builder gets (`PATH`, `HOME`, `NIX_STORE`,
//!   `NIX_BUILD_TOP`, `TMPDIR`…) and `NIX_ATTRS_JSON_FILE`,
//!   `NIX_ATTRS_SH_FILE`; `passAsFile` means nothing;
//! - `.attrs.json` in the build directory: the attributes with `outputs`
//!   set to an object from output names to output paths, and each
//!   references graph under its name (replacing an attribute of that name,
//!   `outputs` included, as in Nix), written as nlohmann writes it;
//! - `.attrs.sh` next to it ([`shell`]);
//! - in both, Nix's output placeholders (`hashPlaceholder`, what
//!   `builtins.placeholder "out"` gives) replaced by the output paths, as
//!   in the arguments of every build and the environment (and so the
//!   `passAsFile` files) of one without structured attributes
//!   ([`placeholder_rewrites`], [`rewrite_bytes`]).
//!
//! One deliberate difference: Nix 2.8 sets `NIX_ATTRS_JSON_FILE` and
//! `NIX_ATTRS_SH_FILE` to the files' paths on the *host* (`/tmp/nix-build-
//! …/.attrs.json`), which do not exist inside its sandbox (a bug Nix fixed
//! in 2.15 by using the sandbox's path). We give the path inside the
//! sandbox, where the files are: the host path would be useless to the
//! builder and would leak the host's temporary directory into builds.

pub mod checks;
pub mod graph;
pub mod json;
pub mod shell;

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::store::HashAlgo;

pub use checks::{check_outputs, CheckError, Checks, OutputChecks, PathFacts, RefCheck};
pub use graph::{GraphPath, GraphRequest};

/// The name of the JSON file of structured attributes in the build directory.
pub const ATTRS_JSON: &str = ".attrs.json";

/// The name of the shell file of structured attributes in the build directory.
pub const ATTRS_SH: &str = ".attrs.sh";

/// Why a derivation's attributes cannot be used.
#[derive(Debug, Error)]
pub enum AttrsError {
    /// `__json` is not JSON.
    #[error("cannot process __json attribute: {source}")]
    BadJson {
        /// The parser's error (with its position).
        #[source]
        source: serde_json::Error,
    },
    /// `__json` is JSON, but not an object.
    #[error("cannot process __json attribute: it is not a JSON object")]
    JsonNotObject,
    /// `exportReferencesGraph` is not a list of pairs.
    #[error("odd number of tokens in 'exportReferencesGraph': '{value}'")]
    OddGraphTokens {
        /// The variable's value.
        value: String,
    },
    /// A graph's file name could escape the build directory or clash with
    /// the files Nix puts there.
    #[error(
        "invalid file name '{name}' in 'exportReferencesGraph' (expected [A-Za-z_][A-Za-z0-9_.-]*)"
    )]
    BadGraphName {
        /// The name.
        name: String,
    },
    /// A graph of a path outside the store.
    #[error("'exportReferencesGraph' contains a non-store path '{path}'")]
    GraphNotStorePath {
        /// The path.
        path: String,
    },
    /// A graph's value in structured attributes holds a non-string.
    #[error(
        "'exportReferencesGraph.{name}' must be a store path or a list of store paths, not {value}"
    )]
    GraphNotString {
        /// The graph's name.
        name: String,
        /// The offending value, as JSON.
        value: String,
    },
    /// A graph of a path the build does not have as an input.
    #[error("cannot export references of path '{path}' because it is not in the input closure of the derivation")]
    NotInInputClosure {
        /// The path, in full.
        path: String,
    },
    /// A derivation in a graph has an output that is not valid, so its
    /// closure (which the graph includes, as in Nix) is unknown.
    #[error("cannot export the references graph '{name}': output '{output}' ({path}) of '{drv}', in the graph, is not valid; build it first")]
    GraphOutputNotValid {
        /// The graph's name.
        name: String,
        /// The derivation, in full.
        drv: String,
        /// Its output's name.
        output: String,
        /// The output's path, in full.
        path: String,
    },
    /// `outputChecks.<output>` is malformed.
    #[error("invalid 'outputChecks' of output '{output}': {why}")]
    BadOutputChecks {
        /// The output.
        output: String,
        /// What is wrong.
        why: String,
    },
}

/// The structured attributes of a derivation whose environment is `env`:
/// its `__json` object, or `None` without one.
pub fn structured_attrs(
    env: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<Option<Map<String, Value>>, AttrsError> {
    let Some(text) = env.get(b"__json".as_slice()) else {
        return Ok(None);
    };
    match serde_json::from_slice(text).map_err(|source| AttrsError::BadJson { source })? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(AttrsError::JsonNotObject),
    }
}

/// Nix's `hashPlaceholder(output)`: `/<nix32 of sha256("nix-output:<output>")>`,
/// which stands for the output's path until the build.
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        HashAlgo::Sha256
            .digest(format!("nix-output:{output}").as_bytes())
            .to_nix32()
    )
}

/// Nix's `rewriteStrings`: each `from` replaced by its `to`, in key order.
fn rewrite(mut s: String, rewrites: &BTreeMap<String, String>) -> String {
    for (from, to) in rewrites {
        if s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}

/// The rewrites of a build whose outputs (name to full path) are known:
/// each output's placeholder to its path (Nix's `inputRewrites` for a
/// sandboxed build).
pub fn placeholder_rewrites(outputs: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    outputs
        .iter()
        .map(|(name, path)| (hash_placeholder(name), path.clone()))
        .collect()
}

/// Nix's `rewriteStrings` over bytes (derivation strings need not be
/// UTF-8): each `from` replaced by its `to`, in key order.
pub fn rewrite_bytes(s: &[u8], rewrites: &BTreeMap<String, String>) -> Vec<u8> {
    let mut s = s.to_vec();
    for (from, to) in rewrites {
        let (from, to) = (from.as_bytes(), to.as_bytes());
        if from.is_empty() || !s.windows(from.len()).any(|w| w == from) {
            continue;
        }
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            if s[i..].starts_with(from) {
                out.extend_from_slice(to);
                i += from.len();
            } else {
                out.push(s[i]);
                i += 1;
            }
        }
        s = out;
    }
    s
}

/// The two files of a structured-attributes build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttrsFiles {
    /// `.attrs.json`.
    pub json: String,
    /// `.attrs.sh`.
    pub sh: String,
}

/// `.attrs.json` and `.attrs.sh` for structured attributes `attrs`, with
/// `outputs` (name to full path) and the references `graphs` (name to
/// their JSON form) added, placeholders replaced (see the module docs).
pub fn attrs_files(
    attrs: &Map<String, Value>,
    outputs: &BTreeMap<String, String>,
    graphs: BTreeMap<String, Value>,
) -> AttrsFiles {
    let mut attrs = attrs.clone();
    attrs.insert(
        "outputs".to_owned(),
        Value::Object(
            outputs
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    for (name, graph) in graphs {
        attrs.insert(name, graph);
    }
    let rewrites = placeholder_rewrites(outputs);
    AttrsFiles {
        json: rewrite(json::dump(&Value::Object(attrs.clone())), &rewrites),
        sh: rewrite(shell::attrs_sh(&attrs), &rewrites),
    }
}

/// The variables a structured-attributes build gets besides the fixed
/// ones: where the two files are inside the sandbox's build directory
/// `build_dir`.
pub fn attrs_env(build_dir: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    BTreeMap::from([
        (
            b"NIX_ATTRS_JSON_FILE".to_vec(),
            format!("{build_dir}/{ATTRS_JSON}").into_bytes(),
        ),
        (
            b"NIX_ATTRS_SH_FILE".to_vec(),
            format!("{build_dir}/{ATTRS_SH}").into_bytes(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `.attrs.json` and `.attrs.sh` Nix 2.8 wrote for
    /// `fixtures/attrs/graph.nix`'s `structured` (see its README), from that
    /// derivation's `__json` and the facts of its graph `g` (as Nix listed
    /// them), byte for byte.
    #[test]
    fn files_are_byte_for_byte_what_nix_wrote() {
        use crate::store::{ContentAddress, Hash, StoreDir, StorePath};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/attrs");
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect("fixture");
        let drv: Value = serde_json::from_str(&read("structured.drv.json")).expect("json");
        let (_, drv) = drv
            .as_object()
            .expect("obj")
            .iter()
            .next()
            .expect("one drv");
        let env: BTreeMap<Vec<u8>, Vec<u8>> = drv["env"]
            .as_object()
            .expect("env")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_bytes().to_vec(),
                    v.as_str().expect("str").as_bytes().to_vec(),
                )
            })
            .collect();
        let attrs = structured_attrs(&env).expect("parse").expect("structured");
        let outputs: BTreeMap<String, String> = drv["outputs"]
            .as_object()
            .expect("outputs")
            .iter()
            .map(|(k, v)| (k.clone(), v["path"].as_str().expect("path").to_owned()))
            .collect();
        let want_json = read("structured.attrs.json");
        let nix: Value = serde_json::from_str(&want_json).expect("json");
        let sd = StoreDir::default();
        let facts: Vec<GraphPath> = nix["g"]
            .as_array()
            .expect("graph")
            .iter()
            .map(|p| {
                let path = |v: &Value| sd.parse_path(v.as_str().expect("str")).expect("path");
                GraphPath {
                    path: path(&p["path"]),
                    references: p["references"]
                        .as_array()
                        .expect("refs")
                        .iter()
                        .map(path)
                        .collect::<std::collections::BTreeSet<StorePath>>(),
                    nar_hash: Hash::parse_any_prefixed(p["narHash"].as_str().expect("hash"))
                        .expect("hash"),
                    nar_size: p["narSize"].as_u64().expect("size"),
                    ca: p.get("ca").map(|c| {
                        c.as_str()
                            .expect("ca")
                            .parse::<ContentAddress>()
                            .expect("ca")
                    }),
                    closure_size: p["closureSize"].as_u64().expect("size"),
                }
            })
            .collect();
        let files = attrs_files(
            &attrs,
            &outputs,
            BTreeMap::from([("g".to_owned(), graph::graph_json(&sd, &facts))]),
        );
        assert_eq!(files.json, want_json);
        assert_eq!(files.sh, read("structured.attrs.sh"));
    }

    #[test]
    fn structured_attrs_come_from_json_objects_only() {
        let env = |v: &str| BTreeMap::from([(b"__json".to_vec(), v.as_bytes().to_vec())]);
        assert!(structured_attrs(&BTreeMap::new()).expect("none").is_none());
        assert_eq!(
            structured_attrs(&env(r#"{"a": 1}"#)).expect("ok"),
            json!({"a": 1}).as_object().cloned()
        );
        assert!(matches!(
            structured_attrs(&env("[1]")),
            Err(AttrsError::JsonNotObject)
        ));
        let err = structured_attrs(&env("{\"a\": ")).expect_err("bad");
        assert!(err
            .to_string()
            .starts_with("cannot process __json attribute: "));
    }

    #[test]
    fn rewriting_replaces_every_placeholder_in_bytes() {
        let outputs = BTreeMap::from([
            ("out".to_owned(), "/nix/store/o-x".to_owned()),
            ("dev".to_owned(), "/nix/store/d-x-dev".to_owned()),
        ]);
        let r = placeholder_rewrites(&outputs);
        let (out, dev) = (hash_placeholder("out"), hash_placeholder("dev"));
        let s = format!("a{out}b{dev}{out}\u{e9}");
        let mut bytes = s.into_bytes();
        bytes.push(0xff);
        let mut want = b"a/nix/store/o-xb/nix/store/d-x-dev/nix/store/o-x\xc3\xa9".to_vec();
        want.push(0xff);
        assert_eq!(rewrite_bytes(&bytes, &r), want);
        assert_eq!(rewrite_bytes(b"plain", &r), b"plain");
    }

    #[test]
    fn hash_placeholder_matches_nix() {
        // `nix-instantiate --eval -E 'builtins.placeholder "out"'` (Nix 2.8).
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }

    #[test]
    fn files_hold_outputs_graphs_and_rewritten_placeholders() {
        let attrs = json!({
            "name": "x",
            "flags": [format!("--prefix={}", hash_placeholder("out")), "-O2"],
            "outputs": ["out", "dev"],
            "graph": "replaced",
        });
        let outputs = BTreeMap::from([
            ("dev".to_owned(), "/nix/store/d-x-dev".to_owned()),
            ("out".to_owned(), "/nix/store/o-x".to_owned()),
        ]);
        let files = attrs_files(
            attrs.as_object().expect("obj"),
            &outputs,
            BTreeMap::from([("graph".to_owned(), json!([{"path": "/nix/store/g"}]))]),
        );
        assert_eq!(
            files.json,
            r#"{"flags":["--prefix=/nix/store/o-x","-O2"],"graph":[{"path":"/nix/store/g"}],"name":"x","outputs":{"dev":"/nix/store/d-x-dev","out":"/nix/store/o-x"}}"#
        );
        assert_eq!(
            files.sh,
            "declare -a flags=('--prefix=/nix/store/o-x' '-O2' )\n\
             declare name='x'\n\
             declare -A outputs=(['dev']='/nix/store/d-x-dev' ['out']='/nix/store/o-x' )\n"
        );
        assert_eq!(
            attrs_env("/tmp/b")[b"NIX_ATTRS_SH_FILE".as_slice()],
            b"/tmp/b/.attrs.sh"
        );
    }
}
