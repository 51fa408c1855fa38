//! `sandoff store ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sandoff::store::StoreLocation;

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
        /// The same JSON as `nix path-info --json --sigs`.
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
        StoreCommand::Verify { sigs_needed, trusted_keys, paths } => {
            super::transfer::verify(loc, sigs_needed, trusted_keys.as_deref(), &paths)
        }
        StoreCommand::Export { paths } => super::transfer::export(loc, &paths),
        StoreCommand::Import { trusted_keys, no_check_sigs } => {
            super::transfer::import(loc, trusted_keys.as_deref(), no_check_sigs)
        }
        other => anyhow::bail!("{other:?}: not implemented yet"),
    }
}
