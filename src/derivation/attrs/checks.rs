//! Output checks (Nix 2.8's `checkOutputs`): what each output of a build
//! may refer to and how large it may be, checked after the build and
//! before anything is registered.
//!
//! Where the checks come from:
//! - without structured attributes, the variables `allowedReferences`,
//!   `allowedRequisites`, `disallowedReferences`, `disallowedRequisites`
//!   (whitespace-separated), the same for every output, with an output's
//!   own path left out of its requisites (`ignoreSelfRefs`);
//! - with structured attributes, `outputChecks.<output>` with the same four
//!   lists, `maxSize`, `maxClosureSize` (NAR bytes) and `ignoreSelfRefs`
//!   (a Boolean, default false: an output's own path is then part of its
//!   requisites, as in Nix). The Nix manual documents `ignoreSelfRefs`
//!   there, but no Nix reads it (2.8 through 2.35 leave it false); we
//!   honour it as documented, since all it can do is let a self-reference
//!   pass a requisites list. A derivation that does not set it is judged
//!   exactly as Nix judges it (`tests/it/attrs.rs` checks that against
//!   Nix 2.8).
//!
//! An item of a list is a store path or the name of an output of this
//! derivation; anything else fails the build. "References" are an output's
//! direct references (its own path included when it refers to itself, so
//! `allowedReferences = []` fails an output that refers to itself, as in
//! Nix); "requisites" its whole closure.
//!
//! The checks run in Nix's order: outputs by name, and for each `maxSize`,
//! `maxClosureSize`, then the four lists in the order above; the first
//! failure is the error.
//!
//! Everything here is pure: the outputs' facts and those of the valid
//! paths they reach are given as data ([`PathFacts`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value};
use thiserror::Error;

use super::AttrsError;
use crate::store::{StoreDir, StorePath};

/// The four reference checks, in the order they run (their `Ord`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefCheck {
    /// Direct references must all be listed.
    AllowedReferences,
    /// The whole closure must be listed.
    AllowedRequisites,
    /// No direct reference may be listed.
    DisallowedReferences,
    /// Nothing in the closure may be listed.
    DisallowedRequisites,
}

impl RefCheck {
    const ALL: [RefCheck; 4] = [
        RefCheck::AllowedReferences,
        RefCheck::AllowedRequisites,
        RefCheck::DisallowedReferences,
        RefCheck::DisallowedRequisites,
    ];

    /// The attribute's name.
    pub fn name(self) -> &'static str {
        match self {
            RefCheck::AllowedReferences => "allowedReferences",
            RefCheck::AllowedRequisites => "allowedRequisites",
            RefCheck::DisallowedReferences => "disallowedReferences",
            RefCheck::DisallowedRequisites => "disallowedRequisites",
        }
    }

    fn allowed(self) -> bool {
        matches!(
            self,
            RefCheck::AllowedReferences | RefCheck::AllowedRequisites
        )
    }

    fn recursive(self) -> bool {
        matches!(
            self,
            RefCheck::AllowedRequisites | RefCheck::DisallowedRequisites
        )
    }
}

impl std::fmt::Display for RefCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The checks of one output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checks {
    /// Leave the output's own path out of its requisites.
    pub ignore_self_refs: bool,
    /// The largest NAR size allowed.
    pub max_size: Option<u64>,
    /// The largest closure size (sum of NAR sizes) allowed.
    pub max_closure_size: Option<u64>,
    /// The lists, by check; a check without a list is not made.
    pub lists: BTreeMap<RefCheck, Vec<String>>,
}

impl Checks {
    fn is_empty(&self) -> bool {
        self.max_size.is_none() && self.max_closure_size.is_none() && self.lists.is_empty()
    }
}

/// The checks of a derivation's outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputChecks {
    /// The same for every output (no structured attributes).
    All(Checks),
    /// Per output name (`outputChecks`).
    PerOutput(BTreeMap<String, Checks>),
}

impl OutputChecks {
    /// The checks of the variables of a derivation's environment.
    pub fn from_env(env: &BTreeMap<Vec<u8>, Vec<u8>>) -> OutputChecks {
        let mut checks = Checks {
            ignore_self_refs: true,
            ..Checks::default()
        };
        for check in RefCheck::ALL {
            if let Some(v) = env.get(check.name().as_bytes()) {
                let items = String::from_utf8_lossy(v)
                    .split(|c| " \t\n\r".contains(c))
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
                checks.lists.insert(check, items);
            }
        }
        OutputChecks::All(checks)
    }

    /// The checks of `outputChecks` in structured attributes.
    pub fn from_structured(attrs: &Map<String, Value>) -> Result<OutputChecks, AttrsError> {
        let mut per_output = BTreeMap::new();
        let Some(Value::Object(outputs)) = attrs.get("outputChecks") else {
            return Ok(OutputChecks::PerOutput(per_output));
        };
        for (output, spec) in outputs {
            let Value::Object(spec) = spec else {
                return Err(AttrsError::BadOutputChecks {
                    output: output.clone(),
                    why: "must be an object".to_owned(),
                });
            };
            let mut checks = Checks::default();
            for (field, slot) in [
                ("maxSize", &mut checks.max_size),
                ("maxClosureSize", &mut checks.max_closure_size),
            ] {
                if let Some(v) = spec.get(field) {
                    *slot = Some(v.as_u64().ok_or_else(|| AttrsError::BadOutputChecks {
                        output: output.clone(),
                        why: format!("'{field}' must be a non-negative integer, not {v}"),
                    })?);
                }
            }
            if let Some(v) = spec.get("ignoreSelfRefs") {
                checks.ignore_self_refs =
                    v.as_bool().ok_or_else(|| AttrsError::BadOutputChecks {
                        output: output.clone(),
                        why: format!("'ignoreSelfRefs' must be a Boolean, not {v}"),
                    })?;
            }
            for check in RefCheck::ALL {
                let Some(v) = spec.get(check.name()) else {
                    continue;
                };
                // nlohmann iterates a scalar as a one-element list.
                let items: Vec<&Value> = match v {
                    Value::Array(items) => items.iter().collect(),
                    Value::Object(map) => map.values().collect(),
                    v => vec![v],
                };
                let items = items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(AttrsError::BadOutputChecks {
                            output: output.clone(),
                            why: format!("'{}' must be a list of strings", check.name()),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                checks.lists.insert(check, items);
            }
            per_output.insert(output.clone(), checks);
        }
        Ok(OutputChecks::PerOutput(per_output))
    }

    /// Whether there is nothing to check.
    pub fn is_empty(&self) -> bool {
        match self {
            OutputChecks::All(c) => c.is_empty(),
            OutputChecks::PerOutput(m) => m.values().all(Checks::is_empty),
        }
    }

    /// The checks of output `name`, if any.
    fn of(&self, name: &str) -> Option<&Checks> {
        match self {
            OutputChecks::All(c) => Some(c),
            OutputChecks::PerOutput(m) => m.get(name),
        }
        .filter(|c| !c.is_empty())
    }
}

/// What the checks need to know about a path: its references and NAR size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathFacts {
    /// Its references (itself included if it refers to itself).
    pub references: BTreeSet<StorePath>,
    /// Its NAR size.
    pub nar_size: u64,
}

/// Why the outputs of a build fail their checks.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CheckError {
    /// An output is larger than `maxSize`.
    #[error("path '{path}' is too large at {size} bytes; limit is {limit} bytes (maxSize of output '{output}')")]
    TooLarge {
        /// The output's name.
        output: String,
        /// Its path, in full.
        path: String,
        /// Its NAR size.
        size: u64,
        /// `maxSize`.
        limit: u64,
    },
    /// An output's closure is larger than `maxClosureSize`.
    #[error("closure of path '{path}' is too large at {size} bytes; limit is {limit} bytes (maxClosureSize of output '{output}')")]
    ClosureTooLarge {
        /// The output's name.
        output: String,
        /// Its path, in full.
        path: String,
        /// Its closure size.
        size: u64,
        /// `maxClosureSize`.
        limit: u64,
    },
    /// An output refers to paths a check forbids.
    #[error("output '{path}' is not allowed to refer to the following paths ({check} of output '{output}'):{}",
        paths.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Refers {
        /// The output's name.
        output: String,
        /// Its path, in full.
        path: String,
        /// The check that failed.
        check: RefCheck,
        /// The offending paths, in full.
        paths: Vec<String>,
    },
    /// A list item is neither a store path nor an output name.
    #[error("derivation contains an illegal reference specifier '{item}' (in {check} of output '{output}'): expected a store path or the name of one of its outputs")]
    BadSpecifier {
        /// The output whose checks hold it.
        output: String,
        /// The list.
        check: RefCheck,
        /// The item.
        item: String,
    },
    /// A path in an output's closure is neither an output nor described
    /// in the facts given (the caller's bug, or a store changing under us).
    #[error("cannot check output '{output}': no information about '{path}' in its closure")]
    Unknown {
        /// The output's name.
        output: String,
        /// The path, in full.
        path: String,
    },
}

/// Checks the built `outputs` (by name: path and facts) against `checks`.
/// `valid` must describe every path outside `outputs` that their closures
/// reach.
pub fn check_outputs(
    dir: &StoreDir,
    checks: &OutputChecks,
    outputs: &BTreeMap<String, (StorePath, PathFacts)>,
    valid: &BTreeMap<StorePath, PathFacts>,
) -> Result<(), CheckError> {
    let by_path: BTreeMap<&StorePath, &PathFacts> = outputs.values().map(|(p, f)| (p, f)).collect();
    for (name, (path, facts)) in outputs {
        let Some(checks) = checks.of(name) else {
            continue;
        };
        let full = dir.display(path);
        let closure = || -> Result<(BTreeSet<StorePath>, u64), CheckError> {
            let mut done = BTreeSet::new();
            let mut size = 0u64;
            let mut todo = VecDeque::from([path.clone()]);
            while let Some(p) = todo.pop_front() {
                if done.contains(&p) {
                    continue;
                }
                let f = by_path
                    .get(&p)
                    .copied()
                    .or_else(|| valid.get(&p))
                    .ok_or_else(|| CheckError::Unknown {
                        output: name.clone(),
                        path: dir.display(&p),
                    })?;
                size = size.saturating_add(f.nar_size);
                todo.extend(f.references.iter().cloned());
                done.insert(p);
            }
            Ok((done, size))
        };
        if let Some(limit) = checks.max_size {
            if facts.nar_size > limit {
                return Err(CheckError::TooLarge {
                    output: name.clone(),
                    path: full,
                    size: facts.nar_size,
                    limit,
                });
            }
        }
        if let Some(limit) = checks.max_closure_size {
            let (_, size) = closure()?;
            if size > limit {
                return Err(CheckError::ClosureTooLarge {
                    output: name.clone(),
                    path: full,
                    size,
                    limit,
                });
            }
        }
        for (check, items) in &checks.lists {
            let mut spec = BTreeSet::new();
            for item in items {
                if let Ok(p) = dir.parse_path(item) {
                    spec.insert(p);
                } else if let Some((p, _)) = outputs.get(item) {
                    spec.insert(p.clone());
                } else {
                    return Err(CheckError::BadSpecifier {
                        output: name.clone(),
                        check: *check,
                        item: item.clone(),
                    });
                }
            }
            let mut used = if check.recursive() {
                closure()?.0
            } else {
                facts.references.clone()
            };
            if check.recursive() && checks.ignore_self_refs {
                used.remove(path);
            }
            let bad: Vec<String> = used
                .iter()
                .filter(|p| spec.contains(*p) != check.allowed())
                .map(|p| dir.display(p))
                .collect();
            if !bad.is_empty() {
                return Err(CheckError::Refers {
                    output: name.clone(),
                    path: full,
                    check: *check,
                    paths: bad,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).expect("store path")
    }
    const OUT: &str = "00000000000000000000000000000001-x";
    const DEV: &str = "00000000000000000000000000000002-x-dev";
    const LIB: &str = "00000000000000000000000000000003-lib";
    const BASH: &str = "00000000000000000000000000000004-bash";
    fn full(b: &str) -> String {
        format!("/nix/store/{b}")
    }

    /// out -> {out, lib, dev}; dev -> {bash}; lib -> {bash}; bash -> {}.
    fn world() -> (
        BTreeMap<String, (StorePath, PathFacts)>,
        BTreeMap<StorePath, PathFacts>,
    ) {
        let facts = |refs: &[&str], size| PathFacts {
            references: refs.iter().map(|r| sp(r)).collect(),
            nar_size: size,
        };
        let outputs = BTreeMap::from([
            ("out".to_owned(), (sp(OUT), facts(&[OUT, LIB, DEV], 1000))),
            ("dev".to_owned(), (sp(DEV), facts(&[BASH], 100))),
        ]);
        let valid = BTreeMap::from([(sp(LIB), facts(&[BASH], 10)), (sp(BASH), facts(&[], 1))]);
        (outputs, valid)
    }

    fn env_checks(pairs: &[(&str, String)]) -> OutputChecks {
        OutputChecks::from_env(
            &pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn run(checks: &OutputChecks) -> Result<(), CheckError> {
        let (outputs, valid) = world();
        check_outputs(&StoreDir::default(), checks, &outputs, &valid)
    }

    #[test]
    fn no_checks_pass() {
        assert_eq!(run(&env_checks(&[])), Ok(()));
        assert_eq!(run(&OutputChecks::PerOutput(BTreeMap::new())), Ok(()));
    }

    #[test]
    fn allowed_references_take_paths_and_output_names() {
        let ok = env_checks(&[(
            "allowedReferences",
            format!("out dev {} {}", full(LIB), full(BASH)),
        )]);
        assert_eq!(run(&ok), Ok(()));
        // A self-reference is a reference: `out` must be allowed.
        let err = run(&env_checks(&[(
            "allowedReferences",
            format!("dev {} {}", full(LIB), full(BASH)),
        )]))
        .expect_err("self reference");
        assert_eq!(
            err,
            CheckError::Refers {
                output: "out".into(),
                path: full(OUT),
                check: RefCheck::AllowedReferences,
                paths: vec![full(OUT)],
            }
        );
        assert!(err.to_string().contains(&format!(
            "is not allowed to refer to the following paths (allowedReferences of output 'out'):\n  {}",
            full(OUT)
        )));
    }

    #[test]
    fn allowed_requisites_ignore_self_without_structured_attrs() {
        // out's closure: out, lib, dev, bash; dev's: dev, bash.
        let ok = env_checks(&[(
            "allowedRequisites",
            format!("dev {} {}", full(LIB), full(BASH)),
        )]);
        assert_eq!(run(&ok), Ok(()));
        let err = run(&env_checks(&[(
            "allowedRequisites",
            format!("dev {}", full(LIB)),
        )]))
        .expect_err("bash");
        // dev (alphabetically first) is checked first and fails on bash.
        assert!(
            matches!(&err, CheckError::Refers { output, check: RefCheck::AllowedRequisites, paths, .. }
                if output == "dev" && paths == &vec![full(BASH)]),
            "{err:?}"
        );
    }

    #[test]
    fn disallowed_references_and_requisites_name_the_path() {
        let err = run(&env_checks(&[("disallowedReferences", full(LIB))])).expect_err("lib");
        assert!(
            matches!(&err, CheckError::Refers { output, check: RefCheck::DisallowedReferences, paths, .. }
                if output == "out" && paths == &vec![full(LIB)]),
            "{err:?}"
        );
        // bash is no direct reference of out, but a requisite of both.
        assert!(run(&env_checks(&[("disallowedReferences", full(BASH))]))
            .map_err(|e| e.to_string())
            .expect_err("dev refers to bash directly")
            .contains("(disallowedReferences of output 'dev')"));
        let err = run(&env_checks(&[("disallowedRequisites", full(BASH))])).expect_err("bash");
        assert!(
            matches!(&err, CheckError::Refers { output, check: RefCheck::DisallowedRequisites, paths, .. }
                if output == "dev" && paths == &vec![full(BASH)]),
            "{err:?}"
        );
        // An output can forbid another.
        let err = run(&env_checks(&[("disallowedRequisites", "dev".into())])).expect_err("dev");
        assert!(
            matches!(&err, CheckError::Refers { output, paths, .. } if output == "out" && paths == &vec![full(DEV)]),
            "{err:?}"
        );
    }

    #[test]
    fn illegal_specifiers_fail() {
        let err = run(&env_checks(&[("allowedReferences", "nope".into())])).expect_err("nope");
        assert_eq!(
            err,
            CheckError::BadSpecifier {
                output: "dev".into(),
                check: RefCheck::AllowedReferences,
                item: "nope".into()
            }
        );
    }

    #[test]
    fn structured_checks_are_per_output_and_skip_self_only_when_asked() {
        let attrs = json!({"outputChecks": {
            "out": {"maxSize": 1000, "maxClosureSize": 1111},
            "dev": {"allowedRequisites": [full(BASH)]},
        }});
        let checks =
            OutputChecks::from_structured(attrs.as_object().expect("obj")).expect("checks");
        // dev's closure holds dev itself, which structured checks do not skip.
        let err = run(&checks).expect_err("dev itself");
        assert!(
            matches!(&err, CheckError::Refers { output, paths, .. } if output == "dev" && paths == &vec![full(DEV)]),
            "{err:?}"
        );
        let attrs = json!({"outputChecks": {
            "out": {"maxSize": 1000, "maxClosureSize": 1111},
            "dev": {"allowedRequisites": ["dev", full(BASH)], "ignoreSelfRefs": true},
        }});
        let checks =
            OutputChecks::from_structured(attrs.as_object().expect("obj")).expect("checks");
        assert_eq!(run(&checks), Ok(()));
    }

    #[test]
    fn sizes_are_nar_sizes_and_closure_sums() {
        let structured = |v: Value| {
            OutputChecks::from_structured(
                json!({ "outputChecks": { "out": v } })
                    .as_object()
                    .expect("obj"),
            )
            .expect("checks")
        };
        assert_eq!(
            run(&structured(json!({"maxSize": 999}))),
            Err(CheckError::TooLarge {
                output: "out".into(),
                path: full(OUT),
                size: 1000,
                limit: 999
            })
        );
        // out + lib + dev + bash = 1000 + 10 + 100 + 1.
        let err = run(&structured(json!({"maxClosureSize": 1110}))).expect_err("closure");
        assert_eq!(
            err.to_string(),
            format!("closure of path '{}' is too large at 1111 bytes; limit is 1110 bytes (maxClosureSize of output 'out')", full(OUT))
        );
        assert!(OutputChecks::from_structured(
            json!({"outputChecks": {"out": {"maxSize": "1"}}})
                .as_object()
                .expect("obj")
        )
        .is_err());
        assert!(OutputChecks::from_structured(
            json!({"outputChecks": {"out": {"allowedReferences": [1]}}})
                .as_object()
                .expect("obj")
        )
        .is_err());
    }

    #[test]
    fn a_path_missing_from_the_facts_is_an_error_not_a_pass() {
        let (outputs, mut valid) = world();
        valid.remove(&sp(BASH));
        let err = check_outputs(
            &StoreDir::default(),
            &env_checks(&[("disallowedRequisites", full(LIB))]),
            &outputs,
            &valid,
        )
        .expect_err("unknown");
        assert!(matches!(err, CheckError::Unknown { .. }), "{err:?}");
    }
}
