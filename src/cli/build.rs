//! `sandoff build` and `sandoff log`.
//!
//! Output conventions:
//! - stdout: the output paths, one per line, in the order of the arguments
//!   (each derivation's outputs sorted by output name, as
//!   `nix-store --realise`), printed only when everything was built.
//! - stderr, on a terminal: one status line (building what, done/left,
//!   elapsed) redrawn in place, and one line per finished build.
//! - stderr, otherwise: one line per finished build (`built ... in 1.2s`,
//!   `failed ...`).
//! - `--json`: instead, one JSON object per line on stderr (as Nix's
//!   `--log-format internal-json` keeps stdout for results), e.g.
//!   `{"event":"built","drv":"/nix/store/...drv","seconds":1.2}`; events
//!   `planned`, `started`, `waiting-for-lock`, `log`, `built`, `reused`,
//!   `failed`, `dependency-failed`, and last `done` (with `success` and
//!   the lists of what failed and why). A local build run in a cgroup
//!   reports what it used: `built ... in 1.2s (CPU 0.9s, peak memory
//!   12.0 MiB)`, `"cpuSeconds"` and `"peakMemoryBytes"` in its `built` or
//!   `failed` event (each only where measured: see
//!   `sandoff::sandbox::cgroup`).
//! - `--check`: a derivation built again and found bit-identical is
//!   reported `checked (bit-identical) ...` (`"checked":true` in its
//!   `built` event); a difference is a failure naming the outputs.
//! - `-L`: every log line on stderr, prefixed `<name>> ` (as `nix build -L`),
//!   or as `{"event":"log",...}` with `--json`.
//! - `-K`: a failure names its kept directory and `sandoff enter DIR`;
//!   `--shell-on-failure` (implies `-K`) runs that at once, on a terminal,
//!   for the first failed build, after the failures are reported.
//!
//! Each derivation to build is placed by `sandoff::decide`, with the same
//! options as `sandoff decide` (`--machines`, `--local-only` and its
//! guix-daemon synonym `--no-build-hook`, `--local-when-busy`, `--system`,
//! `--extra-platforms`, `--system-features`). Without a machines file every
//! build the local machine can do is local; until offloading exists, a
//! derivation that would go to a machine fails and says so.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sandoff::build::timings::StepTimes;
use sandoff::build::{self, BuildContext, Event, Options};
use sandoff::remote::offloader::Offloader;
use sandoff::sandbox::plan::{DEFAULT_MAX_PROCESSES, DEFAULT_SHM_SIZE, DEFAULT_TMP_SIZE};
use sandoff::sandbox::setup::DEFAULT_GROUP;
use sandoff::sandbox::users::DEFAULT_USER_POOL_DIR;
use sandoff::sandbox::{Limits, TmpfsSize, UserError, UserPool};
use sandoff::store::{StoreLocation, StorePath};
use sandoff::termsafe;
use serde_json::json;
use std::sync::Arc;

/// Which build users local builds run as (`sandoff build`, `sandoff serve`).
#[derive(Args, Debug, Clone)]
pub struct BuildUsersArgs {
    /// The group whose members are the build users.
    #[arg(long, env = "SANDOFF_BUILD_USERS_GROUP", value_name = "NAME", default_value = DEFAULT_GROUP)]
    pub build_users_group: String,
    /// Directory of the build users' lock files (default: /run/sandoff/userpool,
    /// one for the whole machine, since the build users are). Every sandoff
    /// process whose builds use these build users must share it.
    #[arg(long, env = "SANDOFF_USER_POOL_DIR", value_name = "DIR")]
    pub user_pool_dir: Option<PathBuf>,
}

impl BuildUsersArgs {
    /// The pool, or why there is none (kept until something must be built:
    /// realising valid outputs needs no build user).
    pub fn pool(&self) -> Result<UserPool, Arc<UserError>> {
        let dir = self
            .user_pool_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_USER_POOL_DIR));
        UserPool::from_group(&self.build_users_group, &dir).map_err(Arc::new)
    }
}

/// Resource bounds and environment of local builds (`sandoff build`,
/// `sandoff serve`); the defaults and why are in the README's Security
/// section and `sandoff::sandbox::plan`.
#[derive(Args, Debug, Clone)]
pub struct SandboxLimitsArgs {
    /// Size of each build's /tmp tmpfs: bytes, with k/m/g, or a percentage
    /// of memory (the build directory itself is on disk, not on it).
    #[arg(long, env = "SANDOFF_TMP_SIZE", value_name = "SIZE", value_parser = TmpfsSize::parse, default_value_t = DEFAULT_TMP_SIZE)]
    pub tmp_size: TmpfsSize,
    /// Size of each build's /dev/shm tmpfs (same syntax as --tmp-size).
    #[arg(long, env = "SANDOFF_SHM_SIZE", value_name = "SIZE", value_parser = TmpfsSize::parse, default_value_t = DEFAULT_SHM_SIZE)]
    pub shm_size: TmpfsSize,
    /// Most processes and threads a build may run at once (RLIMIT_NPROC of
    /// its build user).
    #[arg(long, env = "SANDOFF_MAX_PROCESSES", value_name = "N", default_value_t = DEFAULT_MAX_PROCESSES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_processes: u64,
    /// More variables a fixed-output build may receive through
    /// impureEnvVars, besides the fetchers' proxy and mirror variables
    /// (comma-separated names, or prefixes ending in '*'; SANDOFF_* never).
    #[arg(
        long,
        env = "SANDOFF_IMPURE_ENV_ALLOW",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub impure_env_allow: Vec<String>,
}

impl SandboxLimitsArgs {
    /// The limits.
    pub fn limits(&self) -> Limits {
        Limits {
            tmp_size: self.tmp_size,
            shm_size: self.shm_size,
            max_processes: self.max_processes,
        }
    }
}

/// Options of `sandoff build`.
#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    placement: super::decide::PlacementArgs,
    /// How many builds to run here at once (default: the number of cores);
    /// 0 builds nothing here: everything is offloaded or fails, as Nix's
    /// `--max-jobs 0`. Builds on machines do not count.
    #[arg(short = 'j', long = "max-jobs", value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024))]
    jobs: Option<u32>,
    /// Keep building what does not depend on a failed build.
    #[arg(short = 'k', long)]
    keep_going: bool,
    /// Keep the build directory of a failed build, and say where (and how
    /// to enter its sandbox: `sandoff enter DIR`).
    #[arg(short = 'K', long)]
    keep_failed: bool,
    /// When a build fails, open a shell in its sandbox at once (implies
    /// --keep-failed; on a terminal only, else the failure names the
    /// `sandoff enter` command). The exit status stays the build's.
    #[arg(long)]
    shell_on_failure: bool,
    /// Kill a build that prints nothing for this many seconds (0: never; so
    /// is a value past what the clock holds, such as 18446744073709551615).
    #[arg(long, value_name = "S", default_value_t = 0)]
    max_silent_time: u64,
    /// Kill a build that runs longer than this many seconds (0: never; so is
    /// a value past what the clock holds).
    #[arg(long, value_name = "S", default_value_t = 0)]
    timeout: u64,
    /// Kill a build whose log passes this many bytes (0: no limit), as
    /// Nix's `--max-build-log-size`; passed on to build machines.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    max_log_size: u64,
    /// Build the given derivations again, though their outputs are valid,
    /// and fail if the result is not bit-identical (their inputs are
    /// realised as usual); with -K a differing output is kept as
    /// `<output>.check`. Nothing registered changes.
    #[arg(long)]
    check: bool,
    /// Print the build logs on stderr.
    #[arg(short = 'L', long = "print-build-logs")]
    print_build_logs: bool,
    /// Report progress as one JSON object per line on stderr.
    #[arg(long)]
    json: bool,
    /// At the end, print where the builds' time went, step by step (lock,
    /// inputs, user, sandbox, stage, scan, register, ...); `--json` gives it
    /// per build as "timings" events.
    #[arg(long)]
    timings: bool,
    /// NIX_BUILD_CORES given to each build (0: all; default: the number of cores).
    #[arg(long, value_name = "N")]
    cores: Option<u32>,
    #[command(flatten)]
    users: BuildUsersArgs,
    #[command(flatten)]
    limits: SandboxLimitsArgs,
    #[command(flatten)]
    ssh: super::machines::SshArgs,
    /// Let build machines substitute the inputs they lack from their own
    /// substituters before sandoff sends them (Nix's setting of that name).
    #[arg(long)]
    builders_use_substitutes: bool,
    /// The derivations (full .drv store paths).
    #[arg(required = true, value_name = "DRV")]
    drvs: Vec<String>,
}

pub fn run(args: BuildArgs, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let mut placement = args.placement.resolve()?;
    placement.local.disabled = args.jobs == Some(0);
    let drvs: Vec<StorePath> = args
        .drvs
        .iter()
        .map(|a| {
            let p = loc.dir.parse_path(a)?;
            anyhow::ensure!(
                p.is_derivation(),
                "'{a}' is not a derivation (a .drv store path)"
            );
            Ok(p)
        })
        .collect::<anyhow::Result<_>>()?;
    let store = sandoff::derivation::check::open_store(loc.clone())?;
    // Needed only if something is to be built; the error is kept until then.
    let pool = args.users.pool();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let jobs = args.jobs.map_or(cores, |j| j as usize);
    let offloader = if placement.policy.local_only || placement.machines.is_empty() {
        None
    } else {
        let ssh = args.ssh.options();
        Some(Offloader::new(loc, placement.machines.clone(), jobs, ssh)?)
    };
    let ctx = BuildContext {
        store: &store,
        pool: pool.as_ref().map_err(Arc::clone),
        options: Options {
            jobs,
            keep_going: args.keep_going,
            keep_failed: args.keep_failed || args.shell_on_failure,
            max_silent: secs(args.max_silent_time),
            timeout: secs(args.timeout),
            cores: args.cores.unwrap_or(cores as u32),
            stream_logs: args.print_build_logs,
            limits: args.limits.limits(),
            impure_env_allow: args.limits.impure_env_allow.clone(),
            builders_use_substitutes: args.builders_use_substitutes,
            max_log_size: (args.max_log_size > 0).then_some(args.max_log_size),
            check: args.check,
        },
        placement: &placement,
        offload: offloader.as_ref(),
    };
    let mut progress = Progress::new(loc, args.json);
    if args.check {
        progress.checked = drvs.iter().cloned().collect();
    }
    let result = build::realise(&ctx, &drvs, &mut |e| progress.event(e))?;
    progress.clear();
    if args.timings && !args.json {
        progress.print_timings();
    }
    if args.json {
        let l = |p: &StorePath| loc.logical(p);
        let done = json!({
            "event": "done",
            "success": result.success(),
            "failed": result.failed.iter().map(|(d, e)| json!({"drv": l(d), "error": e})).collect::<Vec<_>>(),
            "dependencyFailed": result.dependency_failed.iter().map(|(d, f)| json!({"drv": l(d), "dependency": l(f)})).collect::<Vec<_>>(),
            "notStarted": result.not_started.iter().map(l).collect::<Vec<_>>(),
        });
        eprintln!("{done}");
        if !result.success() {
            if args.shell_on_failure {
                shell_on_failure(loc, &result);
            }
            return Ok(ExitCode::from(1));
        }
    } else if !result.success() {
        for (drv, error) in &result.failed {
            let drv = loc.logical(drv);
            // The error holds the log's last lines and a machine's message.
            let error = termsafe::filter(error.as_bytes());
            if error.contains(&drv) {
                eprintln!("error: {error}");
            } else {
                eprintln!("error: build of '{drv}' failed: {error}");
            }
        }
        for (drv, dep) in &result.dependency_failed {
            eprintln!(
                "error: '{}' not built: dependency '{}' failed",
                loc.logical(drv),
                loc.logical(dep)
            );
        }
        for drv in &result.not_started {
            eprintln!(
                "error: '{}' not built: stopped after a failure (use --keep-going to build the rest)",
                loc.logical(drv)
            );
        }
        if args.shell_on_failure {
            shell_on_failure(loc, &result);
        }
        return Ok(ExitCode::from(1));
    }
    let mut out = std::io::stdout().lock();
    for (_, outputs) in &result.outputs {
        for path in outputs.values() {
            writeln!(out, "{}", loc.logical(path))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `--shell-on-failure`: on a terminal, a shell in the sandbox of the first
/// failed build whose directory was kept (the failure messages name the
/// others' `sandoff enter` commands).
fn shell_on_failure(loc: &StoreLocation, result: &build::Realisation) {
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        return;
    }
    let Some((drv, dir)) = result.failed.iter().find_map(|(drv, _)| {
        let drv = loc.logical(drv);
        build::enter::find_kept(loc, &drv).map(|dir| (drv, dir))
    }) else {
        eprintln!(
            "sandoff: no failed build was kept here to enter (it failed on a build machine, or before its sandbox was set up)"
        );
        return;
    };
    if let Err(e) = super::enter::enter(&dir, None, &[], true) {
        eprintln!("error: cannot enter the sandbox of '{drv}': {e:#}");
    }
}

/// Renders [`Event`]s on stderr.
struct Progress {
    loc: StoreLocation,
    json: bool,
    tty: bool,
    start: Instant,
    running: Vec<StorePath>,
    done: usize,
    total: usize,
    /// Whether a status line is on screen (to be erased before other output).
    status_shown: bool,
    /// The derivations built again to check them (`--check`).
    checked: std::collections::BTreeSet<StorePath>,
    /// What each local build used, where measured.
    usage: std::collections::BTreeMap<StorePath, sandoff::sandbox::ResourceUsage>,
    /// The steps' times summed over every build, and how many builds.
    times: (StepTimes, usize),
}

impl Progress {
    fn new(loc: &StoreLocation, json: bool) -> Progress {
        Progress {
            loc: loc.clone(),
            json,
            tty: !json && std::io::stderr().is_terminal(),
            start: Instant::now(),
            running: Vec::new(),
            done: 0,
            total: 0,
            status_shown: false,
            checked: Default::default(),
            usage: Default::default(),
            times: Default::default(),
        }
    }

    fn event(&mut self, e: &Event) {
        if let Event::Timings { times, .. } = e {
            self.times.0.add(times);
            self.times.1 += 1;
        }
        if let Event::Usage { drv, usage } = e {
            // Shown with the build's `built` or `failed` line.
            self.usage.insert(drv.clone(), *usage);
            return;
        }
        if self.json {
            if let Some(v) = self.to_json(e) {
                eprintln!("{v}");
            }
            return;
        }
        match e {
            Event::Planned { to_build } => self.total = *to_build,
            Event::Started { drv } => self.running.push(drv.clone()),
            Event::WaitingForLock { drv } => self.line(&format!(
                "waiting for lock on the outputs of '{}'",
                self.name(drv)
            )),
            Event::Log { drv, line } => {
                // The builder's bytes, filtered: a log must not drive the
                // terminal (set the clipboard or the title). `--json`
                // escapes them instead.
                let text = format!("{}> {}", drv_short_name(drv), termsafe::filter(line));
                self.line(&text);
            }
            Event::Built { drv, elapsed } => {
                self.finish(drv);
                let verb = if self.checked.contains(drv) {
                    "checked (bit-identical)"
                } else {
                    "built"
                };
                let text = format!(
                    "{verb} {} in {:.1}s{}",
                    self.name(drv),
                    elapsed.as_secs_f64(),
                    self.usage_note(drv)
                );
                self.line(&text);
            }
            Event::Reused { drv } => {
                self.finish(drv);
                let text = format!("built {} (by another process)", self.name(drv));
                self.line(&text);
            }
            Event::Failed { drv, .. } => {
                self.finish(drv);
                let text = format!("failed {}{}", self.name(drv), self.usage_note(drv));
                self.line(&text);
            }
            Event::DependencyFailed { drv, dependency } => {
                self.done += 1;
                let text = format!(
                    "skipped {}: dependency {} failed",
                    self.name(drv),
                    self.name(dependency)
                );
                self.line(&text);
            }
            Event::Warning {
                drv,
                machine,
                message,
            } => {
                // The machine's words may hold anything: filtered.
                let text = format!(
                    "warning: machine '{}' refused while placing '{}': {}",
                    termsafe::filter(machine.as_bytes()),
                    self.name(drv),
                    termsafe::filter(message.as_bytes())
                );
                self.line(&text);
            }
            Event::Usage { .. }
            | Event::Timings { .. }
            | Event::BuilderExited { .. }
            | Event::Tick => {}
        }
        self.status();
    }

    fn finish(&mut self, drv: &StorePath) {
        self.running.retain(|r| r != drv);
        self.done += 1;
    }

    fn name(&self, drv: &StorePath) -> String {
        self.loc.logical(drv)
    }

    fn to_json(&self, e: &Event) -> Option<serde_json::Value> {
        let l = |p: &StorePath| self.loc.logical(p);
        Some(match e {
            Event::Planned { to_build } => json!({"event": "planned", "toBuild": to_build}),
            Event::Started { drv } => json!({"event": "started", "drv": l(drv)}),
            Event::Warning {
                drv,
                machine,
                message,
            } => json!({"event": "warning", "drv": l(drv), "machine": machine, "message": message}),
            Event::WaitingForLock { drv } => json!({"event": "waiting-for-lock", "drv": l(drv)}),
            Event::Log { drv, line } => {
                json!({"event": "log", "drv": l(drv), "line": String::from_utf8_lossy(line)})
            }
            Event::Built { drv, elapsed } => {
                let mut v =
                    json!({"event": "built", "drv": l(drv), "seconds": elapsed.as_secs_f64()});
                if self.checked.contains(drv) {
                    v["checked"] = json!(true);
                }
                self.add_usage(&mut v, drv);
                v
            }
            Event::Reused { drv } => json!({"event": "reused", "drv": l(drv)}),
            Event::Failed { drv, error } => {
                let mut v = json!({"event": "failed", "drv": l(drv), "error": error});
                self.add_usage(&mut v, drv);
                v
            }
            Event::DependencyFailed { drv, dependency } => {
                json!({"event": "dependency-failed", "drv": l(drv), "dependency": l(dependency)})
            }
            Event::Timings { drv, times } => {
                let ms: serde_json::Map<String, serde_json::Value> = times
                    .steps()
                    .map(|(step, d)| (step.name().to_owned(), json!(d.as_secs_f64() * 1000.0)))
                    .collect();
                json!({"event": "timings", "drv": l(drv), "milliseconds": ms})
            }
            Event::Usage { .. } | Event::BuilderExited { .. } | Event::Tick => return None,
        })
    }

    /// The steps' times over every build (`--timings`): total and mean.
    fn print_timings(&mut self) {
        self.clear();
        let (sum, n) = &self.times;
        if *n == 0 {
            eprintln!("timings: nothing was built");
            return;
        }
        eprintln!("timings over {n} build(s):   total ms   mean ms");
        for (step, d) in sum.steps() {
            let ms = d.as_secs_f64() * 1000.0;
            eprintln!("  {:<22} {ms:>10.1} {:>9.2}", step.name(), ms / *n as f64);
        }
        let ms = sum.total().as_secs_f64() * 1000.0;
        eprintln!("  {:<22} {ms:>10.1} {:>9.2}", "all steps", ms / *n as f64);
    }

    /// ` (CPU 1.2s, peak memory 3.4 MiB)`, as far as measured.
    fn usage_note(&self, drv: &StorePath) -> String {
        let Some(u) = self.usage.get(drv) else {
            return String::new();
        };
        let mut parts = Vec::new();
        if let Some(cpu) = u.cpu {
            parts.push(format!("CPU {:.1}s", cpu.as_secs_f64()));
        }
        if let Some(peak) = u.peak_memory {
            parts.push(format!("peak memory {:.1} MiB", peak as f64 / 1048576.0));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }

    /// `cpuSeconds` and `peakMemoryBytes` of `drv`'s build, where measured.
    fn add_usage(&self, v: &mut serde_json::Value, drv: &StorePath) {
        let Some(u) = self.usage.get(drv) else {
            return;
        };
        if let Some(cpu) = u.cpu {
            v["cpuSeconds"] = json!(cpu.as_secs_f64());
        }
        if let Some(peak) = u.peak_memory {
            v["peakMemoryBytes"] = json!(peak);
        }
    }

    /// Prints a line above the status line.
    fn line(&mut self, text: &str) {
        self.clear();
        eprintln!("{text}");
    }

    fn clear(&mut self) {
        if self.status_shown {
            eprint!("\r\x1b[K");
            self.status_shown = false;
        }
    }

    fn status(&mut self) {
        if !self.tty || self.total == 0 {
            return;
        }
        let building: Vec<&str> = self.running.iter().map(drv_short_name).collect();
        let mut line = format!(
            "[{}/{} built, {} left, {}s] {}",
            self.done,
            self.total,
            self.total - self.done.min(self.total),
            self.start.elapsed().as_secs(),
            if building.is_empty() {
                String::new()
            } else {
                format!("building {}", building.join(", "))
            }
        );
        // One terminal line: no wrapping, so `\r` erases all of it.
        if line.chars().count() > 78 {
            line = line.chars().take(77).collect::<String>() + "…";
        }
        eprint!("\r\x1b[K{line}");
        let _ = std::io::stderr().flush();
        self.status_shown = true;
    }
}

/// `hello` for `/nix/store/…-hello.drv`.
fn drv_short_name(drv: &StorePath) -> &str {
    drv.name().strip_suffix(".drv").unwrap_or(drv.name())
}

/// `sandoff log DRV`: prints the stored build log.
pub fn log(drv: &str, loc: &StoreLocation) -> anyhow::Result<ExitCode> {
    let path = loc.dir.parse_path(drv)?;
    anyhow::ensure!(
        path.is_derivation(),
        "'{drv}' is not a derivation (a .drv store path)"
    );
    let file = build::log_path(loc, &path);
    // Streamed, not read whole: a build decides how long its log is.
    let mut log = match build::log::open_log(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "no build log of '{drv}' ({} does not exist)",
                file.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    // As written, escapes and all (`sandoff log DRV | less -R` shows colours;
    // it is the user's own request for the raw log).
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut log, &mut out)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
