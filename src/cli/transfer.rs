//! `sandoff store sign|verify|export|import`: signatures and archives.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sandoff::store::StoreLocation;

pub fn sign(_loc: &StoreLocation, _key_file: &Path, _paths: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("store sign: not implemented yet")
}

pub fn verify(_loc: &StoreLocation, _sigs_needed: usize, _trusted: Option<&Path>, _paths: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("store verify: not implemented yet")
}

pub fn export(_loc: &StoreLocation, _paths: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("store export: not implemented yet")
}

pub fn import(_loc: &StoreLocation, _trusted: Option<&Path>, _no_check_sigs: bool) -> anyhow::Result<ExitCode> {
    let _: Option<PathBuf> = None;
    anyhow::bail!("store import: not implemented yet")
}
