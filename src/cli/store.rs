//! `sandoff store ...`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use sandoff::store::{FileIngestionMethod, HashAlgo, StoreLocation, StorePath, ValidPathInfo};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Add PATH to the store as a `source` path and print its store path (as `nix-store --add`).
    Add { path: PathBuf },
    /// Add PATH as a fixed-output path and print its store path (as `nix-store --add-fixed`).
    AddFixed {
        /// Hash the NAR serialisation instead of the file's contents.
        #[arg(long)]
        recursive: bool,
        /// md5, sha1, sha256 or sha512.
        algo: String,
        path: PathBuf,
    },
    /// Print what the store knows about store paths (as `nix path-info --sigs`).
    Info {
        /// The same JSON as `nix path-info --json --sigs` (plus a final newline).
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Sign store paths with a secret key in Nix's format.
    Sign {
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Check that store paths' contents match their NAR hash and carry enough trusted signatures.
    Verify {
        /// How many trusted signatures each path needs (0: only check contents).
        #[arg(long, default_value_t = 0)]
        sigs_needed: usize,
        /// File of trusted public keys, one per line (default: <state>/trusted-keys).
        #[arg(long, value_name = "FILE")]
        trusted_keys: Option<PathBuf>,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write store paths in the `nix-store --export` format to stdout, dependencies first.
    Export {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Import an export archive from stdin, checking hashes and signatures; print the paths.
    Import {
        /// File of trusted public keys (default: <state>/trusted-keys).
        #[arg(long, value_name = "FILE")]
        trusted_keys: Option<PathBuf>,
        /// Accept paths without a trusted signature.
        #[arg(long)]
        no_check_sigs: bool,
    },
}

pub fn run(cmd: StoreCommand, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Sign { key_file, paths } => super::transfer::sign(loc, &key_file, &paths),
        StoreCommand::Verify {
            sigs_needed,
            trusted_keys,
            paths,
        } => super::transfer::verify(loc, sigs_needed, trusted_keys.as_deref(), &paths),
        StoreCommand::Export { paths } => super::transfer::export(loc, &paths),
        StoreCommand::Import {
            trusted_keys,
            no_check_sigs,
        } => super::transfer::import(loc, trusted_keys.as_deref(), no_check_sigs),
        StoreCommand::Add { path } => {
            add(loc, &path, FileIngestionMethod::Recursive, HashAlgo::Sha256)
        }
        StoreCommand::AddFixed {
            recursive,
            algo,
            path,
        } => {
            let algo: HashAlgo = algo.parse()?;
            let method = if recursive {
                FileIngestionMethod::Recursive
            } else {
                FileIngestionMethod::Flat
            };
            add(loc, &path, method, algo)
        }
        StoreCommand::Info { json, paths } => info(loc, json, &paths),
    }
}

/// Prints the full store path, one line, as `nix-store --add` does.
fn add(
    loc: &StoreLocation,
    path: &Path,
    method: FileIngestionMethod,
    algo: HashAlgo,
) -> anyhow::Result<ExitCode> {
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let added = store
        .add_path(path, method, algo)
        .with_context(|| format!("adding '{}'", path.display()))?;
    writeln!(std::io::stdout().lock(), "{}", loc.logical(&added))?;
    Ok(ExitCode::SUCCESS)
}

/// `nix path-info --sigs` (text) or `nix path-info --json --sigs`, in
/// Nix's order; an invalid path is an error.
fn info(loc: &StoreLocation, json: bool, paths: &[String]) -> anyhow::Result<ExitCode> {
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let mut wanted = BTreeSet::new();
    for p in paths {
        wanted.insert(loc.dir.parse_path(p)?);
    }
    let mut infos: Vec<ValidPathInfo> = Vec::new();
    for p in &wanted {
        match store.query_path_info(p)? {
            Some(i) => infos.push(i),
            None => anyhow::bail!("path '{}' is not valid", loc.logical(p)),
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<serde_json::Value> = infos.iter().map(|i| info_json(loc, i)).collect();
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
    } else {
        let width = wanted
            .iter()
            .map(|p| loc.logical(p).len())
            .max()
            .unwrap_or(0);
        // Nix prints the text form dependencies first (and JSON sorted).
        let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
            infos.iter().map(|i| (&i.path, i)).collect();
        for p in store.topo_sort(&wanted)? {
            let Some(i) = by_path.get(&p) else { continue };
            writeln!(
                out,
                "{:<width$}\t{}",
                loc.logical(&i.path),
                info_text(i).join(" ")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The words after the tab of `nix path-info --sigs`.
fn info_text(i: &ValidPathInfo) -> Vec<String> {
    let mut words = Vec::new();
    if i.ultimate {
        words.push("ultimate".to_owned());
    }
    if let Some(ca) = &i.ca {
        words.push(format!("ca:{ca}"));
    }
    words.extend(sorted_sigs(i));
    words
}

/// Signatures in Nix's order: sorted as strings.
fn sorted_sigs(i: &ValidPathInfo) -> Vec<String> {
    let sigs: BTreeSet<String> = i.signatures.iter().map(|s| s.to_string()).collect();
    sigs.into_iter().collect()
}

/// One element of `nix path-info --json --sigs` (Nix 2.8): same keys, same
/// order, same omissions (no `ca`, `deriver`, `ultimate`, `signatures` when
/// absent, false or empty).
fn info_json(loc: &StoreLocation, i: &ValidPathInfo) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("path".into(), loc.logical(&i.path).into());
    m.insert("narHash".into(), i.nar_hash.to_sri().into());
    m.insert("narSize".into(), i.nar_size.into());
    let refs: Vec<String> = i
        .references
        .iter()
        .map(|r: &StorePath| loc.logical(r))
        .collect();
    m.insert("references".into(), refs.into());
    if let Some(ca) = &i.ca {
        m.insert("ca".into(), ca.to_string().into());
    }
    if let Some(d) = &i.deriver {
        m.insert("deriver".into(), loc.logical(d).into());
    }
    if i.registration_time != 0 {
        m.insert("registrationTime".into(), i.registration_time.into());
    }
    if i.ultimate {
        m.insert("ultimate".into(), true.into());
    }
    let sigs = sorted_sigs(i);
    if !sigs.is_empty() {
        m.insert("signatures".into(), sigs.into());
    }
    serde_json::Value::Object(m)
}
