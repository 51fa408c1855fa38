//! References graphs, structured attributes and output checks in real
//! builds (busybox derivations built by `sandoff build` as root), and the
//! same derivations built by Nix 2.8 as the oracle when it is installed;
//! Guix's `#:references-graphs` and derivations against a real guix-daemon
//! 1.4.0 when one is built (`../shared/guix-daemon`).

use std::collections::BTreeMap;
use std::path::Path;

use sandoff::store::{StoreDir, StorePath};
use serde_json::{json, Value};

use crate::build::{logical, text, Spec, Store};
use crate::support::{self, Need};
use crate::this_test;

/// `c`: an output that refers to busybox (so its closure has two paths).
fn referring_drv(s: &Store) -> (String, StorePath) {
    let c = s.drv(
        "c",
        Spec {
            script: "mkdir $out; echo $bb > $out/ref",
            env: &[("bb", &s.bb)],
            ..Spec::default()
        },
    );
    let out = s.build(&[&c]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c_out = s.out(&c);
    (c, c_out)
}

/// The text form of a graph, from what sandoff's store says (Nix's
/// `makeValidityRegistration(paths, false, false)` format).
fn registration(s: &Store, paths: &[&StorePath]) -> String {
    let mut sorted = paths.to_vec();
    sorted.sort();
    let mut want = String::new();
    for p in sorted {
        let refs = s.info(p).expect("valid").references;
        want.push_str(&format!("{}\n\n{}\n", s.dir.display(p), refs.len()));
        for r in &refs {
            want.push_str(&format!("{}\n", s.dir.display(r)));
        }
    }
    want
}

/// In a Nix and a Guix store: the graph files hold the closures, the
/// builder owns them and can read every path they list.
#[test]
fn references_graph_file_lists_the_closure_in_nix_text_format() {
    if !crate::build::ready(this_test!()) {
        return;
    }
    let guix = StoreDir::new("/gnu/store").expect("store dir");
    for s in [Store::new(), Store::with_dir(guix)] {
        let (c, c_out) = referring_drv(&s);
        let c_full = s.dir.display(&c_out);
        let graphs = format!("graph {c_full} bb {}/bin/busybox", s.bb);
        let a = s.drv(
            "a",
            Spec {
                script: "mkdir $out; cp graph bb $out/; stat -c %a graph > $out/mode; cat $c/ref > $out/read",
                inputs: &[(&c, "out")],
                env: &[("exportReferencesGraph", &graphs), ("c", &c_full)],
                ..Spec::default()
            },
        );
        let out = s.build(&[&a]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let a_out = s.real(&s.out(&a));
        let bb = s.path(&s.bb);
        let read = |n: &str| std::fs::read_to_string(a_out.join(n)).expect("read");
        assert_eq!(read("graph"), registration(&s, &[&c_out, &bb]));
        assert_eq!(read("bb"), registration(&s, &[&bb]));
        assert_eq!(read("mode"), "600\n");
        assert_eq!(read("read"), format!("{}\n", s.bb));
    }
}

/// A derivation whose input sources are `sources` (besides busybox),
/// running `script` as [`Store::drv`] does.
fn drv_with_sources(
    s: &Store,
    name: &str,
    script: &str,
    sources: &[&str],
    env: &[(&str, &str)],
) -> String {
    let bb = format!("{}/bin/busybox", s.bb);
    let script = format!(
        "set -eu\n{bb} mkdir -p $TMPDIR/bin\n{bb} --install -s $TMPDIR/bin\nexport PATH=$TMPDIR/bin\n{script}"
    );
    let mut srcs = vec![s.bb.clone()];
    srcs.extend(sources.iter().map(|p| p.to_string()));
    let mut vars = serde_json::Map::new();
    for (k, v) in [
        ("name", name),
        ("builder", &bb),
        ("system", "x86_64-linux"),
        ("out", ""),
    ]
    .into_iter()
    .chain(env.iter().copied())
    {
        vars.insert(k.to_owned(), json!(v));
    }
    let drv = json!({
        "outputs": {"out": {"path": ""}},
        "inputSrcs": srcs,
        "inputDrvs": {},
        "system": "x86_64-linux",
        "builder": bb,
        "args": ["sh", "-c", script],
        "env": vars,
    });
    support::derivation_add(&mut s.cmd(), &drv)
}

/// A graph of a `.drv` holds the closures of its outputs too (as Nix and
/// Guix), which the builder can then read; an output that is not valid
/// is refused, named.
#[test]
fn references_graph_of_a_derivation_includes_its_outputs() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (c, c_out) = referring_drv(&s);
    let c_full = logical(&c_out);
    let graphs = format!("g {c}");
    let a = drv_with_sources(
        &s,
        "a",
        "mkdir $out; cp g $out/; cat $c/ref > $out/read",
        &[&c],
        &[("exportReferencesGraph", &graphs), ("c", &c_full)],
    );
    let out = s.build(&[&a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a_out = s.real(&s.out(&a));
    let bb = s.path(&s.bb);
    let read = |n: &str| std::fs::read_to_string(a_out.join(n)).expect("read");
    assert_eq!(read("g"), registration(&s, &[&s.path(&c), &c_out, &bb]));
    assert_eq!(read("read"), format!("{}\n", s.bb));

    let unbuilt = s.script_drv("unbuilt", "mkdir $out");
    let graphs = format!("g {unbuilt}");
    let a = drv_with_sources(
        &s,
        "a",
        "mkdir $out",
        &[&unbuilt],
        &[("exportReferencesGraph", &graphs)],
    );
    let out = s.build(&[&a]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot export the references graph 'g': output 'out' ({}) of '{unbuilt}', in the graph, is not valid; build it first",
            logical(&s.out(&unbuilt))
        )),
        "{stderr}"
    );
}

#[test]
fn references_graphs_of_paths_outside_the_input_closure_are_refused() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (_, c_out) = referring_drv(&s);
    for (graphs, needle) in [
        (
            format!("g {}", logical(&c_out)),
            format!(
                "cannot export references of path '{}' because it is not in the input closure of the derivation",
                logical(&c_out)
            ),
        ),
        (
            "g /etc/passwd".to_owned(),
            "'exportReferencesGraph' contains a non-store path '/etc/passwd'".to_owned(),
        ),
        (
            format!("../g {}", s.bb),
            "invalid file name '../g' in 'exportReferencesGraph'".to_owned(),
        ),
        (
            format!("g {} h", s.bb),
            "odd number of tokens in 'exportReferencesGraph'".to_owned(),
        ),
    ] {
        let a = s.drv(
            "a",
            Spec {
                script: "mkdir $out",
                env: &[("exportReferencesGraph", &graphs)],
                ..Spec::default()
            },
        );
        let out = s.build(&[&a]);
        assert!(!out.status.success(), "{graphs}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&needle), "{graphs}: {stderr}");
        assert!(s.info(&s.out(&a)).is_none(), "{graphs}: registered");
    }
}

/// A structured-attributes derivation: `__json` holds `attrs`; the script
/// finds its output in `.attrs.json`, as a builder without `$out` must.
fn structured_drv(
    s: &Store,
    name: &str,
    attrs: Value,
    script: &str,
    inputs: &[(&str, &str)],
) -> String {
    let script = format!(
        "out=$(sed -n 's/.*\"outputs\":{{\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json)\n{script}"
    );
    s.drv(
        name,
        Spec {
            script: &script,
            inputs,
            env: &[("__json", &attrs.to_string())],
            ..Spec::default()
        },
    )
}

#[test]
fn structured_attrs_reach_the_builder_as_files_and_nothing_else() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (c, c_out) = referring_drv(&s);
    let attrs = json!({
        "flags": ["a b", "it's", 1, true],
        "str": "line1\nline2 $HOME `x`",
        "exportReferencesGraph": {"g": [logical(&c_out)]},
    });
    let a = structured_drv(
        &s,
        "a",
        attrs,
        "mkdir $out; cp $NIX_ATTRS_JSON_FILE $NIX_ATTRS_SH_FILE $out/; env | sort > $out/env; ls -A > $out/files",
        &[(&c, "out")],
    );
    let out = s.build(&[&a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a_out = s.out(&a);
    let dir = s.real(&a_out);
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect("read");

    let got: Value = serde_json::from_str(&read(".attrs.json")).expect("json");
    assert_eq!(got["outputs"], json!({"out": logical(&a_out)}));
    assert_eq!(got["flags"], json!(["a b", "it's", 1, true]));
    let graph = got["g"].as_array().expect("graph");
    let paths: Vec<&str> = graph
        .iter()
        .map(|p| p["path"].as_str().expect("path"))
        .collect();
    let mut want = vec![logical(&c_out), s.bb.clone()];
    want.sort_by_key(|p| s.path(p));
    assert_eq!(paths, want);
    let info = s.info(&c_out).expect("valid");
    let entry = graph
        .iter()
        .find(|p| p["path"] == json!(logical(&c_out)))
        .expect("c");
    assert_eq!(entry["narHash"], json!(info.nar_hash.to_nix32_prefixed()));
    assert_eq!(entry["narSize"], json!(info.nar_size));
    assert_eq!(entry["references"], json!([s.bb]));
    let bb_size = s.info(&s.path(&s.bb)).expect("valid").nar_size;
    assert_eq!(entry["closureSize"], json!(info.nar_size + bb_size));

    let sh = read(".attrs.sh");
    assert!(
        sh.contains("declare -a flags=('a b' 'it'\\''s' 1 1 )\n"),
        "{sh}"
    );
    assert!(
        sh.contains(&format!(
            "declare -A outputs=(['out']='{}' )\n",
            logical(&a_out)
        )),
        "{sh}"
    );
    assert!(
        sh.contains("declare str='line1\nline2 $HOME `x`'\n"),
        "{sh}"
    );

    let env = read("env");
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for absent in [
        "out",
        "__json",
        "name",
        "builder",
        "system",
        "exportReferencesGraph",
    ] {
        assert!(!names.contains(&absent), "{absent} passed: {env}");
    }
    assert!(
        env.contains("NIX_ATTRS_JSON_FILE=/tmp/sandoff-build/.attrs.json\n"),
        "{env}"
    );
    assert!(
        env.contains("NIX_ATTRS_SH_FILE=/tmp/sandoff-build/.attrs.sh\n"),
        "{env}"
    );
    assert!(read("files").contains(".attrs.json\n.attrs.sh\n"));
}

/// `stderr` says that `output` may not refer to `bad` by `check` (the
/// message's line breaks reach the terminal as spaces).
fn assert_refers(stderr: &str, output: &str, check: &str, bad: &str) {
    let head = format!(
        "output '{output}' is not allowed to refer to the following paths ({check} of output 'out'):"
    );
    let at = stderr
        .find(&head)
        .unwrap_or_else(|| panic!("{check}: {stderr}"));
    let rest = &stderr[at + head.len()..];
    assert!(
        rest.trim_start().starts_with(bad),
        "{check}: expected {bad}: {stderr}"
    );
}

/// `x`: outputs `out` (referring to `dev` and `c_out`) and `dev` (to
/// nothing), with `env` added.
fn checked_drv(s: &Store, c: &str, c_out: &StorePath, env: &[(&str, &str)]) -> String {
    let c_out = logical(c_out);
    let mut all = vec![("c", c_out.as_str())];
    all.extend_from_slice(env);
    s.drv(
        "x",
        Spec {
            script: "mkdir $out $dev; echo $dev $c > $out/refs; echo nothing > $dev/f",
            inputs: &[(c, "out")],
            outputs: &["dev", "out"],
            env: &all,
            ..Spec::default()
        },
    )
}

#[test]
fn each_reference_check_fails_naming_the_path_and_registers_nothing() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (c, c_out) = referring_drv(&s);
    let (cs, bbs) = (logical(&c_out), s.bb.clone());
    for (check, list, bad) in [
        ("allowedReferences", "dev".to_owned(), &cs),
        ("allowedRequisites", format!("dev {cs}"), &bbs),
        ("disallowedReferences", cs.clone(), &cs),
        ("disallowedRequisites", bbs.clone(), &bbs),
    ] {
        let x = checked_drv(&s, &c, &c_out, &[(check, &list)]);
        let out = s.build(&[&x]);
        assert!(!out.status.success(), "{check}");
        let stderr = text(&out.stderr);
        let outs = s.outputs(&x);
        assert_refers(&stderr, &logical(&outs["out"]), check, bad);
        assert!(stderr.contains("nothing was registered"), "{stderr}");
        for (name, p) in &outs {
            assert!(s.info(p).is_none(), "{check}: output {name} registered");
            assert!(
                !s.real(p).exists(),
                "{check}: output {name} left in the store"
            );
        }
    }
}

#[test]
fn reference_checks_that_hold_let_the_build_through() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (c, c_out) = referring_drv(&s);
    let (cs, bbs) = (logical(&c_out), s.bb.clone());
    let x = checked_drv(
        &s,
        &c,
        &c_out,
        &[
            ("allowedReferences", &format!("dev {cs}")),
            // `out` is no requisite of itself here (Nix's ignoreSelfRefs
            // without structured attributes).
            ("allowedRequisites", &format!("dev {cs} {bbs}")),
            ("disallowedReferences", &bbs),
            ("disallowedRequisites", "out"),
        ],
    );
    let out = s.build(&[&x]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for p in s.outputs(&x).values() {
        assert!(s.info(p).is_some());
    }
}

#[test]
fn structured_output_checks_bound_sizes_per_output() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let (c, c_out) = referring_drv(&s);
    let script = format!("mkdir $out; echo {} > $out/ref", logical(&c_out));
    let build = |checks: Value| {
        let x = structured_drv(
            &s,
            "sized",
            json!({"outputChecks": {"out": checks}}),
            &script,
            &[(&c, "out")],
        );
        (s.build(&[&x]), s.out(&x))
    };
    let (out, x_out) = build(json!({"maxSize": 1}));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("path '{}' is too large at ", logical(&x_out)))
            && stderr.contains("bytes; limit is 1 bytes (maxSize of output 'out')"),
        "{stderr}"
    );
    assert!(s.info(&x_out).is_none());

    let c_closure =
        s.info(&c_out).expect("valid").nar_size + s.info(&s.path(&s.bb)).expect("valid").nar_size;
    let (out, x_out) = build(json!({"maxClosureSize": c_closure}));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "closure of path '{}' is too large at ",
            logical(&x_out)
        )) && stderr.contains(&format!(
            "limit is {c_closure} bytes (maxClosureSize of output 'out')"
        )),
        "{stderr}"
    );
    assert!(s.info(&x_out).is_none());

    // Structured lists do not skip the output itself: `out` must be allowed.
    let (out, x_out) = build(json!({"maxSize": 1_000_000, "maxClosureSize": 100_000_000,
        "allowedRequisites": [logical(&c_out), s.bb]}));
    assert!(!out.status.success());
    let x = logical(&x_out);
    assert_refers(&text(&out.stderr), &x, "allowedRequisites", &x);
    let (out, x_out) = build(json!({"maxSize": 1_000_000, "maxClosureSize": 100_000_000,
        "allowedRequisites": ["out", logical(&c_out), s.bb]}));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.info(&x_out).is_some());
}

/// Adds the derivations of `nix show-derivation -r` output to `s`, inputs
/// first; returns their paths.
fn add_nix_derivations(s: &Store, shown: &Value) -> Vec<String> {
    let mut left: BTreeMap<&String, &Value> = shown.as_object().expect("object").iter().collect();
    let mut added = Vec::new();
    while !left.is_empty() {
        let ready: Vec<&String> = left
            .iter()
            .filter(|(_, d)| {
                d["inputDrvs"]
                    .as_object()
                    .is_none_or(|m| m.keys().all(|k| added.contains(k)))
            })
            .map(|(k, _)| *k)
            .collect();
        assert!(!ready.is_empty(), "derivations depend on each other");
        for path in ready {
            let drv = left.remove(path).expect("present");
            let got = support::derivation_add(&mut s.cmd(), &json!({ path.clone(): drv }));
            assert_eq!(&got, path);
            added.push(path.clone());
        }
    }
    added
}

/// Nix 2.8 builds `fixtures/attrs/graph.nix` now; sandoff builds the same
/// `.drv` files; the builders saw the same graph files and the same
/// `.attrs.json` and `.attrs.sh`, byte for byte, the same environment
/// variable names, and the outputs have the same references.
#[test]
fn references_graphs_and_structured_attrs_match_live_nix() {
    if !crate::build::ready(this_test!())
        || !support::require(
            this_test!(),
            &[
                Need::Program("nix-build"),
                Need::Program("nix"),
                Need::Program("nix-instantiate"),
            ],
        )
    {
        return;
    }
    let s = Store::new();
    let conf = s.tmp.path().join("nix-conf");
    let nix_root = s.tmp.path().join("nix");
    let src = s.tmp.path().join("src/busybox");
    let expr = support::fixtures().join("attrs/graph.nix");
    let nix = |program: &str| {
        let mut c = support::nix_cmd(program, &conf);
        c.arg("--store").arg(&nix_root);
        c
    };
    let lines = |b: Vec<u8>| -> Vec<String> { text(&b).lines().map(str::to_owned).collect() };
    let attr_args = |c: &mut std::process::Command| {
        c.arg(&expr)
            .arg("--arg")
            .arg("src")
            .arg(&src)
            .args(["-A", "plain", "-A", "structured"]);
    };
    let mut build = nix("nix-build");
    attr_args(&mut build);
    let nix_outs = lines(support::run_ok(build.arg("--no-out-link")));
    let mut inst = nix("nix-instantiate");
    attr_args(&mut inst);
    let drvs = lines(support::run_ok(&mut inst));
    let shown: Value = serde_json::from_slice(&support::run_ok(
        nix("nix").arg("show-derivation").arg("-r").args(&drvs),
    ))
    .expect("json");
    assert!(
        shown.to_string().contains(&s.bb),
        "Nix's busybox is not sandoff's {}",
        s.bb
    );
    add_nix_derivations(&s, &shown);
    let out = s.build(&[&drvs[0], &drvs[1]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ours = lines(out.stdout);
    assert_eq!(ours, nix_outs, "same derivations, same output paths");

    let nix_real = |p: &str| nix_root.join(p.trim_start_matches('/'));
    let ours_real = |p: &str| s.real(&s.path(p));
    let same = |out: &str, file: &str| {
        let want = std::fs::read(nix_real(out).join(file)).expect("nix's file");
        let got = std::fs::read(ours_real(out).join(file)).expect("our file");
        assert_eq!(text(&got), text(&want), "{file}");
    };
    same(&nix_outs[0], "g");
    same(&nix_outs[0], "g2");
    same(&nix_outs[1], ".attrs.json");
    same(&nix_outs[1], ".attrs.sh");

    let names = |dir: &Path| -> Vec<String> {
        let env = std::fs::read_to_string(dir.join("env")).expect("env");
        env.lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
            .collect()
    };
    assert_eq!(
        names(&ours_real(&nix_outs[1])),
        names(&nix_real(&nix_outs[1]))
    );

    for o in &nix_outs {
        let mut q = nix("nix-store");
        let theirs = lines(support::run_ok(q.args(["-q", "--references", o])));
        let mut mine: Vec<String> = s
            .info(&s.path(o))
            .expect("valid")
            .references
            .iter()
            .map(logical)
            .collect();
        mine.sort();
        let mut theirs = theirs;
        theirs.sort();
        assert_eq!(mine, theirs, "references of {o}");
    }
}

/// How a build ended, as far as the output checks go.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// `output` may not refer to `paths`.
    Refers {
        output: String,
        paths: Vec<String>,
    },
    /// `what` ("path" or "closure of path") `path` is `size` bytes.
    TooLarge {
        what: String,
        path: String,
        size: u64,
    },
}

/// The verdict in a failed build's `stderr` (Nix's or ours).
fn verdict(ok: bool, stderr: &str) -> Verdict {
    if ok {
        return Verdict::Pass;
    }
    let quoted_before = |at: usize, prefix: &str| -> String {
        let start = stderr[..at].rfind(prefix).expect("prefix") + prefix.len();
        let end = start + stderr[start..].find('\'').expect("quote");
        stderr[start..end].to_owned()
    };
    if let Some(at) = stderr.find("is not allowed to refer to the following paths") {
        let paths = stderr[at..]
            .split_whitespace()
            .skip_while(|t| !t.starts_with("/nix/store/"))
            .take_while(|t| t.starts_with("/nix/store/"))
            .map(str::to_owned)
            .collect();
        return Verdict::Refers {
            output: quoted_before(at, "output '"),
            paths,
        };
    }
    let at = stderr
        .find("is too large at ")
        .unwrap_or_else(|| panic!("no check failed: {stderr}"));
    let size = stderr[at + "is too large at ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("size");
    let what = if stderr[..at].contains("closure of path '") {
        "closure of path"
    } else {
        "path"
    };
    Verdict::TooLarge {
        what: what.to_owned(),
        path: quoted_before(at, "path '"),
        size,
    }
}

/// Each output check of `fixtures/attrs/checks.nix` built by Nix 2.8 now
/// and by sandoff: both pass, or both fail naming the same output, the
/// same paths, the same sizes. The one documented difference
/// (`ignoreSelfRefs` in `outputChecks`) is not exercised here.
#[test]
fn output_checks_agree_with_live_nix() {
    if !crate::build::ready(this_test!())
        || !support::require(
            this_test!(),
            &[
                Need::Program("nix-build"),
                Need::Program("nix"),
                Need::Program("nix-instantiate"),
            ],
        )
    {
        return;
    }
    let s = Store::new();
    let conf = s.tmp.path().join("nix-conf");
    let nix_root = s.tmp.path().join("nix");
    let src = s.tmp.path().join("src/busybox");
    let expr = support::fixtures().join("attrs/checks.nix");
    let nix = |program: &str| {
        let mut c = support::nix_cmd(program, &conf);
        c.arg("--store")
            .arg(&nix_root)
            .arg(&expr)
            .arg("--arg")
            .arg("src")
            .arg(&src);
        c
    };
    let attrs = [
        "allowed-references",
        "allowed-references-self",
        "allowed-requisites",
        "disallowed-references",
        "disallowed-requisites",
        "disallowed-requisites-output",
        "all-pass",
        "structured-max-size",
        "structured-max-closure-size",
        "structured-requisites-self",
        "structured-pass",
    ];
    let mut inst = nix("nix-instantiate");
    for a in attrs {
        inst.args(["-A", a]);
    }
    let drvs: Vec<String> = text(&support::run_ok(&mut inst))
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(drvs.len(), attrs.len());
    let mut show = support::nix_cmd("nix", &conf);
    show.arg("--store")
        .arg(&nix_root)
        .args(["show-derivation", "-r"])
        .args(&drvs);
    let shown: Value = serde_json::from_slice(&support::run_ok(&mut show)).expect("json");
    add_nix_derivations(&s, &shown);

    let mut passes = 0;
    for (attr, drv) in attrs.iter().zip(&drvs) {
        let theirs = nix("nix-build")
            .args(["--no-out-link", "-A", attr])
            .output()
            .expect("nix-build");
        let theirs = verdict(theirs.status.success(), &text(&theirs.stderr));
        let ours = s.build(&[drv]);
        let ours_ok = ours.status.success();
        assert_eq!(verdict(ours_ok, &text(&ours.stderr)), theirs, "{attr}");
        for p in s.outputs(drv).values() {
            assert_eq!(s.info(p).is_some(), ours_ok, "{attr}: registered or not");
        }
        passes += usize::from(ours_ok);
    }
    assert_eq!(passes, 2, "all-pass and structured-pass");
}

/// `.attrs.sh` read back by bash gives every string byte for byte, odd
/// ones included (quotes, newlines, `$`, backquotes, backslashes, globs).
#[test]
fn attrs_sh_reads_back_in_bash_byte_for_byte() {
    if !support::require_programs(this_test!(), &["bash"]) {
        return;
    }
    let odd = [
        "it's",
        "''",
        "'",
        "a\nb\n",
        "$HOME ${x} $(id) `id`",
        "back\\slash\\",
        "* ? [a] ~",
        "\"double\"",
        "tab\there",
        "é ☃ \u{7f}",
        "",
        " lead and trail ",
    ];
    let attrs = json!({
        "one": odd[0],
        "list": odd,
        "map": odd.iter().enumerate().map(|(i, s)| (format!("k{i} '{s}"), json!(s))).collect::<serde_json::Map<_, _>>(),
    });
    let sh = sandoff::derivation::attrs::shell::attrs_sh(attrs.as_object().expect("obj"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join(".attrs.sh");
    std::fs::write(&file, &sh).expect("write");
    let mut script = String::from("source \"$1\"\nprintf '%s\\0' \"$one\" \"${list[@]}\"\n");
    for (i, s) in odd.iter().enumerate() {
        let key = format!("k{i} '{s}");
        // The key, quoted for bash by the writer under test, as a subscript.
        script.push_str(&format!(
            "printf '%s\\0' \"${{map[{}]}}\"\n",
            sandoff::derivation::attrs::shell::shell_escape(&key)
        ));
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .arg("bash")
        .arg(&file)
        .output()
        .expect("bash");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Vec<String> = text(&out.stdout).split('\0').map(str::to_owned).collect();
    let mut want = vec![odd[0].to_owned()];
    want.extend(odd.iter().map(|s| s.to_string()));
    want.extend(odd.iter().map(|s| s.to_string()));
    want.push(String::new()); // after the last NUL
    assert_eq!(got, want, "{sh}");
}

/// Output placeholders (`builtins.placeholder`) in the arguments, the
/// environment and `passAsFile` files reach the builder as the output
/// paths, as Nix rewrites them.
#[test]
fn placeholders_become_output_paths() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    use sandoff::derivation::attrs::hash_placeholder;
    let (out_ph, dev_ph) = (hash_placeholder("out"), hash_placeholder("dev"));
    let script = format!(
        "mkdir $out $dev; echo {out_ph} > $out/arg; echo $x > $out/env; cat $yPath > $out/file"
    );
    let x = s.drv(
        "ph",
        Spec {
            script: &script,
            outputs: &["dev", "out"],
            env: &[
                ("x", &format!("{dev_ph}/lib")),
                ("y", &format!("--prefix={out_ph}")),
                ("passAsFile", "y"),
            ],
            ..Spec::default()
        },
    );
    let out = s.build(&[&x]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outs = s.outputs(&x);
    let (o, d) = (logical(&outs["out"]), logical(&outs["dev"]));
    let read = |n: &str| std::fs::read_to_string(s.real(&outs["out"]).join(n)).expect("read");
    assert_eq!(read("arg"), format!("{o}\n"));
    assert_eq!(read("env"), format!("{d}/lib\n"));
    assert_eq!(read("file"), format!("--prefix={o}"));
}

/// A guix-daemon 1.4.0 (built from `../shared/guix-daemon`) building
/// locally (its offload hook, sandoff with no machines, declines), with
/// its state under a directory of the test's, and Guix's own Guile client.
struct Guix {
    kit: std::path::PathBuf,
    socket: std::path::PathBuf,
    _daemon: crate::daemons::Running,
}

impl Guix {
    /// Starts one in `dir`, if the machine has what it needs (see the
    /// README of `../shared/guix-daemon`).
    fn start(test: &str, dir: &Path) -> Option<Guix> {
        let kit = std::env::var_os("SANDOFF_GUIX_KIT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/guix-kit".into());
        if !crate::build::ready(test)
            || !support::require(
                test,
                &[
                    Need::Program("guile"),
                    Need::Condition {
                        what:
                            "guix-daemon built from ../shared/guix-daemon (scripts/test.sh does it)",
                        met: kit.join("guix-daemon").is_file(),
                    },
                ],
            )
        {
            return None;
        }
        for cmd in [
            "getent group guixbuild >/dev/null || groupadd --system guixbuild",
            "getent passwd guixbuilder01 >/dev/null || useradd -g guixbuild -G guixbuild --system guixbuilder01",
            "mkdir -p /gnu/store && chgrp guixbuild /gnu/store && chmod 1775 /gnu/store",
        ] {
            support::run_ok(std::process::Command::new("sh").args(["-c", cmd]));
        }
        let socket = dir.join("socket");
        let guix = crate::daemons::sandoff_as(dir, "guix");
        let machines = dir.join("machines");
        std::fs::write(&machines, "").expect("machines");
        let daemon = crate::daemons::Running::spawn(
            std::process::Command::new(kit.join("guix-daemon"))
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", "/root")
                .env("GUIX_STATE_DIRECTORY", dir.join("var"))
                .env("GUIX_LOG_DIRECTORY", dir.join("log"))
                .env("GUIX_CONFIGURATION_DIRECTORY", dir.join("etc"))
                .env("GUIX", &guix)
                .env("SANDOFF_STATE_DIR", dir.join("sandoff"))
                .env("SANDOFF_MACHINES", &machines)
                .arg("--build-users-group=guixbuild")
                .arg(format!("--listen={}", socket.display()))
                .arg("--max-jobs=1"),
            dir,
            &socket,
        );
        Some(Guix {
            kit,
            socket,
            _daemon: daemon,
        })
    }

    /// Runs `tests/it/guix/<script>` with a tag no earlier run used
    /// (`/gnu/store` outlives the daemon), then `args`; returns what it said.
    fn client(&self, script: &str, args: &[&Path]) -> String {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let client = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/it/guix")
            .join(script);
        let out = support::output_or_kill(
            std::process::Command::new("guile")
                .env("GUIX_DAEMON_SOCKET", &self.socket)
                .args(["--no-auto-compile", "-L"])
                .arg(self.kit.join("src"))
                .arg(client)
                .arg(&tag)
                .args(args),
        );
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "{said}");
        said
    }
}

/// A directory `busybox` holding `bin/busybox`, under `dir`.
fn busybox_dir(dir: &Path) -> std::path::PathBuf {
    let bb_dir = dir.join("src/busybox");
    std::fs::create_dir_all(bb_dir.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", bb_dir.join("bin/busybox")).expect("busybox");
    bb_dir
}

/// guix-daemon 1.4.0 (built from `../shared/guix-daemon`) builds a
/// derivation with `#:references-graphs` made by Guix's own client; the
/// graph files its builder got are what sandoff writes for the same paths,
/// their references read from the daemon's database, byte for byte; and
/// sandoff, given Guix's `.drv` files as Guix exports them, builds the
/// same output with the same graph files.
#[test]
fn references_graph_files_match_a_live_guix_daemon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let Some(guix) = Guix::start(this_test!(), dir) else {
        return;
    };
    let gnu = StoreDir::new("/gnu/store").expect("store dir");
    let export = dir.join("drvs.export");
    let said = guix.client("graph.scm", &[&busybox_dir(dir), &export]);
    let outs: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("out "))
        .collect();
    let [dep_out, graph_out] = outs[..] else {
        panic!("{said}");
    };

    // The references of every valid path, from the daemon's database.
    let db = rusqlite::Connection::open(dir.join("var/db/db.sqlite")).expect("guix-daemon's db");
    let refs = |p: &str| -> std::collections::BTreeSet<StorePath> {
        let mut q = db
            .prepare(
                "select v2.path from Refs join ValidPaths v1 on v1.id = Refs.referrer \
                 join ValidPaths v2 on v2.id = Refs.reference where v1.path = ?",
            )
            .expect("query");
        q.query_map([p], |r| r.get::<_, String>(0))
            .expect("refs")
            .map(|r| gnu.parse_path(&r.expect("row")).expect("store path"))
            .collect()
    };
    let closure = |root: &str| -> BTreeMap<StorePath, std::collections::BTreeSet<StorePath>> {
        let mut graph = BTreeMap::new();
        let mut todo = vec![gnu.parse_path(root).expect("store path")];
        while let Some(p) = todo.pop() {
            if graph.contains_key(&p) {
                continue;
            }
            let r = refs(&gnu.display(&p));
            todo.extend(r.iter().cloned());
            graph.insert(p, r);
        }
        graph
    };
    let bb = said
        .lines()
        .find_map(|l| l.strip_prefix("drv "))
        .and_then(|d| std::fs::read_to_string(d).ok())
        .and_then(|drv| {
            drv.split('"')
                .find(|w| w.starts_with("/gnu/store/") && w.ends_with("-busybox"))
                .map(str::to_owned)
        })
        .expect("busybox in dep's .drv");
    for (file, root, size) in [("g", dep_out, 2), ("bb", bb.as_str(), 1)] {
        let graph = closure(root);
        assert_eq!(graph.len(), size, "{file}: {graph:?}");
        let ours = sandoff::derivation::attrs::graph::validity_registration(&gnu, graph.iter());
        let theirs = std::fs::read_to_string(Path::new(graph_out).join(file)).expect("guix's file");
        assert_eq!(ours, theirs, "{file}");
    }

    let s = Store::with_dir(gnu.clone());
    let imported = support::output_with_input(
        s.cmd().args(["store", "import", "--no-check-sigs"]),
        &std::fs::read(&export).expect("export"),
    );
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    let drvs: Vec<String> = said
        .lines()
        .filter_map(|l| l.strip_prefix("drv "))
        .map(str::to_owned)
        .collect();
    let out = s.build(&[&drvs[1]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), graph_out);
    for file in ["g", "bb"] {
        let theirs = std::fs::read(Path::new(graph_out).join(file)).expect("guix's file");
        let ours = std::fs::read(s.real(&s.path(graph_out)).join(file)).expect("our file");
        assert_eq!(text(&ours), text(&theirs), "{file}");
    }
}

/// Guix's derivations have no `name` variable: one whose input is a
/// fixed-output derivation (every Guix package has such inputs, its
/// sources) passes sandoff's `.drv` check when imported, its output path
/// being the one Guix computed.
#[test]
fn guix_derivations_with_fixed_output_inputs_pass_the_drv_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let Some(guix) = Guix::start(this_test!(), dir) else {
        return;
    };
    let export = dir.join("drvs.export");
    let said = guix.client("fixed.scm", &[&busybox_dir(dir), &export]);
    let drvs: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("drv "))
        .collect();
    assert_eq!(drvs.len(), 2, "{said}");
    let s = Store::with_dir(StoreDir::new("/gnu/store").expect("store dir"));
    let imported = support::output_with_input(
        s.cmd().args(["store", "import", "--no-check-sigs"]),
        &std::fs::read(&export).expect("export"),
    );
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    assert_eq!(text(&imported.stdout).lines().collect::<Vec<_>>(), drvs);
}
