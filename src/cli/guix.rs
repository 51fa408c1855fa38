//! sandoff as `guix`: guix-daemon runs its build hook as `$GUIX offload
//! SYSTEM MAX-SILENT-TIME PRINT-BUILD-TRACE BUILD-TIMEOUT`, with `GUIX`
//! from its environment, and runs other `guix` subcommands the same way
//! (`substitute`, `authenticate`, `gc`, `perform-download`, `discover`).
//! A symlink named `guix` to this binary, with `GUIX` pointing at it,
//! makes sandoff the daemon's hook; everything else goes on to the real
//! `guix` named by `$SANDOFF_GUIX`, so substitutes and downloads keep
//! working.
//!
//! `guix offload` is `sandoff hook` with Guix's defaults: the store
//! directory `/gnu/store` (or `$NIX_STORE_DIR`, as Guix reads it) unless
//! `$SANDOFF_STORE_DIR` says otherwise, guix-daemon's database
//! (`--daemon-store guix`: `$GUIX_STATE_DIRECTORY/db`, default
//! `/var/guix/db`) unless `$SANDOFF_DAEMON_STORE` says otherwise, and the
//! machines in
//! `$GUIX_CONFIGURATION_DIRECTORY/machines.scm` (default
//! `/etc/guix/machines.scm`; a missing file is no machines, as for
//! `guix offload`) unless `$SANDOFF_MACHINES` or `$NIX_REMOTE_SYSTEMS`
//! names a file.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The environment variable naming the real `guix`.
pub const REAL_GUIX_VAR: &str = "SANDOFF_GUIX";

/// What an invocation is.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// sandoff's own command line (`argv` unchanged, or rewritten from
    /// `guix offload` into `sandoff hook`).
    Sandoff(Vec<OsString>),
    /// Run the real `guix` at this path with `argv[1..]`.
    RealGuix(PathBuf, Vec<OsString>),
    /// Invoked as `guix` for another subcommand, with no real `guix` to
    /// hand it to.
    NoRealGuix(Vec<OsString>),
}

/// Where `argv` goes, with `env` for the environment.
pub fn route(argv: Vec<OsString>, env: impl Fn(&str) -> Option<OsString>) -> Route {
    if !super::invoked_as(&argv, "guix") {
        return Route::Sandoff(argv);
    }
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    // `guix offload test` and `guix offload status` are Guix's own
    // commands over its machines file, never the daemon's hook call.
    let is_hook = argv.get(1).is_some_and(|a| a == "offload")
        && !argv
            .get(2)
            .is_some_and(|a| a == "test" || a == "status" || a.to_string_lossy().starts_with('-'));
    if !is_hook {
        let rest = argv.into_iter().skip(1).collect();
        return match env(REAL_GUIX_VAR) {
            Some(real) => Route::RealGuix(PathBuf::from(real), rest),
            None => Route::NoRealGuix(rest),
        };
    }
    let mut out: Vec<OsString> = vec![argv[0].clone()];
    if env("SANDOFF_STORE_DIR").is_none() {
        out.push("--store-dir".into());
        out.push(env("NIX_STORE_DIR").unwrap_or_else(|| "/gnu/store".into()));
    }
    // The daemon's store is the store: validity lives in guix-daemon's
    // database, never in a registry of ours the daemon does not know.
    if env("SANDOFF_DAEMON_STORE").is_none() {
        out.push("--daemon-store".into());
        out.push("guix".into());
    }
    out.push("hook".into());
    let config = env("GUIX_CONFIGURATION_DIRECTORY").unwrap_or_else(|| "/etc/guix".into());
    out.push("--default-machines".into());
    out.push(Path::new(&config).join("machines.scm").into_os_string());
    // Ends the options: the daemon's arguments are only positional.
    out.push("--".into());
    out.extend(argv.into_iter().skip(2));
    Route::Sandoff(out)
}

/// The command line for clap, from the process's arguments: the real
/// `guix` is run in place of this process (it returns only when that
/// fails), or `Err` with the exit code when there is nothing to run.
pub fn dispatch() -> Result<Vec<OsString>, ExitCode> {
    match route(std::env::args_os().collect(), |k| std::env::var_os(k)) {
        Route::Sandoff(argv) => Ok(argv),
        Route::RealGuix(real, rest) => {
            // `exec` resets the signal mask and SIGPIPE (ignored by Rust)
            // as for any child.
            let err = Command::new(&real).arg0(&real).args(&rest).exec();
            eprintln!(
                "sandoff (as guix): cannot run the real guix '{}' named by {REAL_GUIX_VAR}: {err}",
                real.display()
            );
            Err(ExitCode::from(1))
        }
        Route::NoRealGuix(rest) => {
            let what = rest.first().map_or(OsStr::new(""), |a| a.as_os_str());
            eprintln!(
                "sandoff (as guix): only 'guix offload' is sandoff's; set {REAL_GUIX_VAR} to the real guix to run 'guix {}'",
                what.to_string_lossy()
            );
            Err(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn sandoff_by_any_other_name_is_untouched() {
        let a = args(&["/usr/bin/sandoff", "hook", "x86_64-linux", "0", "0", "0"]);
        assert_eq!(route(a.clone(), env(&[])), Route::Sandoff(a));
        let a = args(&["/usr/bin/guixx", "offload"]);
        assert_eq!(route(a.clone(), env(&[])), Route::Sandoff(a));
    }

    #[test]
    fn guix_offload_is_the_hook_with_guix_defaults() {
        let a = args(&["/t/guix", "offload", "x86_64-linux", "3600", "1", "0"]);
        assert_eq!(
            route(a.clone(), env(&[])),
            Route::Sandoff(args(&[
                "/t/guix",
                "--store-dir",
                "/gnu/store",
                "--daemon-store",
                "guix",
                "hook",
                "--default-machines",
                "/etc/guix/machines.scm",
                "--",
                "x86_64-linux",
                "3600",
                "1",
                "0"
            ]))
        );
        let vars = [
            ("GUIX_CONFIGURATION_DIRECTORY", "/t/etc"),
            ("SANDOFF_STORE_DIR", "/x/store"),
            ("SANDOFF_DAEMON_STORE", "nix"),
        ];
        let Route::Sandoff(out) = route(a.clone(), env(&vars)) else {
            panic!("the hook");
        };
        assert_eq!(
            &out[..5],
            &args(&[
                "/t/guix",
                "hook",
                "--default-machines",
                "/t/etc/machines.scm",
                "--"
            ])[..]
        );
        let Route::Sandoff(out) = route(a, env(&[("NIX_STORE_DIR", "/y/store")])) else {
            panic!("the hook");
        };
        assert_eq!(&out[1..3], &args(&["--store-dir", "/y/store"])[..]);
    }

    #[test]
    fn other_guix_commands_go_to_the_real_guix() {
        let real = [(REAL_GUIX_VAR, "/real/bin/guix")];
        for a in [
            args(&["guix", "substitute", "--query"]),
            args(&["guix", "gc", "--list-busy"]),
            args(&["guix", "offload", "test"]),
            args(&["guix", "offload", "--help"]),
            args(&["guix"]),
        ] {
            let rest: Vec<OsString> = a[1..].to_vec();
            assert_eq!(
                route(a.clone(), env(&real)),
                Route::RealGuix(PathBuf::from("/real/bin/guix"), rest.clone())
            );
            assert_eq!(route(a, env(&[])), Route::NoRealGuix(rest));
        }
    }
}
