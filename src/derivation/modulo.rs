//! `hashDerivationModulo` and output paths (formats.md §6), as Nix 2.8
//! computes them (`derivations.cc`, `primops.cc` `derivationStrict`).
//!
//! An input-addressed output path hashes the derivation with each input
//! derivation replaced by *its* modulo hash, so that a fixed-output input
//! contributes only its declared content hash: changing how a source is
//! fetched does not change anything built from it. Input derivations are
//! read through a caller-supplied lookup and memoised; the walk over them is
//! iterative with an explicit stack, so deep chains cannot overflow the
//! stack and a cycle (impossible in a real store, possible from a lookup) is
//! reported instead of looping.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::aterm;
use super::{
    name_from_drv_path, Derivation, DerivationError, DerivationKind, DerivationOutput, OutputName,
};
use crate::store::path::output_path_name;
use crate::store::{Hash, HashAlgo, StoreDir, StorePath};

/// Whether a modulo hash is final or depends on outputs not known yet
/// (floating content-addressed or impure derivations upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrvHashKind {
    /// The hash is final.
    Regular,
    /// Depends on content-addressed or impure outputs not known yet.
    Deferred,
}

/// The modulo hash of a derivation, per output (`DrvHash`). For a
/// fixed-output derivation `out` maps to the hash of its content address;
/// otherwise every output maps to the same hash of the rewritten `.drv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrvHash {
    /// SHA-256 per output name.
    pub hashes: BTreeMap<OutputName, Hash>,
    /// Whether the hashes are final.
    pub kind: DrvHashKind,
}

/// Computes modulo hashes, reading input derivations through `lookup` and
/// remembering each one's hash by path.
pub struct DrvHasher<F> {
    dir: StoreDir,
    lookup: F,
    memo: HashMap<StorePath, DrvHash>,
}

impl<F, E> DrvHasher<F>
where
    F: FnMut(&StorePath) -> Result<Derivation, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A hasher for derivations in `dir`; `lookup` returns the derivation
    /// stored at a `.drv` path.
    pub fn new(dir: StoreDir, lookup: F) -> DrvHasher<F> {
        DrvHasher {
            dir,
            lookup,
            memo: HashMap::new(),
        }
    }

    /// The store directory the derivations' paths are in.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    /// `hashDerivationModulo(drv, maskOutputs)` of a derivation named after
    /// its `name` variable ([`Derivation::env_name`], needed only when it is
    /// a fixed-output one); see [`DrvHasher::hash_modulo_named`].
    pub fn hash_modulo(
        &mut self,
        drv: &Derivation,
        mask_outputs: bool,
    ) -> Result<DrvHash, DerivationError> {
        self.memoise_inputs(drv)?;
        hash_with_known_inputs(drv, None, &self.dir, mask_outputs, &self.memo)
    }

    /// `hashDerivationModulo(drv, maskOutputs)` of a derivation named `name`.
    /// Input derivations are named after their paths, as Nix reads them.
    pub fn hash_modulo_named(
        &mut self,
        drv: &Derivation,
        name: &str,
        mask_outputs: bool,
    ) -> Result<DrvHash, DerivationError> {
        self.memoise_inputs(drv)?;
        hash_with_known_inputs(drv, Some(name), &self.dir, mask_outputs, &self.memo)
    }

    /// The (unmasked, memoised) modulo hash of the derivation at `path`.
    pub fn hash_of_path(&mut self, path: &StorePath) -> Result<DrvHash, DerivationError> {
        if let Some(h) = self.memo.get(path) {
            return Ok(h.clone());
        }
        let drv = self.read(path)?;
        let h = self.hash_modulo_named(&drv, name_from_drv_path(path)?, false)?;
        self.memo.insert(path.clone(), h.clone());
        Ok(h)
    }

    fn read(&mut self, path: &StorePath) -> Result<Derivation, DerivationError> {
        (self.lookup)(path).map_err(|e| DerivationError::Lookup {
            path: self.dir.display(path),
            source: e.into(),
        })
    }

    /// Depth-first, post-order: a derivation is hashed once all its inputs are.
    fn memoise_inputs(&mut self, root: &Derivation) -> Result<(), DerivationError> {
        let mut stack: Vec<(StorePath, Derivation, Vec<StorePath>)> = Vec::new();
        let mut on_stack: HashSet<StorePath> = HashSet::new();
        let mut pending: Vec<StorePath> = root.input_derivations.keys().rev().cloned().collect();
        loop {
            // The next input of the top of the stack (or of the root) to visit.
            let next = match stack.last_mut() {
                Some((_, _, todo)) => todo.pop(),
                None => pending.pop(),
            };
            match next {
                Some(path) => {
                    if self.memo.contains_key(&path) {
                        continue;
                    }
                    if on_stack.contains(&path) {
                        return Err(DerivationError::Cycle(self.dir.display(&path)));
                    }
                    let drv = self.read(&path)?;
                    let todo = drv.input_derivations.keys().rev().cloned().collect();
                    on_stack.insert(path.clone());
                    stack.push((path, drv, todo));
                }
                None => {
                    let Some((path, drv, _)) = stack.pop() else {
                        return Ok(());
                    };
                    let name = name_from_drv_path(&path)?;
                    let h = hash_with_known_inputs(&drv, Some(name), &self.dir, false, &self.memo)?;
                    on_stack.remove(&path);
                    self.memo.insert(path, h);
                }
            }
        }
    }
}

/// One step of `hashDerivationModulo`, with every input's hash in `memo`.
/// `name` is the derivation's (`None`: its `name` variable), which only a
/// fixed output's path needs.
fn hash_with_known_inputs(
    drv: &Derivation,
    name: Option<&str>,
    dir: &StoreDir,
    mask_outputs: bool,
    memo: &HashMap<StorePath, DrvHash>,
) -> Result<DrvHash, DerivationError> {
    let kind = drv.kind()?;
    match kind {
        DerivationKind::Fixed => {
            let drv_name = match name {
                Some(n) => n,
                None => drv.env_name()?,
            };
            let mut hashes = BTreeMap::new();
            for (name, output) in &drv.outputs {
                if let DerivationOutput::CAFixed { method, hash, .. } = output {
                    // Nix hashes the path it computes, not the one written.
                    let path = dir.make_fixed_output_path(
                        *method,
                        hash,
                        &output_path_name(drv_name, name.as_str()),
                        [],
                        false,
                    )?;
                    let s = format!(
                        "fixed:out:{}:{}:{}",
                        output.hash_algo(),
                        hash.to_base16(),
                        dir.display(&path)
                    );
                    hashes.insert(name.clone(), HashAlgo::Sha256.digest(s.as_bytes()));
                }
            }
            return Ok(DrvHash {
                hashes,
                kind: DrvHashKind::Regular,
            });
        }
        DerivationKind::Impure => {
            let h = HashAlgo::Sha256.digest(b"impure");
            let hashes = drv.outputs.keys().map(|o| (o.clone(), h.clone())).collect();
            return Ok(DrvHash {
                hashes,
                kind: DrvHashKind::Deferred,
            });
        }
        _ => {}
    }
    let mut kind = if kind == DerivationKind::Floating {
        DrvHashKind::Deferred
    } else {
        DrvHashKind::Regular
    };
    let mut inputs: BTreeMap<String, BTreeSet<OutputName>> = BTreeMap::new();
    for (path, outs) in &drv.input_derivations {
        let input = memo
            .get(path)
            .ok_or_else(|| DerivationError::Cycle(dir.display(path)))?;
        if input.kind == DrvHashKind::Deferred {
            kind = DrvHashKind::Deferred;
        }
        for o in outs {
            let h = input
                .hashes
                .get(o)
                .ok_or_else(|| DerivationError::NoHashForOutput {
                    drv: dir.display(path),
                    output: o.to_string(),
                })?;
            inputs.entry(h.to_base16()).or_default().insert(o.clone());
        }
    }
    let h = HashAlgo::Sha256.digest(&aterm::print(drv, dir, mask_outputs, Some(&inputs)));
    let hashes = drv.outputs.keys().map(|o| (o.clone(), h.clone())).collect();
    Ok(DrvHash { hashes, kind })
}

/// The output paths `drv` (of `kind`) gives, named after `name`:
/// input-addressed ones from its modulo hash with outputs masked (their
/// variables must hold the paths or be empty), a fixed output's from its
/// declared hash. Floating, impure and deferred outputs have none yet: an
/// [`DerivationError::UnsupportedKind`].
pub fn expected_output_paths<F, E>(
    drv: &Derivation,
    kind: DerivationKind,
    name: &str,
    hasher: &mut DrvHasher<F>,
) -> Result<BTreeMap<OutputName, StorePath>, DerivationError>
where
    F: FnMut(&StorePath) -> Result<Derivation, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let dir = hasher.store_dir().clone();
    let mut expected = BTreeMap::new();
    match kind {
        DerivationKind::InputAddressed { .. } => {
            let h = hasher.hash_modulo_named(drv, name, true)?;
            if h.kind == DrvHashKind::Deferred {
                return Err(DerivationError::UnsupportedKind(
                    "input-addressed with content-addressed inputs",
                ));
            }
            for (o, hash) in &h.hashes {
                expected.insert(o.clone(), dir.make_output_path(o.as_str(), hash, name)?);
            }
        }
        DerivationKind::Fixed => {
            for (o, output) in &drv.outputs {
                if let DerivationOutput::CAFixed { method, hash, .. } = output {
                    let out_name = output_path_name(name, o.as_str());
                    expected.insert(
                        o.clone(),
                        dir.make_fixed_output_path(*method, hash, &out_name, [], false)?,
                    );
                }
            }
        }
        DerivationKind::Floating => {
            return Err(DerivationError::UnsupportedKind(
                "floating content-addressed",
            ))
        }
        DerivationKind::Impure => return Err(DerivationError::UnsupportedKind("impure")),
    }
    Ok(expected)
}

impl Derivation {
    /// Computes the output paths as `derivationStrict` does and fills them
    /// in, with the env variables named after outputs. Outputs and variables
    /// that already hold a value must hold the right one, otherwise this
    /// fails saying what was expected; empty ones (or [`DerivationOutput::Deferred`])
    /// are filled. Input-addressed paths hash the derivation with outputs
    /// masked; a fixed output's path follows from its hash. The name is
    /// the `name` variable ([`Derivation::env_name`]), as `derivationStrict`
    /// takes it; see [`Derivation::fill_output_paths_named`].
    pub fn fill_output_paths<F, E>(
        &mut self,
        hasher: &mut DrvHasher<F>,
    ) -> Result<(), DerivationError>
    where
        F: FnMut(&StorePath) -> Result<Derivation, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let name = self.env_name()?.to_owned();
        self.fill_output_paths_named(&name, hasher)
    }

    /// [`Derivation::fill_output_paths`] for a derivation named `name`.
    pub fn fill_output_paths_named<F, E>(
        &mut self,
        name: &str,
        hasher: &mut DrvHasher<F>,
    ) -> Result<(), DerivationError>
    where
        F: FnMut(&StorePath) -> Result<Derivation, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let dir = hasher.store_dir().clone();
        let mut done = self.clone();
        let all_ia = self.outputs.values().all(|o| {
            matches!(
                o,
                DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred
            )
        });
        // Given and empty input-addressed paths may be mixed here; `kind()` would refuse that.
        let kind = if all_ia && !self.outputs.is_empty() {
            DerivationKind::InputAddressed { deferred: false }
        } else {
            self.kind()?
        };
        if matches!(kind, DerivationKind::InputAddressed { .. }) {
            // Hashed with every output (and its variable) empty, as
            // `derivationStrict` does before it knows them.
            for o in done.outputs.values_mut() {
                *o = DerivationOutput::Deferred;
            }
            for o in done.outputs.keys() {
                done.env.insert(o.as_str().as_bytes().to_vec(), Vec::new());
            }
        }
        let expected = expected_output_paths(&done, kind, name, hasher)?;
        for (o, path) in expected {
            let full = dir.display(&path);
            if let Some(given) = self.outputs.get(&o).and_then(DerivationOutput::path) {
                if *given != path {
                    return Err(DerivationError::WrongOutputPath {
                        output: o.to_string(),
                        expected: full,
                        given: dir.display(given),
                    });
                }
            }
            if let Some(slot) = done.outputs.get_mut(&o) {
                if !matches!(slot, DerivationOutput::CAFixed { .. }) {
                    *slot = DerivationOutput::InputAddressed { path: path.clone() };
                }
            }
            let key = o.as_str().as_bytes().to_vec();
            if let Some(given) = self.env.get(&key) {
                if !given.is_empty() && *given != full.as_bytes() {
                    return Err(DerivationError::WrongOutputEnv {
                        output: o.to_string(),
                        expected: full,
                        given: String::from_utf8_lossy(given).into_owned(),
                    });
                }
            }
            done.env.insert(key, full.into_bytes());
        }
        *self = done;
        Ok(())
    }
}

/// `hashDerivationModulo` of one derivation with a one-off hasher, named
/// after its `name` variable where that matters (a fixed-output one); with a
/// name from elsewhere use [`DrvHasher::hash_modulo_named`].
pub fn hash_derivation_modulo<F, E>(
    drv: &Derivation,
    dir: &StoreDir,
    mask_outputs: bool,
    lookup: F,
) -> Result<DrvHash, DerivationError>
where
    F: FnMut(&StorePath) -> Result<Derivation, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    DrvHasher::new(dir.clone(), lookup).hash_modulo(drv, mask_outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::testdata::{nix, HELLO};
    use crate::store::FileIngestionMethod;

    type NoLookup = fn(&StorePath) -> Result<Derivation, std::io::Error>;

    fn no_lookup(p: &StorePath) -> Result<Derivation, std::io::Error> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("unexpected lookup of {p}"),
        ))
    }

    #[test]
    fn masked_hash_of_the_reference_vector() {
        let drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let h = hash_derivation_modulo(&drv, &nix(), true, no_lookup as NoLookup).unwrap();
        assert_eq!(
            h.hashes[&OutputName::out()].to_base16(),
            "c578cf056b0e373ac4bdd035509cb62c9e7883c9002fec72bacea8636475111c"
        );
        assert_eq!(
            drv.drv_path(&nix()).unwrap().base_name(),
            "4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv"
        );
    }

    #[test]
    fn fills_output_paths_of_the_reference_vector() {
        let want = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let mut drv = want.clone();
        drv.outputs
            .insert(OutputName::out(), DerivationOutput::Deferred);
        drv.env.insert(b"out".to_vec(), Vec::new());
        drv.fill_output_paths(&mut DrvHasher::new(nix(), no_lookup as NoLookup))
            .unwrap();
        assert_eq!(drv, want);
        // Already right: unchanged.
        drv.fill_output_paths(&mut DrvHasher::new(nix(), no_lookup as NoLookup))
            .unwrap();
        assert_eq!(drv, want);
    }

    #[test]
    fn refuses_a_wrong_output_env_var() {
        let mut drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        drv.env.insert(b"out".to_vec(), b"/nix/store/x".to_vec());
        let err = drv
            .fill_output_paths(&mut DrvHasher::new(nix(), no_lookup as NoLookup))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable 'out': expected the output path /nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello, given '/nix/store/x'"
        );
    }

    #[test]
    fn refuses_a_wrong_input_addressed_path() {
        let mut drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let wrong = StorePath::from_base_name("2qgfy89v28340cr9d9z471zfi5iczv5m-hello").unwrap();
        drv.outputs.insert(
            OutputName::out(),
            DerivationOutput::InputAddressed { path: wrong },
        );
        drv.env.insert(b"out".to_vec(), Vec::new());
        let err = drv
            .fill_output_paths(&mut DrvHasher::new(nix(), no_lookup as NoLookup))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "output 'out': expected path /nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello, given /nix/store/2qgfy89v28340cr9d9z471zfi5iczv5m-hello"
        );
    }

    /// tvix's `bar` fixture (formats.md §6): a recursive sha256 FOD.
    fn bar() -> Derivation {
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("builder", ":"),
            ("name", "bar"),
            ("out", ""),
            (
                "outputHash",
                "08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba",
            ),
            ("outputHashAlgo", "sha256"),
            ("outputHashMode", "recursive"),
            ("system", ":"),
        ] {
            env.insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        let hash = Hash::parse_bare(
            "08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba",
            HashAlgo::Sha256,
        )
        .unwrap();
        let path = nix()
            .make_fixed_output_path(FileIngestionMethod::Recursive, &hash, "bar", [], false)
            .unwrap();
        Derivation {
            outputs: [(
                OutputName::out(),
                DerivationOutput::CAFixed {
                    method: FileIngestionMethod::Recursive,
                    hash,
                    path,
                },
            )]
            .into(),
            system: b":".to_vec(),
            builder: b":".to_vec(),
            env,
            ..Default::default()
        }
    }

    #[test]
    fn tvix_bar_fixed_output_vector() {
        let mut bar = bar();
        bar.fill_output_paths(&mut DrvHasher::new(nix(), no_lookup as NoLookup))
            .unwrap();
        let h = hash_derivation_modulo(&bar, &nix(), false, no_lookup as NoLookup).unwrap();
        assert_eq!(
            h.hashes[&OutputName::out()].to_base16(),
            "724f3e3634fce4cbbbd3483287b8798588e80280660b9a63fd13a1bc90485b33"
        );
        let bar_path = bar.drv_path(&nix()).unwrap();
        assert_eq!(
            bar_path.base_name(),
            "0hm2f1psjpcwg8fijsmr4wwxrx59s092-bar.drv"
        );

        // foo depends on bar (tvix's output_path_construction).
        let bar_out = nix().display(bar.outputs[&OutputName::out()].path().unwrap());
        let mut foo = Derivation {
            system: b":".to_vec(),
            builder: b":".to_vec(),
            ..Default::default()
        };
        for (k, v) in [
            ("bar", bar_out.as_str()),
            ("builder", ":"),
            ("name", "foo"),
            ("out", ""),
            ("system", ":"),
        ] {
            foo.env.insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        }
        foo.outputs
            .insert(OutputName::out(), DerivationOutput::Deferred);
        foo.input_derivations
            .insert(bar_path.clone(), [OutputName::out()].into());
        let mut lookups = 0;
        let mut hasher = DrvHasher::new(nix(), |p: &StorePath| {
            lookups += 1;
            assert_eq!(p, &bar_path);
            Ok::<_, std::io::Error>(bar.clone())
        });
        foo.fill_output_paths(&mut hasher).unwrap();
        hasher.hash_modulo(&foo, false).unwrap();
        drop(hasher);
        assert_eq!(lookups, 1, "input hashes are memoised");
        assert_eq!(
            foo.drv_path(&nix()).unwrap().base_name(),
            "4wvvbi4jwn0prsdxb7vs673qa5h9gr7x-foo.drv"
        );
    }

    #[test]
    fn reports_cycles_and_lookup_failures() {
        let mut drv = Derivation::from_aterm(HELLO, &nix()).unwrap();
        let me = drv.drv_path(&nix()).unwrap();
        drv.input_derivations
            .insert(me.clone(), [OutputName::out()].into());
        let looped = drv.clone();
        let err = hash_derivation_modulo(&drv, &nix(), false, |_: &StorePath| {
            Ok::<_, std::io::Error>(looped.clone())
        })
        .unwrap_err();
        assert!(matches!(err, DerivationError::Cycle(_)), "{err}");
        let err = hash_derivation_modulo(&drv, &nix(), false, no_lookup as NoLookup).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read input derivation /nix/store/"),
            "{err}"
        );
    }
}
