//! `BuildDerivation` and `BuildPaths`: checking what the client sends,
//! building here through [`crate::build`], answering with Nix's statuses,
//! and killing the build when the client goes away.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::build::local::{
    clear_free_user_dirs, realise_one, remove_stale_build_dirs, StepOutcome,
};
use crate::build::{self, builds_dir, BuildContext, BuildErrorKind, Event, Options};
use crate::decide::Placement;
use crate::derivation::DrvHasher;
use crate::derivation::{Derivation, DerivationKind, DerivationOutput};
use crate::sandbox::BuildOutcome;
use crate::serve_protocol::{self, BuildOptions, BuildResult, BuildStatus, MAX_ITEMS, MAX_STRING};
use crate::store::keyring::Keyring;
use crate::store::local::LocalStore;
use crate::store::path::output_path_name;
use crate::store::wire::{self};
use crate::store::{HashAlgo, StorePath};

use super::dispatch::{wire, Server};
use super::{BuildSetup, ServeError};
use crate::sandbox::users::kill_children;

impl Server<'_, '_> {
    /// `BuildDerivation`: reads the request, answers a [`BuildResult`].
    pub(super) fn build_derivation(&mut self) -> Result<(), ServeError> {
        const WHAT: &str = "BuildDerivation";
        let drv_path = self.read_path(WHAT)?;
        let dir = self.store.location().dir.clone();
        let Some(drv_name) = drv_path.name().strip_suffix(".drv") else {
            return Err(ServeError::NotDerivation {
                path: dir.display(&drv_path),
            });
        };
        let drv = serve_protocol::read_basic_derivation(self.input, &dir, drv_name)
            .map_err(ServeError::Protocol)?;
        let options =
            BuildOptions::read(self.input, self.client_minor).map_err(ServeError::Protocol)?;
        tracing::info!(drv = %dir.display(&drv_path), "BuildDerivation");
        let result = self.build_basic(&drv_path, drv_name, &drv, &options);
        tracing::info!(status = ?result.status, error = %result.error_msg, "BuildDerivation done");
        result
            .write(
                self.output,
                self.client_minor,
                &dir,
                &basic_drv_hash(&drv, drv_name, &dir),
            )
            .map_err(ServeError::Protocol)
    }

    /// Checks and builds a `BasicDerivation`; every failure is a result.
    fn build_basic(
        &mut self,
        drv_path: &StorePath,
        drv_name: &str,
        drv: &Derivation,
        options: &BuildOptions,
    ) -> BuildResult {
        let start_time = now();
        let mut result = BuildResult {
            status: BuildStatus::MiscFailure,
            error_msg: String::new(),
            times_built: 0,
            non_deterministic: false,
            start_time,
            stop_time: start_time,
            built_outputs: BTreeMap::new(),
        };
        let loc = self.store.location();
        let full = loc.logical(drv_path);
        if let Err(msg) = check_basic(self.store, &full, drv_name, drv) {
            result.error_msg = msg;
            return result;
        }
        let outputs = drv.output_paths();
        let mut all_valid = true;
        for p in outputs.values() {
            match self.store.is_valid(p) {
                Ok(v) => all_valid &= v,
                Err(e) => {
                    result.error_msg = format!("cannot build '{full}': {e}");
                    return result;
                }
            }
        }
        if all_valid {
            result.status = BuildStatus::AlreadyValid;
            result.built_outputs = outputs;
            return result;
        }
        if let Err(e) = remove_stale_build_dirs(&builds_dir(loc)) {
            tracing::warn!("cannot remove stale build directories: {e}");
        }
        if let Ok(pool) = &self.setup.pool {
            clear_free_user_dirs(&builds_dir(loc), pool);
        }
        let placement = placement_for(&mut self.placement, drv.required_system_features());
        let ctx = local_context(self.store, &self.setup, options, placement);
        let log = &mut *self.setup.log;
        let hangup = self.setup.hangup;
        let outcome = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Event>();
            let forward = s.spawn(move || {
                for event in rx {
                    if let Event::Log { line, .. } = event {
                        log_line(log, &line);
                    }
                }
            });
            let outcome = while_watching(hangup, || realise_one(&ctx, drv_path, drv, &tx));
            drop(tx);
            if let Err(panic) = forward.join() {
                std::panic::resume_unwind(panic);
            }
            outcome
        });
        result.stop_time = now();
        match outcome {
            Ok(StepOutcome::Built) => {
                self.sign_outputs(&full, &outputs);
                result.status = BuildStatus::Built;
                result.times_built = 1;
                result.built_outputs = outputs;
            }
            // Another process built it while we waited for the locks.
            Ok(StepOutcome::Reused) => {
                result.status = BuildStatus::AlreadyValid;
                result.built_outputs = outputs;
            }
            // Only a graph's builds wait for a job slot that may never come.
            Ok(StepOutcome::NotStarted) => {
                result.status = BuildStatus::MiscFailure;
                result.error_msg = "the build was not started".to_owned();
            }
            Err(e) => {
                result.status = failure_status(&e.kind, drv.is_fixed_output());
                result.error_msg = e.to_string();
            }
        }
        result
    }

    /// Signs each output with this machine's key; without a key (or on any
    /// failure) warns, on the log too so that the client's user sees why
    /// the outputs will be refused.
    fn sign_outputs(&mut self, drv: &str, outputs: &BTreeMap<String, StorePath>) {
        let loc = self.store.location();
        let sign = || -> Result<(), String> {
            let key = Keyring::new(&loc.state)
                .secret_key()
                .map_err(|e| format!("{e} (run `sandoff setup` to create this machine's key)"))?;
            for p in outputs.values() {
                let info = self
                    .store
                    .query_path_info(p)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("'{}' is not valid", loc.logical(p)))?;
                let sig = key.sign_path(&info, &loc.dir).map_err(|e| e.to_string())?;
                self.store
                    .add_signatures(p, &BTreeSet::from([sig]))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = sign() {
            tracing::warn!(drv, "outputs not signed: {e}");
            let _ = writeln!(
                self.setup.log,
                "warning: the outputs of '{drv}' are not signed by this machine: {e}"
            );
            let _ = self.setup.log.flush();
        }
    }

    /// `BuildPaths`: realises the paths, answers `0` or a status and message.
    pub(super) fn build_paths(&mut self) -> Result<(), ServeError> {
        const WHAT: &str = "BuildPaths";
        let specs = wire(WHAT, wire::read_strings(self.input, MAX_ITEMS, MAX_STRING))?;
        let options =
            BuildOptions::read(self.input, self.client_minor).map_err(ServeError::Protocol)?;
        let dir = &self.store.location().dir;
        let mut drvs = Vec::new();
        let mut others = Vec::new();
        for spec in &specs {
            // `path!out,dev`: every output is built, so the names only
            // need to be there.
            let path = spec.split_once('!').map_or(spec.as_str(), |(p, _)| p);
            let path = dir.parse_path(path).map_err(ServeError::BadPath)?;
            if path.is_derivation() {
                drvs.push(path);
            } else {
                others.push(path);
            }
        }
        let (status, msg) = self.realise_paths(&drvs, &others, &options);
        wire(WHAT, wire::write_u64(self.output, status))?;
        if status != 0 {
            wire(WHAT, wire::write_bytes(self.output, msg.as_bytes()))?;
        }
        Ok(())
    }

    /// Nix's exit status (0, 1, 100, 101) and message of building `drvs`
    /// and making sure `others` are valid.
    fn realise_paths(
        &mut self,
        drvs: &[StorePath],
        others: &[StorePath],
        options: &BuildOptions,
    ) -> (u64, String) {
        let loc = self.store.location();
        for p in others {
            match self.store.is_valid(p) {
                Ok(true) => {}
                Ok(false) => {
                    return (
                        1,
                        format!(
                        "path '{}' is not valid here and cannot be substituted (no substituters)",
                        loc.logical(p)
                    ),
                    )
                }
                Err(e) => return (1, e.to_string()),
            }
        }
        if drvs.is_empty() {
            return (0, String::new());
        }
        let mut features = BTreeSet::new();
        for d in drvs.iter() {
            if let Ok(drv) = build::graph::read_derivation(self.store, d) {
                features.extend(drv.required_system_features());
            }
        }
        let placement = placement_for(&mut self.placement, features);
        let ctx = local_context(self.store, &self.setup, options, placement);
        let log = &mut *self.setup.log;
        let mut built = Vec::new();
        let realised = while_watching(self.setup.hangup, || {
            build::realise(&ctx, drvs, &mut |event| match event {
                Event::Log { line, .. } => log_line(log, line),
                Event::Built { drv, .. } => built.push(drv.clone()),
                _ => {}
            })
        });
        // Signed as BuildDerivation's outputs are, dependencies included.
        for drv in &built {
            match self.store.derivation_outputs(drv) {
                Ok(outputs) => self.sign_outputs(&loc.logical(drv), &outputs),
                Err(e) => tracing::warn!(drv = %loc.logical(drv), "outputs not signed: {e}"),
            }
        }
        let r = match realised {
            Ok(r) => r,
            Err(e) => return (1, e.to_string()),
        };
        if r.success() {
            return (0, String::new());
        }
        let mut msgs = Vec::new();
        // The failures are one-line messages by now; a time limit shows as
        // BuildOutcome's Display right after "builder for '...' failed: ",
        // before the log tail (which might say anything).
        let mut timed_out = false;
        for (drv, error) in &r.failed {
            timed_out |= error
                .split("; last log lines:")
                .next()
                .is_some_and(|e| e.contains("failed: timed out after"));
            let drv = loc.logical(drv);
            if error.contains(&drv) {
                msgs.push(error.clone());
            } else {
                msgs.push(format!("build of '{drv}' failed: {error}"));
            }
        }
        for (drv, dep) in &r.dependency_failed {
            msgs.push(format!(
                "'{}' not built: dependency '{}' failed",
                loc.logical(drv),
                loc.logical(dep)
            ));
        }
        for drv in &r.not_started {
            msgs.push(format!(
                "'{}' not built: stopped after a failure",
                loc.logical(drv)
            ));
        }
        (if timed_out { 101 } else { 100 }, msgs.join("; "))
    }
}

/// The checks of a `BasicDerivation` before building it (see the module
/// docs); the error is the message of a `MiscFailure`.
fn check_basic(
    store: &LocalStore,
    full: &str,
    drv_name: &str,
    drv: &Derivation,
) -> Result<(), String> {
    let dir = &store.location().dir;
    match drv.kind() {
        Ok(DerivationKind::InputAddressed { deferred: false } | DerivationKind::Fixed) => {}
        Ok(kind) => {
            return Err(format!(
                "cannot build '{full}': {kind:?} derivations are not supported by this server"
            ))
        }
        Err(e) => return Err(format!("cannot build '{full}': {e}")),
    }
    for (name, output) in &drv.outputs {
        let Some(path) = output.path() else {
            return Err(format!(
                "cannot build '{full}': output '{name}' has no path"
            ));
        };
        let expected_name = output_path_name(drv_name, name.as_str());
        if path.name() != expected_name {
            return Err(format!(
                "cannot build '{full}': output '{name}' is '{}', whose name is not '{expected_name}'",
                dir.display(path)
            ));
        }
        if let DerivationOutput::CAFixed { method, hash, .. } = output {
            let expected = dir
                .make_fixed_output_path(*method, hash, &expected_name, [], false)
                .map_err(|e| format!("cannot build '{full}': {e}"))?;
            if &expected != path {
                return Err(format!(
                    "cannot build '{full}': fixed output '{name}' is '{}', but its hash gives '{}'",
                    dir.display(path),
                    dir.display(&expected)
                ));
            }
        }
    }
    for input in &drv.input_sources {
        match store.is_valid(input) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "cannot build '{full}': input '{}' is not valid on this machine \
                     (the client must send the whole input closure first)",
                    dir.display(input)
                ))
            }
            Err(e) => return Err(format!("cannot build '{full}': {e}")),
        }
    }
    Ok(())
}

/// What a build of this session needs: builds here never go on to other
/// machines (the client chose this one).
fn local_context<'c, 's: 'c>(
    store: &'c LocalStore,
    setup: &BuildSetup<'s>,
    options: &BuildOptions,
    placement: &'c Placement,
) -> BuildContext<'c> {
    BuildContext {
        store,
        pool: setup.pool.clone(),
        options: build_options(options, setup, true),
        placement,
        offload: None,
    }
}

fn build_options(options: &BuildOptions, setup: &BuildSetup<'_>, stream_logs: bool) -> Options {
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    Options {
        jobs: 1,
        keep_going: false,
        keep_failed: options.keep_failed,
        max_silent: secs(options.max_silent_time),
        timeout: secs(options.build_timeout),
        cores: setup.cores,
        stream_logs,
        limits: setup.limits,
        impure_env_allow: setup.impure_env_allow.clone(),
        // A serve host's builds have no build machines of their own.
        builders_use_substitutes: false,
        max_log_size: (options.max_log_size > 0).then_some(options.max_log_size),
        check: false,
    }
}

/// The status of a failed build, as Nix 2.8's `buildDone` (module docs).
fn failure_status(e: &BuildErrorKind, fixed_output: bool) -> BuildStatus {
    use BuildErrorKind as K;
    match e {
        K::Kept { error, .. } => failure_status(error, fixed_output),
        K::LogLimit { .. } => BuildStatus::LogLimitExceeded,
        K::NotDeterministic { .. } => BuildStatus::NotDeterministic,
        K::Failed {
            outcome: BuildOutcome::TimedOut { .. },
            ..
        } => BuildStatus::TimedOut,
        K::Failed { .. } if fixed_output => BuildStatus::TransientFailure,
        K::Failed { .. } => BuildStatus::PermanentFailure,
        K::MissingOutput { .. }
        | K::ForeignFile { .. }
        | K::UnsupportedType { .. }
        | K::HashMismatch { .. }
        | K::FlatNotRegular
        | K::FixedReferences { .. }
        | K::OutputCheck(_) => BuildStatus::OutputRejected,
        _ => BuildStatus::MiscFailure,
    }
}

/// The hashDerivationModulo of a `BasicDerivation` with its outputs masked
/// (it has no input derivations, so nothing is looked up), as Nix 2.8 keys
/// realisations with it, `sha256:<base16>`.
/// `drv_name` is its name (from its `.drv` path, as Nix's), which a
/// fixed-output derivation's hash needs.
fn basic_drv_hash(drv: &Derivation, drv_name: &str, dir: &crate::store::StoreDir) -> String {
    let no_lookup = |p: &StorePath| {
        Err::<Derivation, _>(io::Error::new(
            io::ErrorKind::NotFound,
            format!("a BasicDerivation has no input derivation ({p})"),
        ))
    };
    let hash = DrvHasher::new(dir.clone(), no_lookup)
        .hash_modulo_named(drv, drv_name, true)
        .ok()
        .and_then(|h| h.hashes.into_values().next())
        // Not computable (e.g. no outputs): still a stable string.
        .unwrap_or_else(|| HashAlgo::Sha256.digest(&drv.to_aterm(dir)));
    hash.to_base16_prefixed()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How often the hangup watcher looks.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Runs `f` on this thread (the sandbox's parent-death signal is tied to
/// the thread that starts a build) while another thread watches `hangup`.
fn while_watching<R>(hangup: Option<BorrowedFd<'_>>, f: impl FnOnce() -> R) -> R {
    let Some(fd) = hangup else {
        return f();
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| watch(fd, &done));
        // Set even when `f` panics: else the scope would wait for the
        // watcher forever and the session would never end.
        let _stop = SetOnDrop(&done);
        f()
        // `_stop` stops the watcher; the scope joins it and re-raises a
        // panic of either thread.
    })
}

/// Sets the flag when dropped (also while unwinding).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Until `done`: polls `fd` for a hangup; once it has hung up, kills this
/// process's children again and again (a build may start after the first
/// round, e.g. once it has a build user).
fn watch(fd: BorrowedFd<'_>, done: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let interval =
        PollTimeout::try_from(WATCH_INTERVAL.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    // A socket whose peer shut down its side (nix names no POLLRDHUP).
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut gone = false;
    while !done.load(Ordering::Acquire) {
        if gone {
            kill_children();
            std::thread::sleep(WATCH_INTERVAL);
            continue;
        }
        // Not POLLIN: a client may send its next command early, which is
        // not a hangup. POLLHUP and POLLERR are always reported.
        let mut pfd = [PollFd::new(fd, rdhup)];
        match poll(&mut pfd, interval) {
            Ok(0) | Err(nix::Error::EINTR) => {}
            Ok(_) => {
                let ev = pfd[0].revents().unwrap_or(PollFlags::empty());
                if ev.contains(PollFlags::POLLNVAL) {
                    tracing::warn!("cannot watch the client connection: not an open file");
                    return;
                }
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | rdhup) {
                    tracing::warn!("the client went away: killing the build");
                    gone = true;
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch the client connection: {e}");
                return;
            }
        }
    }
}

/// Passes one build log line to the client (the server's stderr) at once.
/// The client may be gone; the log file has it all, so a failure is ignored.
fn log_line(log: &mut dyn Write, line: &[u8]) {
    let _ = log
        .write_all(line)
        .and_then(|()| log.write_all(b"\n"))
        .and_then(|()| log.flush());
}

/// How builds are placed here: always locally, and without checking
/// `requiredSystemFeatures`: the client chose this machine from its
/// machines file, which is what says which features it offers (Nix would
/// check the remote's `system-features` again and fail).
fn placement_for(slot: &mut Option<Placement>, features: BTreeSet<String>) -> &Placement {
    let p = slot.get_or_insert_with(Placement::local_only);
    p.local.features.extend(features);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::OutputName;
    use crate::serve::test_support::{open, path};
    use crate::store::FileIngestionMethod;

    #[test]
    fn a_build_that_panics_while_watched_ends_the_session_with_the_panic() {
        use std::os::fd::AsFd;
        // The client is still there: the watcher would poll it forever
        // unless told the build is over, also when the build panicked.
        let (ours, _client) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let got = std::panic::catch_unwind(|| {
            while_watching(Some(ours.as_fd()), || -> () {
                panic!("injected build panic")
            })
        });
        assert!(got.is_err(), "the panic reaches the session");
        assert_eq!(while_watching(Some(ours.as_fd()), || 7), 7);
    }

    fn drv(outputs: Vec<(&str, DerivationOutput)>, inputs: &[&StorePath]) -> Derivation {
        Derivation {
            outputs: outputs
                .into_iter()
                .map(|(n, o)| (OutputName::new(n).expect("name"), o))
                .collect(),
            input_derivations: BTreeMap::new(),
            input_sources: inputs.iter().map(|p| (*p).clone()).collect(),
            system: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn checks_output_names_fixed_paths_and_inputs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(&tmp);
        let input = store
            .add_text("input", b"x", &BTreeSet::new(), &BTreeMap::new())
            .expect("add");
        let ia = |base: &str| DerivationOutput::InputAddressed { path: path(base) };
        let good = drv(
            vec![
                ("out", ia("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")),
                ("dev", ia("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-dev")),
            ],
            &[&input],
        );
        check_basic(&store, "d", "hello", &good).expect("fits");

        let wrong_name = drv(
            vec![("dev", ia("8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"))],
            &[&input],
        );
        let e = check_basic(&store, "d", "hello", &wrong_name).expect_err("dev named hello");
        assert!(e.contains("'hello-dev'"), "{e}");

        let missing = path("00000000000000000000000000000000-missing");
        let no_input = drv(
            vec![("out", ia("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"))],
            &[&input, &missing],
        );
        let e = check_basic(&store, "d", "hello", &no_input).expect_err("missing input");
        assert!(
            e.contains("/nix/store/00000000000000000000000000000000-missing"),
            "{e}"
        );

        let hash = HashAlgo::Sha256.digest(b"content");
        let dir = &store.location().dir;
        let right = dir
            .make_fixed_output_path(FileIngestionMethod::Flat, &hash, "src", [], false)
            .expect("path");
        let fixed = |path: StorePath| {
            drv(
                vec![(
                    "out",
                    DerivationOutput::CAFixed {
                        method: FileIngestionMethod::Flat,
                        hash: hash.clone(),
                        path,
                    },
                )],
                &[],
            )
        };
        check_basic(&store, "d", "src", &fixed(right.clone())).expect("right fixed path");
        let e = check_basic(
            &store,
            "d",
            "src",
            &fixed(path("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-src")),
        )
        .expect_err("wrong fixed path");
        assert!(e.contains(&dir.display(&right)), "{e}");

        let deferred = drv(vec![("out", DerivationOutput::Deferred)], &[]);
        assert!(check_basic(&store, "d", "x", &deferred).is_err());
    }

    #[test]
    fn failures_map_to_nix_statuses() {
        let failed = |outcome| BuildErrorKind::Failed {
            outcome,
            kept: None,
            tail: Vec::new(),
        };
        let timeout = BuildOutcome::TimedOut {
            kind: crate::sandbox::TimeoutKind::Silent,
            after: Duration::from_secs(1),
        };
        let exit = BuildOutcome::Exited(1);
        for (outcome, fixed_output, status) in [
            (timeout, false, BuildStatus::TimedOut),
            (timeout, true, BuildStatus::TimedOut),
            (exit, false, BuildStatus::PermanentFailure),
            (exit, true, BuildStatus::TransientFailure),
        ] {
            assert_eq!(
                failure_status(&failed(outcome), fixed_output),
                status,
                "{outcome:?}, fixed output: {fixed_output}"
            );
        }
        let kept = BuildErrorKind::Kept {
            error: Box::new(failed(exit)),
            dir: "/tmp/x".into(),
        };
        assert_eq!(failure_status(&kept, false), BuildStatus::PermanentFailure);
        let missing = BuildErrorKind::MissingOutput {
            output: "out".to_owned(),
            path: "p".to_owned(),
        };
        assert_eq!(failure_status(&missing, false), BuildStatus::OutputRejected);
        // Output checks fail after the builder succeeded: rejected, as Nix.
        let refers = BuildErrorKind::OutputCheck(crate::derivation::attrs::CheckError::TooLarge {
            output: "out".to_owned(),
            path: "p".to_owned(),
            size: 2,
            limit: 1,
        });
        assert_eq!(failure_status(&refers, false), BuildStatus::OutputRejected);
        let no_users =
            BuildErrorKind::NoUsers(std::sync::Arc::new(crate::sandbox::UserError::NotGiven {
                why: "none",
            }));
        assert_eq!(failure_status(&no_users, false), BuildStatus::MiscFailure);
        let log_limit = BuildErrorKind::LogLimit {
            limit: 10,
            kept: None,
        };
        assert_eq!(
            failure_status(&log_limit, false),
            BuildStatus::LogLimitExceeded
        );
    }

    #[test]
    fn basic_derivation_hash_is_stable_and_prefixed() {
        let d = drv(
            vec![(
                "out",
                DerivationOutput::InputAddressed {
                    path: path("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"),
                },
            )],
            &[],
        );
        let dir = crate::store::StoreDir::default();
        let h = basic_drv_hash(&d, "hello", &dir);
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64, "{h}");
        assert_eq!(h, basic_drv_hash(&d, "hello", &dir));
        let mut other = d.clone();
        other.builder = b"/bin/bash".to_vec();
        assert_ne!(h, basic_drv_hash(&other, "hello", &dir));
    }
}
