//! `sandoff setup`: prepare this machine for local builds (as root).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use sandoff::sandbox::setup::{
    ensure_build_users, ensure_state_dirs, BuildUsers, DEFAULT_GROUP, DEFAULT_USER_COUNT,
};
use sandoff::store::keyring::{default_key_name, Keyring};
use sandoff::store::StoreLocation;

/// Options of `sandoff setup`.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// How many build users to create (`sandoffbld1..N` in group `sandoffbld`).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_USER_COUNT, conflicts_with = "build_users_group",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    build_users: u32,
    /// Use this existing group's members as build users (e.g. Nix's `nixbld`) instead of creating any.
    #[arg(long, value_name = "NAME")]
    build_users_group: Option<String>,
}

pub fn run(args: SetupArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let which = match args.build_users_group {
        Some(group) => BuildUsers::Existing { group },
        None => BuildUsers::Create {
            group: DEFAULT_GROUP.to_owned(),
            count: args.build_users,
        },
    };
    let report = ensure_build_users(&which)?;
    ensure_state_dirs(&loc.state)?;
    // Builds read the group from here, so `--build-users-group nixbld` sticks.
    let group_file = loc.state.join("build-users-group");
    std::fs::write(&group_file, format!("{}\n", report.group))
        .with_context(|| format!("writing '{}'", group_file.display()))?;
    for name in &report.created {
        outln!("created {name}");
    }
    let (key, created) = Keyring::new(&loc.state).ensure_key_pair(&default_key_name())?;
    if created {
        outln!("created signing key {}", key.name());
    }
    outln!("public key: {key}");
    outln!(
        "build users: group {} (gid {}), {} members; state in {}",
        report.group,
        report.gid,
        report.members.len(),
        loc.state.display()
    );
    Ok(ExitCode::SUCCESS)
}
