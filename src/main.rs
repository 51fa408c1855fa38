//! The `sandoff` command line: parses arguments into checked options, runs
//! one command, and maps the outcome to an exit code (0 success, 1 failure,
//! 2 usage; a closed stdout is not a failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sandoff::store::{StoreDir, StoreLocation};

mod cli;

/// Build Nix- and Guix-style derivations in a local sandbox or over SSH.
#[derive(Parser, Debug)]
#[command(name = "sandoff", version, about, propagate_version = true)]
struct Cli {
    /// Physical root under which the store's files live (as in Nix's chroot stores).
    #[arg(long, global = true, env = "SANDOFF_STORE_ROOT", value_name = "DIR")]
    store_root: Option<PathBuf>,
    /// Logical store directory that store paths are named in.
    #[arg(long, global = true, env = "SANDOFF_STORE_DIR", value_name = "DIR", value_parser = parse_store_dir)]
    store_dir: Option<StoreDir>,
    /// State directory (database, logs, keys, locks); default <root>/nix/var/sandoff.
    #[arg(long, global = true, env = "SANDOFF_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Work on a daemon's store: `guix` (/gnu/store, database in
    /// $GUIX_STATE_DIRECTORY/db, default /var/guix/db) or `nix` (/nix/store,
    /// database in $NIX_STATE_DIR/db, default <root>/nix/var/nix/db). Validity
    /// then lives in the daemon's database; sandoff's own state stays in the
    /// state directory.
    #[arg(
        long,
        global = true,
        env = "SANDOFF_DAEMON_STORE",
        value_name = "DAEMON"
    )]
    daemon_store: Option<cli::DaemonStore>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write and read NAR archives.
    #[command(subcommand)]
    Nar(cli::nar::NarCommand),
    /// Compute hashes as nix-hash does.
    #[command(subcommand)]
    Hash(cli::nar::HashCommand),
    /// Add, inspect, sign, verify, export and import store paths.
    #[command(subcommand)]
    Store(cli::store::StoreCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Key(cli::key::KeyCommand),
    /// Show and add derivations.
    #[command(subcommand)]
    Derivation(cli::derivation::DerivationCommand),
    /// Build derivations (every missing output, in dependency order) and print their output paths.
    Build(cli::build::BuildArgs),
    /// Open a shell (or run a command) in the sandbox of a failed build
    /// kept with --keep-failed, set up as the build's was.
    Enter(cli::enter::EnterArgs),
    /// Print the build log of a derivation.
    Log {
        /// The derivation (a full .drv store path).
        drv: String,
    },
    /// Prepare this machine for local builds: build users, state directories (as root).
    Setup(cli::setup::SetupArgs),
    /// Show where a derivation would be built, and why.
    Decide(cli::decide::DecideArgs),
    /// Inspect, test and show the status of build machines.
    #[command(subcommand)]
    Machines(cli::machines::MachinesCommand),
    /// Send the closure of store paths to a build machine.
    Copy(cli::copy::CopyArgs),
    /// Serve this store to a Nix client, as `nix-store --serve`.
    Serve(cli::serve::ServeArgs),
    /// Be the build hook of guix-daemon (as `guix offload`) or Nix 1.x: answer
    /// its requests on stdin, build accepted ones on the machines.
    Hook(cli::hook::HookArgs),
    /// Be nix-daemon 2.x's build hook (what a symlink named
    /// `sandoff-build-hook` runs): settings and requests on stdin, replies
    /// on stderr, the daemon's store from its `store` setting.
    NixBuildHook(cli::nix_hook::NixHookArgs),
    /// Run a build coordinator (a persistent queue, agents that dial in, a
    /// binary cache of the results), or talk to one.
    Coordinator(Box<cli::coordinator::CoordinatorArgs>),
    /// Build what a coordinator hands out, in this machine's sandbox.
    Agent(cli::coordinator::AgentArgs),
    /// The helper that `builtin:fetchurl` builds run as the build user.
    #[command(name = "__builtin-fetchurl", hide = true)]
    BuiltinFetchurl(cli::builtin::BuiltinFetchurlArgs),
}

impl Cli {
    fn location(&self) -> StoreLocation {
        self.flags().location(None, None)
    }

    fn flags(&self) -> LocationFlags {
        LocationFlags {
            store_root: self.store_root.clone(),
            store_dir: self.store_dir.clone(),
            state_dir: self.state_dir.clone(),
            daemon_store: self.daemon_store,
        }
    }
}

/// The global options that say where the store is.
struct LocationFlags {
    store_root: Option<PathBuf>,
    store_dir: Option<StoreDir>,
    state_dir: Option<PathBuf>,
    daemon_store: Option<cli::DaemonStore>,
}

impl LocationFlags {
    /// The store, with `root` and `daemon` where the options leave them
    /// open (a hook learns its daemon's store only from the daemon).
    fn location(&self, root: Option<PathBuf>, daemon: Option<cli::DaemonStore>) -> StoreLocation {
        let root = self
            .store_root
            .clone()
            .or(root)
            .unwrap_or_else(|| PathBuf::from("/"));
        let daemon_store = self.daemon_store.or(daemon);
        let dir = self
            .store_dir
            .clone()
            .or_else(|| daemon_store.and_then(|d| d.store_dir()))
            .unwrap_or_default();
        let mut loc = StoreLocation::new(dir, root);
        if let Some(state) = &self.state_dir {
            loc.state = state.clone();
        }
        if let Some(daemon) = daemon_store {
            loc.daemon_db = daemon.db_dir(&loc.root);
            loc.daemon_log_dir = daemon.log_dir(&loc.root);
        }
        loc
    }
}

/// Checked at parse time so that a bad store directory is a usage error (exit 2).
fn parse_store_dir(s: &str) -> Result<StoreDir, String> {
    StoreDir::new(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE; a closed stdout then shows up as EPIPE, handled below.
    // Invoked as `guix` (guix-daemon's `GUIX`): `guix offload` becomes
    // `sandoff hook`, other subcommands go to the real guix.
    let argv = match cli::guix::dispatch() {
        Ok(argv) => argv,
        Err(code) => return code,
    };
    // Invoked as `sandoff-build-hook` (nix-daemon 2.x's `build-hook`).
    let argv = cli::nix_hook::route(argv);
    let cli = Cli::parse_from(argv);
    match &cli.command {
        // The daemon shows its client what its hook writes as `@nix` lines.
        Command::NixBuildHook(args) => cli::nix_hook::init_tracing(args),
        _ => tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            // Errors carry text from builds and build machines (log
            // tails, a machine's message): never raw to the terminal.
            let text = sandoff::termsafe::filter(error_chain(&err).as_bytes());
            eprintln!("sandoff: {text}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let loc = cli.location();
    let flags = cli.flags();
    match cli.command {
        Command::Nar(c) => cli::nar::run_nar(c, &loc),
        Command::Hash(c) => cli::nar::run_hash(c),
        Command::Store(c) => cli::store::run(c, &loc),
        Command::Key(c) => cli::key::run(c, &loc),
        Command::Derivation(c) => cli::derivation::run(c, &loc),
        Command::Setup(c) => cli::setup::run(c, &loc),
        Command::Build(c) => cli::build::run(c, &loc),
        Command::Log { drv } => cli::build::log(&drv, &loc),
        Command::Enter(c) => cli::enter::run(c),
        Command::Decide(c) => cli::decide::run(c, &loc),
        Command::Machines(c) => cli::machines::run(c, &loc),
        Command::Copy(c) => cli::copy::run(c, &loc),
        Command::Serve(c) => cli::serve::run(c, &loc),
        Command::Hook(c) => cli::hook::run(c, &loc),
        Command::NixBuildHook(c) => cli::nix_hook::run(c, &|root| {
            flags.location(Some(root), Some(cli::DaemonStore::Nix))
        }),
        Command::Coordinator(c) => cli::coordinator::run(*c, &loc),
        Command::Agent(c) => cli::coordinator::run_agent(c, &loc),
        Command::BuiltinFetchurl(c) => cli::builtin::run(c),
    }
}

/// One line: the error and its causes, joined by ": ".
fn error_chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if !parts.last().is_some_and(|last| last.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
