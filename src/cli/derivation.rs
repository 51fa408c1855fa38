//! `sandoff derivation ...`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use sandoff::derivation::check::read_drv_file;
use sandoff::derivation::{json, Derivation, DrvHasher};
use sandoff::store::{StoreLocation, StorePath};

#[derive(Subcommand, Debug)]
pub enum DerivationCommand {
    /// Print derivations as JSON, as `nix show-derivation` does.
    Show {
        #[arg(required = true)]
        drvs: Vec<String>,
    },
    /// Read one derivation as JSON (one entry of `nix show-derivation`) on stdin, write it to the store, print its path.
    ///
    /// The input may hold raw non-UTF-8 bytes in strings, as `show` prints
    /// them. The derivation is named after its JSON "name" member (Nix ≥
    /// 2.15), else the .drv path it is keyed by, else its `name` variable.
    Add,
}

pub fn run(cmd: DerivationCommand, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    match cmd {
        DerivationCommand::Show { drvs } => show(loc, &drvs),
        DerivationCommand::Add => add(loc),
    }
}

/// Reads the `.drv` file of `path` from the physical store, valid or not
/// (as `nix show-derivation` reads a file it is given).
fn read_drv(loc: &StoreLocation, path: &StorePath) -> anyhow::Result<Derivation> {
    Ok(read_drv_file(&loc.real_path(path), &loc.dir)?.1)
}

fn show(loc: &StoreLocation, args: &[String]) -> anyhow::Result<ExitCode> {
    let mut drvs = BTreeMap::new();
    for arg in args {
        let path = loc.dir.parse_path(arg)?;
        anyhow::ensure!(
            path.is_derivation(),
            "'{arg}' is not a derivation (a .drv store path)"
        );
        let drv = read_drv(loc, &path)?;
        drvs.insert(path, drv);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&json::show(&drvs, &loc.dir))?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn add(loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    // A .drv is at most MAX_DRV_SIZE bytes; its JSON escapes some of them.
    let limit = 4 * sandoff::derivation::check::MAX_DRV_SIZE;
    let input = sandoff::bounded::read_all(std::io::stdin().lock(), limit)
        .context("cannot read the derivation's JSON on stdin")?;
    let json::FromJson {
        key: given_path,
        name,
        derivation: mut drv,
    } = json::from_json(&input, &loc.dir)?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    for src in &drv.input_sources {
        anyhow::ensure!(
            store.is_valid(src)?,
            "input source {} is not valid in the store",
            loc.logical(src)
        );
    }
    for input in drv.input_derivations.keys() {
        anyhow::ensure!(
            store.is_valid(input)?,
            "input derivation {} is not valid in the store",
            loc.logical(input)
        );
    }
    let mut hasher = DrvHasher::new(loc.dir.clone(), |p: &StorePath| read_drv(loc, p));
    drv.fill_output_paths_named(&name, &mut hasher)?;
    let drv_path = drv.drv_path_named(&name, &loc.dir)?;
    if let Some(given) = given_path {
        let expected = loc.logical(&drv_path);
        anyhow::ensure!(
            given == expected,
            "derivation path: expected {expected}, given {given}"
        );
    }
    let added = store.add_text(
        &format!("{name}.drv"),
        &drv.to_aterm(&loc.dir),
        &drv.references(),
        &drv.output_paths(),
    )?;
    anyhow::ensure!(
        added == drv_path,
        "the store added the derivation as {}, expected {}",
        loc.logical(&added),
        loc.logical(&drv_path)
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", loc.logical(&added))?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
