//! `sandoff coordinator` (the process, and its client commands) and
//! `sandoff agent`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use sandoff::build::{BuildContext, Options};
use sandoff::coordinator::agent::{self, AgentConfig};
use sandoff::coordinator::api::{
    AgentList, BuildDetail, BuildList, Canceled, IssuedToken, NewAgent, NewToken, SetPriority,
    TokenList,
};
use sandoff::coordinator::client::Client;
use sandoff::coordinator::datastore::{self, RetryPolicy};
use sandoff::coordinator::model::{AgentId, BuildRecord, NewBuild, Principal, Role};
use sandoff::coordinator::server::{self, auth, ServerConfig};
use sandoff::coordinator::workers;
use sandoff::decide::Placement;
use sandoff::store::signature::{PublicKey, SecretKey, TrustedKeys};
use sandoff::store::StoreLocation;
use serde_json::json;

use super::build::{BuildUsersArgs, SandboxLimitsArgs};

/// `sandoff coordinator`: run the coordinator, or talk to one.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    #[command(subcommand)]
    command: Option<CoordinatorCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// Options of the coordinator process.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The datastore: sqlite:///PATH, or a PostgreSQL URI (postgresql://USER@HOST/DB,
    /// postgresql:///DB?host=/run/postgresql; no TLS).
    #[arg(
        long,
        env = "SANDOFF_COORDINATOR_DATASTORE",
        default_value = "sqlite:///var/lib/sandoff/coordinator.db"
    )]
    datastore: String,
    /// Where agents connect (the agent API and the cache).
    #[arg(long, default_value = "0.0.0.0:8745")]
    agent_listen: SocketAddr,
    /// Where clients connect (the client API and the cache).
    #[arg(long, default_value = "127.0.0.1:8746")]
    client_listen: SocketAddr,
    /// The binary cache of results (and of uploaded derivations and sources).
    #[arg(long, default_value = "/var/cache/sandoff-coordinator")]
    cache_dir: PathBuf,
    /// The key that signs the cache; created on first start
    /// (default: <cache-dir>/../coordinator-secret-key).
    #[arg(long)]
    secret_key_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, both listeners speak HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A lease lasts this long without a heartbeat.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(3..))]
    lease_seconds: i64,
    /// The largest upload accepted (compressed bytes of one NAR, or a log).
    #[arg(long, default_value_t = 64 << 30)]
    max_upload_bytes: u64,
    /// The first backoff after an infrastructure failure (tripled each time).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(0..))]
    retry_base_seconds: i64,
    /// Infrastructure failures before a build fails for good.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i64).range(1..))]
    max_attempts: i64,
    /// Also dispatch to the SSH machines of this file (Nix `machines` or
    /// Guix `machines.scm`), as agentless workers `ssh-<machine>`.
    #[arg(long, value_name = "FILE")]
    machines: Option<PathBuf>,
    /// Public keys (one per line, name:base64) whose signatures make the
    /// machines' outputs acceptable.
    #[arg(long, value_name = "FILE", requires = "machines")]
    machines_trusted_keys: Option<PathBuf>,
    /// Where the SSH workers keep inputs and outputs in transit
    /// (default: <cache-dir>/../ssh-workers).
    #[arg(long, value_name = "DIR", requires = "machines")]
    workers_dir: Option<PathBuf>,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
    /// Tell a program or a URL of every event of a kind: EVENT=PROGRAM
    /// [ARGS...] (run without a shell, arguments split on whitespace; the
    /// event JSON on stdin, SANDOFF_EVENT set; exit 0 = delivered) or
    /// EVENT=http(s)://URL (the JSON POSTed; 2xx = delivered). Events:
    /// build-submitted, build-started, build-success, build-failure,
    /// build-canceled, build-missing-inputs, agent-lost. Repeatable;
    /// failures are retried (1 s doubling, at most 10 min), across restarts.
    #[arg(long = "hook", value_name = "EVENT=TARGET", value_parser = parse_hook)]
    hooks: Vec<server::hooks::HookSpec>,
    /// Deliver up to N events of a kind at once to each of its hooks
    /// (default 1: in order).
    #[arg(long, value_name = "EVENT=N", value_parser = parse_hook_parallelism)]
    hook_parallelism: Vec<(sandoff::coordinator::model::EventKind, usize)>,
    /// A hook program running longer is killed; a webhook waiting longer
    /// gives up (the attempt failed, and is retried).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    hook_timeout: u64,
    /// Serve /metrics without a token (every other route still needs one).
    #[arg(long)]
    public_metrics: bool,
}

fn parse_hook(s: &str) -> Result<server::hooks::HookSpec, String> {
    server::hooks::HookSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_hook_parallelism(
    s: &str,
) -> Result<(sandoff::coordinator::model::EventKind, usize), String> {
    server::hooks::parse_parallelism(s).map_err(|e| e.to_string())
}

/// How a client reaches the coordinator.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The coordinator's client API.
    #[arg(
        long,
        env = "SANDOFF_COORDINATOR_URL",
        default_value = "http://127.0.0.1:8746"
    )]
    url: String,
    /// A file holding the token.
    #[arg(long, env = "SANDOFF_COORDINATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for https:// besides the system's.
    #[arg(long, env = "SANDOFF_COORDINATOR_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl ConnectArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.token_file {
            Some(f) => read_token(f)?,
            None => std::env::var("SANDOFF_COORDINATOR_TOKEN").map_err(|_| {
                anyhow::anyhow!("a token is needed: --token-file FILE or SANDOFF_COORDINATOR_TOKEN")
            })?,
        };
        Ok(Client::new(&self.url, &token, self.ca_cert.as_deref())?)
    }
}

fn read_token(f: &Path) -> anyhow::Result<String> {
    let bytes = sandoff::bounded::read_file(f, 4096)
        .with_context(|| format!("reading the token in '{}'", f.display()))?;
    let text = String::from_utf8(bytes).context("the token file is not text")?;
    Ok(text.trim().to_owned())
}

#[derive(Subcommand, Debug)]
enum CoordinatorCommand {
    /// Upload what the coordinator lacks of the derivations' closure and
    /// submit builds of them (and of their missing dependencies).
    Submit(SubmitArgs),
    /// List, show, cancel and reprioritise builds.
    #[command(subcommand)]
    Builds(BuildsCommand),
    /// Create, list and disable agents, and make their tokens.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Client tokens (read, submit, admin).
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Args, Debug)]
struct SubmitArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Higher first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// KEY=VALUE labels.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Not before this time: seconds since the epoch, or
    /// YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long, value_name = "TIME")]
    defer_until: Option<String>,
    /// Build again what failed before.
    #[arg(long)]
    retry: bool,
    /// The derivations (.drv store paths, valid in this store).
    #[arg(required = true)]
    drvs: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum BuildsCommand {
    /// The newest builds.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Only these states (queued, allocated, succeeded, failed, canceled), comma-separated.
        #[arg(long)]
        state: Option<String>,
        /// Only builds with this KEY=VALUE tag.
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One build, and why it waits.
    Show {
        #[command(flatten)]
        connect: ConnectArgs,
        id: String,
    },
    /// Cancel a build and the builds that need it.
    Cancel {
        #[command(flatten)]
        connect: ConnectArgs,
        id: String,
    },
    /// Change a build's priority.
    SetPriority {
        #[command(flatten)]
        connect: ConnectArgs,
        id: String,
        #[arg(allow_negative_numbers = true)]
        priority: i64,
    },
    /// Print a build's log (while it runs, what the agent has sent so far).
    Log {
        #[command(flatten)]
        connect: ConnectArgs,
        id: String,
        /// Keep printing the log as it grows until the build ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AgentsCommand {
    /// Every agent.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Create an agent; prints its token (shown once).
    New {
        #[command(flatten)]
        connect: ConnectArgs,
        name: String,
        /// Seconds the token lives (for ever when absent).
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// Make another token for an agent (shown once).
    Token {
        #[command(flatten)]
        connect: ConnectArgs,
        name: String,
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// Give an agent no more work and refuse its tokens.
    Disable {
        #[command(flatten)]
        connect: ConnectArgs,
        name: String,
    },
    /// Undo `disable`.
    Enable {
        #[command(flatten)]
        connect: ConnectArgs,
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Make a client token (shown once). With --datastore, directly in the
    /// datastore (how the first admin token is made, on the coordinator's
    /// machine); otherwise through the API with an admin token.
    New {
        #[command(flatten)]
        connect: ConnectArgs,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        expires_in: Option<i64>,
        /// The coordinator's datastore (sqlite:///PATH or postgresql://…).
        #[arg(long)]
        datastore: Option<String>,
    },
    /// Every token (not the secrets).
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Revoke a token by its id.
    Revoke {
        #[command(flatten)]
        connect: ConnectArgs,
        id: String,
    },
}

/// Runs `sandoff coordinator …`.
pub fn run(args: CoordinatorArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    match args.command {
        None => run_coordinator(args.run, loc),
        Some(CoordinatorCommand::Submit(a)) => submit(a, loc),
        Some(CoordinatorCommand::Builds(c)) => builds(c),
        Some(CoordinatorCommand::Agents(c)) => agents(c),
        Some(CoordinatorCommand::Tokens(c)) => tokens(c),
    }
}

fn run_coordinator(args: RunArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let key_file = args.secret_key_file.clone().unwrap_or_else(|| {
        args.cache_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join("coordinator-secret-key")
    });
    let key = if key_file.exists() {
        SecretKey::read_file(&key_file)?
    } else {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && !h.contains([':', ' ']))
            .unwrap_or_else(|| "sandoff".into());
        let key = SecretKey::generate(&format!("{host}-coordinator-1"))?;
        if let Some(parent) = key_file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        key.write_file(&key_file)?;
        eprintln!(
            "created the cache's signing key in '{}'",
            key_file.display()
        );
        key
    };
    let public = key.to_public().to_string();
    let workers = prepare_workers(&args, loc, &key.to_public())?;
    let tls = args.tls_cert.clone().zip(args.tls_key.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config = ServerConfig {
        datastore: args.datastore,
        agent_listen: args.agent_listen,
        client_listen: args.client_listen,
        cache_dir: args.cache_dir,
        store_dir: loc.dir.clone(),
        key,
        tls,
        lease_secs: args.lease_seconds,
        max_upload_bytes: args.max_upload_bytes,
        retry: RetryPolicy {
            base_secs: args.retry_base_seconds,
            max_attempts: args.max_attempts,
            ..RetryPolicy::default()
        },
        internal: !workers.is_empty(),
        hooks: server::hooks::HookSettings {
            hooks: args.hooks,
            parallelism: args.hook_parallelism.into_iter().collect(),
            timeout: std::time::Duration::from_secs(args.hook_timeout),
        },
        public_metrics: args.public_metrics,
    };
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(server::run(config, |bound| {
        // One line each, on stdout, for scripts and tests (port 0).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "agent API: {scheme}://{}", bound.agent);
        let _ = writeln!(out, "client API: {scheme}://{}", bound.client);
        let _ = writeln!(out, "cache key: {public}");
        let _ = out.flush();
        if let Some(internal) = bound.internal {
            for mut w in workers {
                w.url = format!("http://{internal}");
                std::thread::spawn(move || {
                    let name = w.machine.name.to_string();
                    if let Err(e) = workers::run(w, stop) {
                        tracing::error!(machine = name, "{e}");
                    }
                });
            }
        }
    }))?;
    Ok(ExitCode::SUCCESS)
}

/// The SSH workers of `--machines`, each with a fresh token for its agent
/// (made in the datastore before the coordinator starts; an agent that
/// exists already is reused).
fn prepare_workers(
    args: &RunArgs,
    loc: &StoreLocation,
    cache_key: &PublicKey,
) -> anyhow::Result<Vec<workers::Worker>> {
    let Some(file) = &args.machines else {
        return Ok(Vec::new());
    };
    let machines = sandoff::decide::file::load(file, &sandoff::decide::host_system())
        .with_context(|| format!("cannot use machines file '{}'", file.display()))?;
    let trusted = match &args.machines_trusted_keys {
        Some(f) => TrustedKeys::read_file(f)?,
        None => TrustedKeys::new(),
    };
    let root = args
        .workers_dir
        .clone()
        .unwrap_or_else(|| workers::default_root(&args.cache_dir));
    let ds = datastore::open(&args.datastore, RetryPolicy::default())?;
    let now = server::now();
    let mut out = Vec::new();
    for machine in machines {
        let name = workers::agent_name(&machine);
        let agent = AgentId::new(&name)?;
        match ds.agent_new(&agent, now) {
            Ok(()) | Err(datastore::DatastoreError::AgentExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let token = auth::new_token();
        // A week: the next start makes a new one.
        ds.token_add(
            &auth::hash_token(&token),
            &Principal::Agent { agent },
            Some(now + 7 * 86_400),
            now,
        )?;
        out.push(workers::Worker {
            root: root.join(&name),
            store_dir: loc.dir.clone(),
            url: String::new(),
            token,
            cache_key: cache_key.clone(),
            trusted: trusted.clone(),
            ssh: args.ssh.options(),
            machine,
        });
    }
    Ok(out)
}

/// `TIME` as seconds since the epoch: a number, or `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || {
        anyhow::anyhow!("'{s}' is not a time (seconds since the epoch, or YYYY-MM-DDTHH:MM:SSZ)")
    };
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().map_err(|_| bad());
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn submit(args: SubmitArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let client = args.connect.client()?;
    let mut tags = BTreeMap::new();
    for t in &args.tags {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("tag '{t}' is not KEY=VALUE"))?;
        tags.insert(k.to_owned(), v.to_owned());
    }
    let defer_until = args.defer_until.as_deref().map(parse_time).transpose()?;
    let mut builds = Vec::new();
    for d in &args.drvs {
        let p = loc.dir.parse_path(d)?;
        anyhow::ensure!(
            p.is_derivation(),
            "'{d}' is not a derivation (a .drv store path)"
        );
        builds.push(NewBuild {
            drv: loc.logical(&p),
            priority: args.priority,
            tags: tags.clone(),
            defer_until,
            retry: args.retry,
        });
    }
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let spool = tempfile::tempdir().context("creating a spool directory")?;
    let (sent, answer) =
        sandoff::coordinator::submit::submit(&client, &store, builds, spool.path())?;
    if args.connect.json {
        outln!(
            "{}",
            json!({"uploaded": {"paths": sent.paths, "bytes": sent.bytes}, "builds": answer.builds})
        );
    } else {
        eprintln!("uploaded {} paths ({} bytes)", sent.paths, sent.bytes);
        for b in &answer.builds {
            let how = if b.created { "submitted" } else { "already" };
            outln!("{}\t{}\t{how} {}", b.id, b.drv, b.state.as_str());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_build_line(b: &BuildRecord) -> std::io::Result<()> {
    let agent = b.agent.as_ref().map_or("-", |a| a.as_str());
    outln!(
        "{}\t{}\t{}\tpriority {} (effective {})\t{}",
        b.id,
        b.state.as_str(),
        b.drv,
        b.priority,
        b.effective_priority,
        agent
    );
    Ok(())
}

fn builds(c: BuildsCommand) -> anyhow::Result<ExitCode> {
    match c {
        BuildsCommand::List {
            connect,
            state,
            tag,
            limit,
        } => {
            let client = connect.client()?;
            let mut q = format!("/client/v1/builds?limit={limit}");
            if let Some(s) = state {
                q.push_str(&format!("&state={}", urlencode(&s)));
            }
            if let Some(t) = tag {
                q.push_str(&format!("&tag={}", urlencode(&t)));
            }
            let list: BuildList = client.get(&q)?;
            if connect.json {
                outln!("{}", serde_json::to_string(&list)?);
            } else {
                list.builds.iter().try_for_each(print_build_line)?;
            }
        }
        BuildsCommand::Show { connect, id } => {
            let client = connect.client()?;
            let d: BuildDetail = client.get(&format!("/client/v1/builds/{}", urlencode(&id)))?;
            if connect.json {
                outln!("{}", serde_json::to_string(&d)?);
            } else {
                let b = &d.build;
                outln!("build {}: {}", b.id, b.state.as_str());
                outln!("derivation: {}", b.drv);
                outln!("system: {}", b.system);
                outln!(
                    "priority: {} (effective {}), critical path {}",
                    b.priority,
                    b.effective_priority,
                    b.critical_path
                );
                for (name, path) in &d.outputs {
                    outln!("output {name}: {path}");
                }
                if !d.dependencies.is_empty() {
                    let deps: Vec<String> = d.dependencies.iter().map(|i| i.to_string()).collect();
                    outln!("waiting for builds: {}", deps.join(", "));
                }
                if let Some(a) = &b.agent {
                    outln!("agent: {a}");
                }
                if b.attempts > 0 {
                    outln!("infrastructure failures: {}", b.attempts);
                }
                if let Some(m) = &b.message {
                    outln!("message: {m}");
                }
                if let Some(u) = &d.unbuildable {
                    outln!("cannot start: {u}");
                }
            }
        }
        BuildsCommand::Cancel { connect, id } => {
            let client = connect.client()?;
            let c: Canceled = client.post(
                &format!("/client/v1/builds/{}/cancel", urlencode(&id)),
                &json!({}),
            )?;
            if connect.json {
                outln!("{}", serde_json::to_string(&c)?);
            } else {
                let ids: Vec<String> = c.canceled.iter().map(|i| i.to_string()).collect();
                outln!("canceled: {}", ids.join(" "));
            }
        }
        BuildsCommand::SetPriority {
            connect,
            id,
            priority,
        } => {
            let client = connect.client()?;
            let b: BuildRecord = client.post(
                &format!("/client/v1/builds/{}/priority", urlencode(&id)),
                &SetPriority { priority },
            )?;
            if connect.json {
                outln!("{}", serde_json::to_string(&b)?);
            } else {
                print_build_line(&b)?;
            }
        }
        BuildsCommand::Log {
            connect,
            id,
            follow,
        } => {
            let client = connect.client()?;
            let id = urlencode(&id);
            let mut offset = 0;
            let mut out = std::io::stdout();
            loop {
                let chunk = client.build_log(&id, offset)?;
                out.write_all(&sandoff::termsafe::filter(&chunk.bytes).into_bytes())?;
                out.flush()?;
                let progressed = chunk.next > offset;
                offset = chunk.next;
                if chunk.complete || (!follow && !progressed) {
                    break;
                }
                if !progressed {
                    // The agent sends a running build's log about every second.
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_token(t: &IssuedToken, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        outln!("{}", serde_json::to_string(t)?);
    } else {
        eprintln!(
            "token {} (shown once; keep it in a file only its user reads):",
            t.id
        );
        outln!("{}", t.token);
    }
    Ok(())
}

fn agents(c: AgentsCommand) -> anyhow::Result<ExitCode> {
    match c {
        AgentsCommand::List { connect } => {
            let client = connect.client()?;
            let list: AgentList = client.get("/client/v1/agents")?;
            if connect.json {
                outln!("{}", serde_json::to_string(&list)?);
            } else {
                for a in &list.agents {
                    let systems: Vec<&str> = a.systems.iter().map(String::as_str).collect();
                    outln!(
                        "{}\t{}\t{}\t{} of {} slots busy",
                        a.id,
                        if a.enabled { "enabled" } else { "disabled" },
                        systems.join(","),
                        a.allocated.len(),
                        a.max_parallel_builds
                    );
                }
            }
        }
        AgentsCommand::New {
            connect,
            name,
            expires_in,
        } => {
            let client = connect.client()?;
            let t: IssuedToken = client.post(
                "/client/v1/agents",
                &NewAgent {
                    id: name,
                    expires_in,
                },
            )?;
            print_token(&t, connect.json)?;
        }
        AgentsCommand::Token {
            connect,
            name,
            expires_in,
        } => {
            let client = connect.client()?;
            let t: IssuedToken = client.post(
                &format!("/client/v1/agents/{}/token", urlencode(&name)),
                &json!({ "expires_in": expires_in }),
            )?;
            print_token(&t, connect.json)?;
        }
        AgentsCommand::Disable { connect, name } => {
            connect.client()?.post_only::<()>(
                &format!("/client/v1/agents/{}/disable", urlencode(&name)),
                None,
            )?;
        }
        AgentsCommand::Enable { connect, name } => {
            connect.client()?.post_only::<()>(
                &format!("/client/v1/agents/{}/enable", urlencode(&name)),
                None,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tokens(c: TokensCommand) -> anyhow::Result<ExitCode> {
    match c {
        TokensCommand::New {
            connect,
            role,
            expires_in,
            datastore: Some(url),
        } => {
            anyhow::ensure!(
                !matches!(expires_in, Some(s) if s <= 0),
                "--expires-in must be positive"
            );
            let ds = datastore::open(&url, RetryPolicy::default())?;
            let token = auth::new_token();
            let now = server::now();
            let id = ds.token_add(
                &auth::hash_token(&token),
                &Principal::Client { role },
                expires_in.map(|s| now.saturating_add(s)),
                now,
            )?;
            print_token(&IssuedToken { id, token }, connect.json)?;
        }
        TokensCommand::New {
            connect,
            role,
            expires_in,
            datastore: None,
        } => {
            let t: IssuedToken = connect
                .client()?
                .post("/client/v1/tokens", &NewToken { role, expires_in })?;
            print_token(&t, connect.json)?;
        }
        TokensCommand::List { connect } => {
            let list: TokenList = connect.client()?.get("/client/v1/tokens")?;
            if connect.json {
                outln!("{}", serde_json::to_string(&list)?);
            } else {
                for t in &list.tokens {
                    let who = match &t.principal {
                        Principal::Agent { agent } => format!("agent {agent}"),
                        Principal::Client { role } => format!("client {}", role.as_str()),
                    };
                    let state = if t.revoked { "revoked" } else { "valid" };
                    outln!(
                        "{}\t{who}\t{state}\texpires {}",
                        t.id,
                        t.expires_at.map_or("never".into(), |e| e.to_string())
                    );
                }
            }
        }
        TokensCommand::Revoke { connect, id } => {
            connect.client()?.post_only::<()>(
                &format!("/client/v1/tokens/{}/revoke", urlencode(&id)),
                None,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes what is not unreserved in a URL component.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Options of `sandoff agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The coordinator's agent API.
    #[arg(long, env = "SANDOFF_COORDINATOR_URL")]
    coordinator: String,
    /// The file holding this agent's token.
    #[arg(long)]
    token_file: PathBuf,
    /// A CA certificate (PEM) to trust for https:// besides the system's.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// The key the cache must be signed with (default: the one the
    /// coordinator announces over this authenticated connection).
    #[arg(long)]
    coordinator_key: Option<String>,
    /// Systems this agent builds (default: this machine's).
    #[arg(long = "system")]
    systems: Vec<String>,
    /// System features it has (kvm, big-parallel, …).
    #[arg(long = "feature")]
    features: Vec<String>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel_builds: u32,
    /// Seconds between requests for work when there was none.
    #[arg(long, default_value_t = 2.0)]
    poll_seconds: f64,
    /// NIX_BUILD_CORES of each build (default: the cores / max parallel builds).
    #[arg(long)]
    cores: Option<u32>,
    /// Kill a build after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Kill a build after this many seconds without log output (0: never).
    #[arg(long, default_value_t = 0)]
    max_silent_time: u64,
    /// The largest log kept and sent, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_log_size: u64,
    #[command(flatten)]
    users: BuildUsersArgs,
    #[command(flatten)]
    limits: SandboxLimitsArgs,
}

/// Runs `sandoff agent`.
pub fn run_agent(args: AgentArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let token = read_token(&args.token_file)?;
    let client = Client::new(&args.coordinator, &token, args.ca_cert.as_deref())?;
    let coordinator_key = args
        .coordinator_key
        .as_deref()
        .map(|k| PublicKey::parse(k, "--coordinator-key"))
        .transpose()?;
    let systems: BTreeSet<String> = if args.systems.is_empty() {
        BTreeSet::from([sandoff::decide::host_system()])
    } else {
        args.systems.iter().cloned().collect()
    };
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    let pool = args.users.pool();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let placement = Placement::local_only();
    let ctx = BuildContext {
        store: &store,
        pool: pool.as_ref().map_err(Arc::clone),
        options: Options {
            jobs: args.max_parallel_builds as usize,
            max_silent: secs(args.max_silent_time),
            timeout: secs(args.timeout),
            cores: args
                .cores
                .unwrap_or((cores / args.max_parallel_builds).max(1)),
            stream_logs: true,
            limits: args.limits.limits(),
            impure_env_allow: args.limits.impure_env_allow.clone(),
            max_log_size: Some(args.max_log_size),
            ..Options::default()
        },
        placement: &placement,
        offload: None,
    };
    let config = AgentConfig {
        client,
        systems,
        features: args.features.iter().cloned().collect(),
        mandatory_features: BTreeSet::new(),
        max_parallel_builds: args.max_parallel_builds as usize,
        poll: Duration::from_secs_f64(args.poll_seconds.clamp(0.05, 3600.0)),
        spool: loc.state.join("agent-spool"),
        zstd_level: 3,
        coordinator_key,
        max_log_bytes: args.max_log_size,
    };
    let stop = AtomicBool::new(false);
    agent::run(&config, &ctx, &stop)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_epoch_seconds_or_utc_dates() {
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_time("2026-12-03T12:00:00Z").unwrap(), 1_796_299_200);
        assert!(parse_time("2026-13-03T12:00:00Z").is_err());
        assert!(parse_time("tomorrow").is_err());
        assert_eq!(urlencode("a=b c"), "a%3Db%20c");
    }
}
