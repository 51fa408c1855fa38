//! References graphs (Nix's `exportReferencesGraph`, Guix's
//! `#:references-graphs`): which graphs a derivation asks for, and the two
//! forms a graph is given to the builder in.
//!
//! - Without structured attributes, `exportReferencesGraph = "name1 path1
//!   name2 path2 ..."`: each graph is a file `name` in the build directory
//!   in the text format of `nix-store --register-validity` (Nix's
//!   `makeValidityRegistration(paths, false, false)`): for each path of
//!   the closure, sorted, the path, an empty line (no deriver), the number
//!   of references and the references, one per line.
//! - With structured attributes, `exportReferencesGraph = { name = [paths]
//!   or path; }`: each graph is the value of `name` in `.attrs.json`, a
//!   list of objects (Nix's `pathInfoToJSON(..., false, true)`: `path`,
//!   `narHash`, `narSize`, `references`, `closureSize`, and `ca` for
//!   content-addressed paths); no file is written.
//!
//! What goes into a graph (the closure, and the outputs of derivations in
//! it) needs the store, so it is computed by the caller and given here as
//! plain [`GraphPath`]s.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::AttrsError;
use crate::store::{ContentAddress, Hash, StoreDir, StorePath};

/// One graph a derivation asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphRequest {
    /// The file name (without structured attributes) or the key of
    /// `.attrs.json` (with).
    pub name: String,
    /// The paths whose closure is wanted.
    pub paths: BTreeSet<StorePath>,
}

/// What a graph says about one path of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphPath {
    /// The path.
    pub path: StorePath,
    /// Its references (itself included, if it refers to itself).
    pub references: BTreeSet<StorePath>,
    /// Its NAR hash.
    pub nar_hash: Hash,
    /// Its NAR size.
    pub nar_size: u64,
    /// Its content address, if it has one.
    pub ca: Option<ContentAddress>,
    /// The sum of the NAR sizes of its closure.
    pub closure_size: u64,
}

/// Whether `name` may name a graph file, as Nix's `[A-Za-z_][A-Za-z0-9_.-]*`
/// (so never `.attrs.json`, `..` or a path).
fn is_file_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The graphs of `exportReferencesGraph` in a derivation's environment
/// (without structured attributes). A path inside a store path
/// (`/nix/store/…-bash/bin/sh`) stands for that store path, as in Nix.
pub fn env_requests(value: &[u8], dir: &StoreDir) -> Result<Vec<GraphRequest>, AttrsError> {
    let text = String::from_utf8_lossy(value);
    let tokens: Vec<&str> = text
        .split(|c| " \t\n\r".contains(c))
        .filter(|t| !t.is_empty())
        .collect();
    if !tokens.len().is_multiple_of(2) {
        return Err(AttrsError::OddGraphTokens {
            value: text.into_owned(),
        });
    }
    let mut requests = Vec::new();
    for pair in tokens.chunks(2) {
        let (name, path) = (pair[0], pair[1]);
        if !is_file_name(name) {
            return Err(AttrsError::BadGraphName {
                name: name.to_owned(),
            });
        }
        let (path, _) = dir
            .split_path(path)
            .map_err(|_| AttrsError::GraphNotStorePath {
                path: path.to_owned(),
            })?;
        requests.push(GraphRequest {
            name: name.to_owned(),
            paths: BTreeSet::from([path]),
        });
    }
    Ok(requests)
}

/// The graphs of `exportReferencesGraph` in structured attributes: an
/// object whose values are a store path or a list of them (anything else
/// there is ignored, as Nix does).
pub fn structured_requests(
    attrs: &Map<String, Value>,
    dir: &StoreDir,
) -> Result<Vec<GraphRequest>, AttrsError> {
    let Some(Value::Object(graphs)) = attrs.get("exportReferencesGraph") else {
        return Ok(Vec::new());
    };
    let mut requests = Vec::new();
    for (name, value) in graphs {
        // nlohmann iterates a scalar as a one-element list.
        let items: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            Value::Object(map) => map.values().collect(),
            v => vec![v],
        };
        let mut paths = BTreeSet::new();
        for item in items {
            let Value::String(s) = item else {
                return Err(AttrsError::GraphNotString {
                    name: name.clone(),
                    value: item.to_string(),
                });
            };
            let path = dir
                .parse_path(s)
                .map_err(|_| AttrsError::GraphNotStorePath { path: s.clone() })?;
            paths.insert(path);
        }
        requests.push(GraphRequest {
            name: name.clone(),
            paths,
        });
    }
    Ok(requests)
}

/// The text form of a graph (see the module docs).
pub fn validity_registration<'a>(
    dir: &StoreDir,
    graph: impl IntoIterator<Item = (&'a StorePath, &'a BTreeSet<StorePath>)>,
) -> String {
    let mut s = String::new();
    let sorted: BTreeMap<&StorePath, &BTreeSet<StorePath>> = graph.into_iter().collect();
    for (path, references) in sorted {
        s.push_str(&dir.display(path));
        s.push_str("\n\n");
        s.push_str(&format!("{}\n", references.len()));
        for r in references {
            s.push_str(&dir.display(r));
            s.push('\n');
        }
    }
    s
}

/// The JSON form of a graph (see the module docs), sorted by path.
pub fn graph_json(dir: &StoreDir, graph: &[GraphPath]) -> Value {
    let mut sorted: Vec<&GraphPath> = graph.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    Value::Array(
        sorted
            .into_iter()
            .map(|p| {
                let mut o = json!({
                    "path": dir.display(&p.path),
                    "narHash": p.nar_hash.to_nix32_prefixed(),
                    "narSize": p.nar_size,
                    "references": p.references.iter().map(|r| dir.display(r)).collect::<Vec<_>>(),
                    "closureSize": p.closure_size,
                });
                if let Some(ca) = &p.ca {
                    o["ca"] = json!(ca.to_string());
                }
                o
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HashAlgo;

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("store path")
    }

    const A: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
    const B: &str = "0a7qgvs4kgzsn8a6rb273saxyqh4jxlz-b";

    #[test]
    fn env_requests_pair_names_with_store_paths() {
        let dir = StoreDir::default();
        let got = env_requests(
            format!("g1 /nix/store/{A}\n\tg.2-x /nix/store/{B}/bin/sh ").as_bytes(),
            &dir,
        )
        .expect("requests");
        assert_eq!(
            got,
            vec![
                GraphRequest {
                    name: "g1".into(),
                    paths: BTreeSet::from([sp(A)])
                },
                GraphRequest {
                    name: "g.2-x".into(),
                    paths: BTreeSet::from([sp(B)])
                },
            ]
        );
    }

    #[test]
    fn env_requests_refuse_odd_lists_bad_names_and_other_paths() {
        let dir = StoreDir::default();
        let err = |v: String| env_requests(v.as_bytes(), &dir).expect_err(&v).to_string();
        assert!(err(format!("g /nix/store/{A} h")).contains("odd number of tokens"));
        for bad in [".attrs.json", "../x", "a/b", "1x", "-x"] {
            let e = err(format!("{bad} /nix/store/{A}"));
            assert!(e.contains("invalid file name"), "{e}");
        }
        let e = err("g /etc/passwd".into());
        assert!(e.contains("non-store path '/etc/passwd'"), "{e}");
        let e = err(format!("g /gnu/store/{A}"));
        assert!(e.contains("non-store path"), "{e}");
    }

    #[test]
    fn structured_requests_take_a_path_or_a_list() {
        let dir = StoreDir::default();
        let attrs = json!({"exportReferencesGraph": {
            "one": format!("/nix/store/{A}"),
            "two": [format!("/nix/store/{A}"), format!("/nix/store/{B}")],
        }});
        let got = structured_requests(attrs.as_object().expect("obj"), &dir).expect("requests");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].paths, BTreeSet::from([sp(A)]));
        assert_eq!(got[1].paths, BTreeSet::from([sp(A), sp(B)]));
        // Not an object: ignored, as Nix.
        let attrs = json!({"exportReferencesGraph": "x"});
        assert!(structured_requests(attrs.as_object().expect("obj"), &dir)
            .expect("ignored")
            .is_empty());
        let attrs = json!({"exportReferencesGraph": {"g": [1]}});
        assert!(structured_requests(attrs.as_object().expect("obj"), &dir).is_err());
        let attrs = json!({"exportReferencesGraph": {"g": format!("/nix/store/{A}/bin")}});
        assert!(structured_requests(attrs.as_object().expect("obj"), &dir).is_err());
    }

    #[test]
    fn text_form_is_nix_validity_registration_without_derivers() {
        let dir = StoreDir::default();
        let graph = BTreeMap::from([
            (sp(A), BTreeSet::from([sp(A), sp(B)])),
            (sp(B), BTreeSet::new()),
        ]);
        assert_eq!(
            validity_registration(&dir, &graph),
            format!("/nix/store/{B}\n\n0\n/nix/store/{A}\n\n2\n/nix/store/{B}\n/nix/store/{A}\n")
        );
    }

    #[test]
    fn json_form_is_nix_path_info_json() {
        let dir = StoreDir::default();
        let h = HashAlgo::Sha256.digest(b"x");
        let graph = [GraphPath {
            path: sp(A),
            references: BTreeSet::from([sp(B)]),
            nar_hash: h.clone(),
            nar_size: 120,
            ca: None,
            closure_size: 240,
        }];
        assert_eq!(
            super::super::json::dump(&graph_json(&dir, &graph)),
            format!(
                r#"[{{"closureSize":240,"narHash":"{}","narSize":120,"path":"/nix/store/{A}","references":["/nix/store/{B}"]}}]"#,
                h.to_nix32_prefixed()
            )
        );
    }
}
