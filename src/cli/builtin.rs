//! `sandoff __builtin-fetchurl`: the helper that `builtin:fetchurl` builds
//! exec as the build user (see `sandoff::build::fetchurl`). Hidden: it is
//! not for people, and expects its output directory as standard input.

use std::process::ExitCode;

use sandoff::build::fetchurl::{self, FetchRequest};

/// The request, as `FetchRequest::to_args` writes it.
#[derive(clap::Args, Debug)]
pub struct BuiltinFetchurlArgs {
    /// The output's name in the directory given as standard input.
    #[arg(long)]
    output: String,
    /// The URLs to try, in order.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Restore the download as a NAR.
    #[arg(long)]
    unpack: bool,
    /// Make the output executable.
    #[arg(long)]
    executable: bool,
}

pub fn run(args: BuiltinFetchurlArgs) -> anyhow::Result<ExitCode> {
    let request = FetchRequest {
        urls: args.urls,
        unpack: args.unpack,
        executable: args.executable,
    };
    // The output name is a store path's base name, never a path.
    anyhow::ensure!(
        !args.output.is_empty()
            && !args.output.contains('/')
            && args.output != ".."
            && args.output != ".",
        "--output must be a plain file name, not '{}'",
        args.output
    );
    fetchurl::fetch_in_stdin_dir(&request, &args.output, &mut std::io::stderr())?;
    Ok(ExitCode::SUCCESS)
}
