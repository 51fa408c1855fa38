//! Derivations against golden files from Nix 2.8 (fixtures/drv) and against
//! a live `nix show-derivation`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use sandoff::derivation::{
    json, name_from_drv_path, Derivation, DerivationOutput, DrvHasher, OutputName,
};
use sandoff::store::{StoreDir, StorePath};

use crate::support;
use crate::this_test;

/// One golden derivation: its store dir, file and parsed form.
struct Fixture {
    dir: StoreDir,
    folder: PathBuf,
    path: StorePath,
    bytes: Vec<u8>,
}

impl Fixture {
    fn file(&self, suffix: &str) -> PathBuf {
        self.folder
            .join(format!("{}{suffix}", self.path.base_name()))
    }
    fn drv(&self) -> Derivation {
        Derivation::from_aterm(&self.bytes, &self.dir)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path))
    }
}

fn fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    for (sub, dir) in [("nix-store", "/nix/store"), ("gnu-store", "/gnu/store")] {
        let folder = support::fixtures().join("drv").join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".drv"))
            .collect();
        names.sort();
        for name in names {
            all.push(Fixture {
                dir: StoreDir::new(dir).unwrap(),
                bytes: std::fs::read(folder.join(&name)).unwrap(),
                path: StorePath::from_base_name(&name).unwrap(),
                folder: folder.clone(),
            });
        }
    }
    assert!(all.len() >= 20, "fixtures missing: {}", all.len());
    all
}

/// The `.drv` files of another implementation (fixtures/drv/`sub`, origin
/// in its ORIGIN.md or regen.sh), in store directory `dir`: no Nix JSON or
/// output lists beside them.
fn public_fixtures_in(sub: &str, dir: &str, count: usize) -> Vec<Fixture> {
    let folder = support::fixtures().join("drv").join(sub);
    let mut names: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".drv"))
        .collect();
    names.sort();
    let all: Vec<Fixture> = names
        .into_iter()
        .map(|name| Fixture {
            dir: StoreDir::new(dir).unwrap(),
            bytes: std::fs::read(folder.join(&name)).unwrap(),
            path: StorePath::from_base_name(&name).unwrap(),
            folder: folder.clone(),
        })
        .collect();
    assert_eq!(all.len(), count, "{sub} fixtures missing");
    all
}

fn public_fixtures(sub: &str, count: usize) -> Vec<Fixture> {
    public_fixtures_in(sub, "/nix/store", count)
}

/// tvix's nix-compat `.drv` files (fixtures/drv/tvix).
fn tvix_fixtures() -> Vec<Fixture> {
    public_fixtures("tvix", 10)
}

/// Derivations written by Guix 1.4.0's own client and daemon
/// (fixtures/drv/guix/regen.sh): no `name` variable at all.
fn guix_fixtures() -> Vec<Fixture> {
    public_fixtures_in("guix", "/gnu/store", 2)
}

/// Every `.drv` from other implementations: tvix's, go-nix's and Guix's.
fn other_fixtures() -> Vec<Fixture> {
    let mut all = tvix_fixtures();
    all.extend(public_fixtures("go-nix", 5));
    all.extend(guix_fixtures());
    all
}

/// Reads input derivations from the fixture folder, as a store would.
fn lookup_in(
    folder: &Path,
    dir: &StoreDir,
) -> impl FnMut(&StorePath) -> Result<Derivation, std::io::Error> {
    let folder = folder.to_owned();
    let dir = dir.clone();
    move |p| {
        let bytes = std::fs::read(folder.join(p.base_name()))?;
        Derivation::from_aterm(&bytes, &dir)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[test]
fn every_fixture_prints_back_byte_for_byte() {
    for f in fixtures().into_iter().chain(other_fixtures()) {
        assert_eq!(f.drv().to_aterm(&f.dir), f.bytes, "{}", f.path);
    }
}

/// Named after its `.drv` path as Nix names it, not after a `name`
/// variable (which structured-attrs derivations do not have).
#[test]
fn every_fixture_hashes_to_its_file_name() {
    for f in fixtures().into_iter().chain(other_fixtures()) {
        let name = name_from_drv_path(&f.path).unwrap();
        assert_eq!(f.drv().drv_path_named(name, &f.dir).unwrap(), f.path);
    }
}

#[test]
fn structured_attrs_and_guix_derivations_have_no_name_variable() {
    let mut cases = vec![
        fixture("structured-src.drv"),
        tvix_fixture("structured-attrs.drv"),
    ];
    cases.extend(guix_fixtures());
    for f in cases {
        let drv = f.drv();
        let guix = f.dir.as_str() == "/gnu/store";
        assert!(
            guix || drv.env.contains_key(b"__json".as_slice()),
            "{}",
            f.path
        );
        assert!(drv.env_name().is_err(), "{}", f.path);
        assert!(drv.drv_path(&f.dir).is_err(), "{}", f.path);
    }
}

/// The other implementations' outputs, recomputed from the derivations
/// with their inputs read from the same folder (tvix's foo depends on the
/// fixed-output bar); go-nix's derivations whose inputs are not in the set
/// are left out.
#[test]
fn public_output_paths_recompute() {
    let mut checked = 0;
    for f in other_fixtures() {
        let want = f.drv();
        if want
            .input_derivations
            .keys()
            .any(|p| !f.folder.join(p.base_name()).exists())
        {
            continue;
        }
        checked += 1;
        let mut drv = want.clone();
        for (name, output) in drv.outputs.iter_mut() {
            if matches!(output, DerivationOutput::InputAddressed { .. }) {
                *output = DerivationOutput::Deferred;
            }
            drv.env
                .insert(name.as_str().as_bytes().to_vec(), Vec::new());
        }
        let mut hasher = DrvHasher::new(f.dir.clone(), lookup_in(&f.folder, &f.dir));
        drv.fill_output_paths_named(name_from_drv_path(&f.path).unwrap(), &mut hasher)
            .unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(drv, want, "{}", f.path);
    }
    assert_eq!(
        checked, 14,
        "tvix's 10, go-nix's 2 without missing inputs, Guix's 2"
    );
}

/// A Nixpkgs `builtin:fetchurl` derivation (go-nix's `bash44-023`) is a
/// request sandoff can run: its `url`, flat, not executable.
#[test]
fn nixpkgs_fetchurl_derivation_is_a_fetch_request() {
    use sandoff::build::fetchurl::FetchRequest;
    let f = public_fixtures("go-nix", 5)
        .into_iter()
        .find(|f| f.path.name() == "bash44-023.drv")
        .unwrap();
    let request = FetchRequest::from_derivation(&f.drv()).unwrap();
    assert_eq!(
        request,
        FetchRequest {
            urls: vec!["https://ftpmirror.gnu.org/bash/bash-4.4-patches/bash44-023".to_owned()],
            unpack: false,
            executable: false,
        }
    );
}

/// Shown as JSON (bytes raw, as Nix 2.8) and read back: the same derivation
/// and name, for every fixture, UTF-8 or not.
#[test]
fn every_fixture_round_trips_through_json() {
    for f in fixtures().into_iter().chain(other_fixtures()) {
        let shown = json::show(&[(f.path.clone(), f.drv())].into(), &f.dir);
        let back = json::from_json(&shown, &f.dir).unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(back.derivation, f.drv(), "{}", f.path);
        assert_eq!(back.name, name_from_drv_path(&f.path).unwrap());
        assert_eq!(
            back.derivation.drv_path_named(&back.name, &f.dir).unwrap(),
            f.path
        );
    }
}

#[test]
fn recomputed_output_paths_equal_nixs() {
    for f in fixtures() {
        let want = f.drv();
        let mut drv = want.clone();
        for (name, output) in drv.outputs.iter_mut() {
            if matches!(output, DerivationOutput::InputAddressed { .. }) {
                *output = DerivationOutput::Deferred;
            }
            drv.env
                .insert(name.as_str().as_bytes().to_vec(), Vec::new());
        }
        let mut hasher = DrvHasher::new(f.dir.clone(), lookup_in(&f.folder, &f.dir));
        drv.fill_output_paths_named(name_from_drv_path(&f.path).unwrap(), &mut hasher)
            .unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(drv, want, "{}", f.path);

        let listed: BTreeSet<String> = std::fs::read_to_string(f.file(".outputs"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let ours: BTreeSet<String> = drv
            .output_paths()
            .values()
            .map(|p| f.dir.display(p))
            .collect();
        assert_eq!(ours, listed, "{}", f.path);
    }
}

#[test]
fn json_equals_nix_show_derivation() {
    for f in fixtures() {
        let want = std::fs::read(f.file(".json")).unwrap();
        let ours = json::show(&[(f.path.clone(), f.drv())].into(), &f.dir);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&want),
            "{}",
            f.path
        );
        assert_eq!(ours, want, "{}", f.path);
        // Nix's JSON reads back to the same derivation, UTF-8 or not.
        let back = json::from_json(&want, &f.dir).unwrap();
        assert_eq!(back.key, Some(f.dir.display(&f.path)));
        assert_eq!(back.derivation, f.drv(), "{}", f.path);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&want) {
            let ours_value: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            assert_eq!(ours_value, value);
        } else {
            assert!(
                f.path.name().contains("nasty"),
                "only the latin1 fixture is not UTF-8"
            );
        }
    }
}

fn fixture(name: &str) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.path.name() == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
}

fn tvix_fixture(name: &str) -> Fixture {
    tvix_fixtures()
        .into_iter()
        .find(|f| f.path.name() == name)
        .unwrap_or_else(|| panic!("no tvix fixture {name}"))
}

#[test]
fn nasty_strings_are_bytes() {
    let drv = fixture("nasty.drv").drv();
    let env = |k: &str| drv.env.get(k.as_bytes()).unwrap().clone();
    assert_eq!(env("latin"), b"caf\xe9 \xc5\xc4\xd6");
    assert_eq!(env("ctl"), b"\x01\x02\x1b\x7f");
    assert_eq!(env("cr"), b"a\rb");
    assert_eq!(env("float"), b"1.500000");
    assert_eq!(env("list"), b"a 1 1 2.250000 ");
    assert!(drv.env.contains_key(b"we ird\"key\\".as_slice()));
    assert_eq!(drv.args[3], b"ctl:\x01\x1f\x7f");
    assert_eq!(drv.args[4], b"latin1:\xe9\xff");
}

#[test]
fn multi_output_attributes() {
    // multi.nix sets preferLocalBuild and requiredSystemFeatures; chain.nix's multi does not.
    let multis: Vec<Derivation> = fixtures()
        .iter()
        .filter(|f| f.path.name() == "multi.drv")
        .map(Fixture::drv)
        .collect();
    assert_eq!(multis.len(), 2);
    let (local, plain): (Vec<_>, Vec<_>) =
        multis.into_iter().partition(Derivation::prefer_local_build);
    let want: BTreeSet<String> = ["big-parallel", "kvm"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(local[0].required_system_features(), want);
    assert!(plain[0].required_system_features().is_empty());
    assert_eq!(
        local[0]
            .outputs
            .keys()
            .map(OutputName::as_str)
            .collect::<Vec<_>>(),
        ["dev", "out"]
    );
    assert!(!local[0].is_fixed_output());
    assert!(fixture("flat-md5.drv").drv().is_fixed_output());
}

#[test]
fn mutated_fixtures_never_panic() {
    for f in fixtures() {
        for i in (0..f.bytes.len()).step_by(3) {
            let mut m = f.bytes.clone();
            m[i] ^= 0x22;
            let _ = Derivation::from_aterm(&m, &f.dir);
            let _ = Derivation::from_aterm(&f.bytes[..i], &f.dir);
        }
    }
}

/// A physical store root holding the fixture files of one folder.
fn store_root_with(folder: &Path, dir: &StoreDir) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join(dir.as_str().trim_start_matches('/'));
    std::fs::create_dir_all(&store).unwrap();
    for e in std::fs::read_dir(folder).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".drv") {
            std::fs::copy(e.path(), store.join(name)).unwrap();
        }
    }
    tmp
}

fn sandoff_in(root: &Path, dir: &StoreDir) -> Command {
    let mut c = support::sandoff();
    c.arg("--store-root")
        .arg(root)
        .arg("--store-dir")
        .arg(dir.as_str());
    c.env_remove("SANDOFF_STATE_DIR");
    c
}

/// Runs `sandoff derivation add` with `json` on stdin.
fn add_via_cli(root: &Path, dir: &StoreDir, json: &[u8]) -> std::process::Output {
    support::output_with_input(sandoff_in(root, dir).args(["derivation", "add"]), json)
}

#[test]
fn cli_show_prints_what_nix_printed() {
    for f in [
        fixture("top.drv"),
        fixture("guile-3.0.9.drv"),
        fixture("nasty.drv"),
    ] {
        let root = store_root_with(&f.folder, &f.dir);
        let out = support::run_ok(
            sandoff_in(root.path(), &f.dir)
                .args(["derivation", "show"])
                .arg(f.dir.display(&f.path)),
        );
        assert_eq!(out, std::fs::read(f.file(".json")).unwrap(), "{}", f.path);
    }
}

#[test]
fn cli_show_refuses_non_derivations_and_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let nix = StoreDir::default();
    for (arg, msg) in [
        (
            "/nix/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb",
            "is not a derivation",
        ),
        (
            "/gnu/store/d0x4sjwksanirbaxlb05009gy5lvia3q-bb.drv",
            "not in the store directory",
        ),
        (
            "/nix/store/4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv",
            "cannot read",
        ),
    ] {
        let out = sandoff_in(tmp.path(), &nix)
            .args(["derivation", "show", arg])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{arg}: {err}");
    }
}

/// tvix's `bar` FOD as `derivation add` input, with its output path wrong.
#[test]
fn cli_add_says_which_output_path_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let json = r#"{"outputs":{"out":{"path":"/nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n2-bar","hashAlgo":"r:sha256",
        "hash":"08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba"}},"inputSrcs":[],"inputDrvs":{},
        "system":":","builder":":","args":[],"env":{"builder":":","name":"bar","out":"","outputHash":"x","system":":"}}"#;
    let out = add_via_cli(tmp.path(), &StoreDir::default(), json.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("output 'out': expected path /nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar, given /nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n2-bar"),
        "{err}"
    );
}

/// `nix show-derivation` run now, on derivations instantiated now, gives
/// the bytes we give (several derivations in one call, sorted as Nix sorts).
#[test]
fn show_matches_live_nix() {
    if !support::require_programs(this_test!(), &["nix", "nix-instantiate"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("bb/bin")).unwrap();
    std::fs::write(work.join("bb/bin/busybox"), b"not really busybox\n").unwrap();
    let src = support::fixtures().join("drv");
    for n in ["chain.nix", "nasty.nix"] {
        std::fs::copy(src.join(n), work.join(n)).unwrap();
    }
    let conf = tmp.path().join("conf");
    let root = tmp.path().join("root");
    let mut drvs = Vec::new();
    for n in ["chain.nix", "nasty.nix"] {
        let out = support::run_ok(
            support::nix_cmd("nix-instantiate", &conf)
                .arg("--store")
                .arg(&root)
                .arg(work.join(n)),
        );
        drvs.push(String::from_utf8(out).unwrap().trim().to_owned());
    }
    let closure = support::run_ok(
        support::nix_cmd("nix-store", &conf)
            .arg("--store")
            .arg(&root)
            .arg("-qR")
            .args(&drvs),
    );
    let all: Vec<String> = String::from_utf8(closure)
        .unwrap()
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    assert_eq!(all.len(), 5);
    let want = support::run_ok(
        support::nix_cmd("nix", &conf)
            .args(["show-derivation", "--store"])
            .arg(&root)
            .args(&all),
    );
    let nix = StoreDir::default();
    let ours = support::run_ok(
        sandoff_in(&root, &nix)
            .args(["derivation", "show"])
            .args(&all),
    );
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(ours, want);
}

/// `derivation add` of the chain, from JSON with output paths left empty,
/// writes the same `.drv` files Nix wrote.
#[test]
fn cli_add_writes_what_nix_instantiate_wrote() {
    use sandoff::store::{FileIngestionMethod, HashAlgo, StoreLocation};

    let tmp = tempfile::tempdir().unwrap();
    let nix = StoreDir::default();
    let loc = StoreLocation::new(nix.clone(), tmp.path().to_owned());
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    // The bb directory with /bin/busybox, as regen.sh makes it.
    let bb = tmp.path().join("src/bb");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    let bb_path = store
        .add_path(&bb, FileIngestionMethod::Recursive, HashAlgo::Sha256)
        .unwrap();
    assert_eq!(bb_path.base_name(), "d0x4sjwksanirbaxlb05009gy5lvia3q-bb");

    // Dependencies first.
    for name in ["src.drv", "multi.drv", "dep.drv", "top.drv"] {
        let f = fixtures()
            .into_iter()
            .find(|f| {
                f.path.name() == name
                    && f.dir == nix
                    && (name != "multi.drv" || !f.drv().prefer_local_build())
            })
            .unwrap();
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.file(".json")).unwrap()).unwrap();
        let mut inner = value[nix.display(&f.path)].take();
        let outputs: Vec<String> = inner["outputs"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for o in &outputs {
            if inner["outputs"][o].get("hash").is_none() {
                inner["outputs"][o]["path"] = "".into();
            }
            inner["env"][o] = "".into();
        }
        let out = add_via_cli(tmp.path(), &nix, &serde_json::to_vec(&inner).unwrap());
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            nix.display(&f.path)
        );
        assert_eq!(std::fs::read(loc.real_path(&f.path)).unwrap(), f.bytes);
        let outs: BTreeMap<String, StorePath> = store.derivation_outputs(&f.path).unwrap();
        assert_eq!(outs, f.drv().output_paths());
    }
}

/// A store (under a temporary root) where `bb` (the fixtures' builder
/// directory, as regen.sh makes it) is valid.
fn store_with_bb(root: &Path) -> sandoff::store::local::LocalStore {
    use sandoff::store::{FileIngestionMethod, HashAlgo, StoreLocation};
    let loc = StoreLocation::new(StoreDir::default(), root.to_owned());
    let store = sandoff::derivation::check::open_store(loc).unwrap();
    let bb = root.join("src/bb");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    let bb_path = store
        .add_path(&bb, FileIngestionMethod::Recursive, HashAlgo::Sha256)
        .unwrap();
    assert_eq!(bb_path.base_name(), "d0x4sjwksanirbaxlb05009gy5lvia3q-bb");
    store
}

/// `derivation show` then `derivation add` gives the same `.drv`, byte for
/// byte: for non-UTF-8 derivations (Nix's raw JSON bytes), a structured-attrs
/// fixed-output derivation (no `name` variable: the name comes from the
/// path the JSON is keyed by) and one that depends on it (its output path
/// needs the other's modulo hash), and a `builtin:fetchurl` one.
#[test]
fn cli_show_then_add_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let nix = StoreDir::default();
    let _store = store_with_bb(tmp.path());
    let cases = [
        fixture("nasty.drv"),
        fixture("structured-src.drv"),
        fixture("uses-structured.drv"),
        fixture("hello.txt.drv"),
        tvix_fixture("cp1252.drv"),
        tvix_fixture("latin1.drv"),
        tvix_fixture("bar.drv"),
    ];
    let loc = sandoff::store::StoreLocation::new(nix.clone(), tmp.path().to_owned());
    for f in cases {
        // What `show` prints of the fixture file (put where a store has it).
        let holder = store_root_with(&f.folder, &f.dir);
        let shown = support::run_ok(
            sandoff_in(holder.path(), &f.dir)
                .args(["derivation", "show"])
                .arg(f.dir.display(&f.path)),
        );
        let out = add_via_cli(tmp.path(), &nix, &shown);
        assert!(
            out.status.success(),
            "{}: {}",
            f.path,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            nix.display(&f.path)
        );
        assert_eq!(
            std::fs::read(loc.real_path(&f.path)).unwrap(),
            f.bytes,
            "{}",
            f.path
        );
    }
}

/// `sandoff build` of Nix 2.8's structured-attrs fixed-output derivation and
/// of the derivation that depends on it: both added from Nix's JSON, built
/// in the sandbox, valid at the paths Nix computed.
#[test]
fn builds_a_dependent_of_a_structured_attrs_fod_at_nixs_paths() {
    if !crate::build::ready(this_test!()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let nix = StoreDir::default();
    let store = store_with_bb(tmp.path());
    for f in [
        fixture("structured-src.drv"),
        fixture("uses-structured.drv"),
    ] {
        let out = add_via_cli(tmp.path(), &nix, &std::fs::read(f.file(".json")).unwrap());
        assert!(
            out.status.success(),
            "{}: {}",
            f.path,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let top = fixture("uses-structured.drv");
    let out = sandoff_in(tmp.path(), &nix)
        .env_remove("SANDOFF_USER_POOL_DIR")
        .args(["build", "--local-only"])
        .arg(nix.display(&top.path))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = std::fs::read_to_string(top.file(".outputs"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        want
    );
    let src_out = fixture("structured-src.drv").drv().output_paths()["out"].clone();
    assert!(store.is_valid(&src_out).unwrap());
    let built = nix.parse_path(&want[0]).unwrap();
    let loc = sandoff::store::StoreLocation::new(nix.clone(), tmp.path().to_owned());
    assert_eq!(std::fs::read(loc.real_path(&built)).unwrap(), b"hello\n");
}

/// Guix's own derivations (no `name` variable) through `derivation show`
/// and `derivation add` in a `/gnu/store` store: the same `.drv` files, the
/// dependent's output path computed from its input named after its path.
#[test]
fn cli_show_then_add_round_trips_guix_derivations() {
    use sandoff::store::{FileIngestionMethod, HashAlgo, StoreLocation};
    let tmp = tempfile::tempdir().unwrap();
    let gnu = StoreDir::new("/gnu/store").unwrap();
    let loc = StoreLocation::new(gnu.clone(), tmp.path().to_owned());
    let store = sandoff::derivation::check::open_store(loc.clone()).unwrap();
    // As fixtures/drv/guix/regen.sh gives it to Guix's add-to-store.
    let bb = tmp.path().join("src/busybox");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    let bb_path = store
        .add_path(&bb, FileIngestionMethod::Recursive, HashAlgo::Sha256)
        .unwrap();
    assert_eq!(
        bb_path.base_name(),
        "j8w906i3y759zw69k13mibp2v4n2plpy-busybox"
    );
    for f in guix_fixtures().into_iter().rev() {
        // hjrk...-guix-hello-src sorts after 9ghl...-guix-hello: reversed,
        // the input comes first.
        let holder = store_root_with(&f.folder, &f.dir);
        let shown = support::run_ok(
            sandoff_in(holder.path(), &f.dir)
                .args(["derivation", "show"])
                .arg(f.dir.display(&f.path)),
        );
        let out = add_via_cli(tmp.path(), &gnu, &shown);
        assert!(
            out.status.success(),
            "{}: {}",
            f.path,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            gnu.display(&f.path)
        );
        assert_eq!(std::fs::read(loc.real_path(&f.path)).unwrap(), f.bytes);
    }
}
