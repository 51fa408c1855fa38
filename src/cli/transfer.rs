//! `sandoff store sign|verify|export|import`: signatures and archives.
//!
//! `verify` exits 0 when every path is intact (and, with `--sigs-needed N`,
//! signed by N trusted keys), else 1, naming each failing path and why on
//! stderr. Nix's `nix store verify` instead returns bit flags (1 corrupted,
//! 2 untrusted), but sandoff keeps one exit-code policy for every command:
//! 1 is failure and 2 is a usage error.

use std::collections::BTreeSet;
use std::io::{self, BufWriter, Write as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use sandoff::store::export::{import_paths, write_export, SignaturePolicy};
use sandoff::store::keyring::Keyring;
use sandoff::store::local::LocalStore;
use sandoff::store::nar;
use sandoff::store::signature::{SecretKey, TrustedKeys};
use sandoff::store::{StoreLocation, StorePath, ValidPathInfo};

/// Command-line store paths; a path inside one (`…/bin/sh`) names it too.
fn parse_paths<C: FromIterator<StorePath>>(
    loc: &StoreLocation,
    args: &[String],
) -> anyhow::Result<C> {
    args.iter()
        .map(|arg| {
            let (path, _) = loc
                .dir
                .split_path(arg)
                .with_context(|| format!("'{arg}' is not a store path"))?;
            Ok(path)
        })
        .collect()
}

fn valid_info(
    store: &LocalStore,
    loc: &StoreLocation,
    path: &StorePath,
) -> anyhow::Result<ValidPathInfo> {
    store
        .query_path_info(path)?
        .ok_or_else(|| anyhow!("path '{}' is not valid", loc.logical(path)))
}

/// The trusted keys: the named file (which must exist), or
/// `<state>/trusted-keys`, whose absence means no key is trusted.
fn trusted_keys(loc: &StoreLocation, file: Option<&Path>) -> anyhow::Result<TrustedKeys> {
    Ok(match file {
        Some(f) => TrustedKeys::read_file(f)?,
        None => Keyring::new(&loc.state).trusted_keys()?,
    })
}

pub fn sign(loc: &StoreLocation, key_file: &Path, paths: &[String]) -> anyhow::Result<ExitCode> {
    let key = SecretKey::read_file(key_file)?;
    let paths = parse_paths::<Vec<_>>(loc, paths)?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let mut added = 0;
    for path in &paths {
        let info = valid_info(&store, loc, path)?;
        let sig = key.sign_path(&info, &loc.dir)?;
        if !info.signatures.contains(&sig) {
            store.add_signatures(path, &BTreeSet::from([sig]))?;
            added += 1;
        }
    }
    eprintln!("added {added} signatures");
    Ok(ExitCode::SUCCESS)
}

pub fn verify(
    loc: &StoreLocation,
    sigs_needed: usize,
    trusted: Option<&Path>,
    paths: &[String],
) -> anyhow::Result<ExitCode> {
    let keys = trusted_keys(loc, trusted)?;
    let paths = parse_paths::<Vec<_>>(loc, paths)?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let mut failed = 0;
    for path in &paths {
        let problems = match check_path(&store, loc, path, sigs_needed, &keys) {
            Ok(problems) => problems,
            Err(e) => vec![format!("{e:#}")],
        };
        if !problems.is_empty() {
            eprintln!(
                "sandoff: path '{}': {}",
                loc.logical(path),
                problems.join("; ")
            );
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} paths failed verification", paths.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// What is wrong with one path (nothing: empty).
fn check_path(
    store: &LocalStore,
    loc: &StoreLocation,
    path: &StorePath,
    sigs_needed: usize,
    keys: &TrustedKeys,
) -> anyhow::Result<Vec<String>> {
    let Some(info) = store.query_path_info(path)? else {
        return Ok(vec!["not valid".to_owned()]);
    };
    let mut problems = Vec::new();
    let (hash, size) = nar::hash_path(&loc.real_path(path))?;
    if hash != info.nar_hash || size != info.nar_size {
        problems.push(format!(
            "corrupted: its NAR is {} ({size} bytes), the registry says {} ({} bytes)",
            hash.to_nix32_prefixed(),
            info.nar_hash.to_nix32_prefixed(),
            info.nar_size
        ));
    }
    if let Err(e) = store.check_claims(&info, &hash) {
        problems.push(format!("not what its name claims: {e}"));
    }
    if sigs_needed > 0 {
        let valid = keys.count_valid(&info, &loc.dir);
        if valid < sigs_needed {
            problems.push(format!(
                "untrusted: signed by {valid} trusted keys, {sigs_needed} needed"
            ));
        }
    }
    Ok(problems)
}

pub fn export(loc: &StoreLocation, paths: &[String]) -> anyhow::Result<ExitCode> {
    let paths = parse_paths::<BTreeSet<_>>(loc, paths)?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    // Every path is checked before the first byte goes out.
    let entries = store
        .topo_sort(&paths)?
        .iter()
        .map(|p| Ok((valid_info(&store, loc, p)?, loc.real_path(p))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = BufWriter::new(io::stdout().lock());
    write_export(
        &mut out,
        &loc.dir,
        entries
            .iter()
            .map(|(info, physical)| (info, physical.as_path())),
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn import(
    loc: &StoreLocation,
    trusted: Option<&Path>,
    no_check_sigs: bool,
) -> anyhow::Result<ExitCode> {
    let keys = if no_check_sigs {
        TrustedKeys::new()
    } else {
        trusted_keys(loc, trusted)?
    };
    let policy = if no_check_sigs {
        SignaturePolicy::AcceptUnchecked
    } else {
        SignaturePolicy::RequireTrusted(&keys)
    };
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let mut out = io::stdout().lock();
    // Every path's lock file goes at the end rather than after its batch:
    // see `sandoff::store::local::LockKeeper`.
    let _keeper = store.keep_batch_locks();
    let mut printed = Ok(());
    // Paths are printed as they become valid, so that after a failure the
    // output still says which ones were imported.
    let imported = import_paths(&store, &mut io::stdin().lock(), policy, &mut |p| {
        if printed.is_ok() {
            printed = writeln!(out, "{}", loc.logical(p)).and_then(|()| out.flush());
        }
    });
    imported?;
    printed?;
    Ok(ExitCode::SUCCESS)
}
