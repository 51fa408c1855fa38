//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Running as uid 0.
    Root,
    /// A program on PATH.
    Program(&'static str),
    /// Something about the machine, probed by the test: `what` it needs,
    /// and whether it holds.
    Condition { what: &'static str, met: bool },
}

impl Need {
    fn present(self) -> bool {
        match self {
            Need::Root => nix::unistd::geteuid().is_root(),
            Need::Program(p) => which(p).is_some(),
            Need::Condition { met, .. } => met,
        }
    }
    fn describe(self) -> String {
        match self {
            Need::Root => "root".to_owned(),
            Need::Program(p) => p.to_owned(),
            Need::Condition { what, .. } => what.to_owned(),
        }
    }
}

/// The name of the function this is used in (the innermost `fn`; closures
/// inside it do not count), for [`require`], so that no test types its own
/// name again. A helper `fn` that reports its caller's test takes the name as
/// an argument instead.
#[macro_export]
macro_rules! this_test {
    () => {{
        fn here() {}
        $crate::support::fn_name(std::any::type_name_of_val(&here))
    }};
}

/// The function [`this_test!`] stands in, from the type name of its local
/// `fn here`: `it::module::test::{{closure}}::here` gives `test`.
pub fn fn_name(here: &'static str) -> &'static str {
    let path = here.strip_suffix("::here").unwrap_or(here);
    path.rsplit("::")
        .find(|segment| !segment.starts_with('{'))
        .unwrap_or(path)
}

/// Probes for what a test needs. Returns `false` (after printing
/// `SKIP <test>: needs <x>` on stderr) when something is missing, so the test
/// can return early; under `CI=true` a missing requirement panics instead, so
/// nothing is skipped silently in CI.
#[must_use]
pub fn require(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter(|n| !n.present())
        .map(|n| n.describe())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("SKIP {test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (a missing requirement is a failure under CI=true)");
    }
    // Past the test harness's capture (which only takes `eprintln!`), so
    // that the line reaches the log and the test script counts it.
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

/// [`require`] for programs on PATH only.
#[must_use]
pub fn require_programs(test: &str, programs: &[&'static str]) -> bool {
    let needs: Vec<Need> = programs.iter().map(|&p| Need::Program(p)).collect();
    require(test, &needs)
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The sandoff binary built for this test run.
pub fn sandoff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sandoff"))
}

/// The repository's `fixtures/` directory.
pub fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"))
}

/// A `Command` for a Nix 2.8 tool, configured offline and without sandbox,
/// with its own chroot store under `store_root` and config under `conf_dir`.
pub fn nix_cmd(program: &str, conf_dir: &Path) -> Command {
    std::fs::create_dir_all(conf_dir).expect("create nix conf dir");
    std::fs::write(
        conf_dir.join("nix.conf"),
        "sandbox = false\nsubstituters =\nexperimental-features = nix-command\nbuild-users-group =\n",
    )
    .expect("write nix.conf");
    let mut c = Command::new(program);
    c.env("NIX_CONF_DIR", conf_dir).env_remove("NIX_REMOTE");
    c
}

/// Where Nix puts `baz` of [`nix_foo_baz`] in `/nix/store`.
pub const NIX_BAZ: &str = "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz";

/// Creates `foo` ("bar") and `baz` (which refers to `foo`) with Nix's
/// `nix-instantiate` in its chroot store `store`, config under `conf`, and
/// checks that `baz` is [`NIX_BAZ`].
pub fn nix_foo_baz(conf: &Path, store: &Path) {
    let out = run_ok(
        nix_cmd("nix-instantiate", conf)
            .arg("--store")
            .arg(store)
            .args([
                "--read-write-mode",
                "--eval",
                "-E",
                r#"let foo = builtins.toFile "foo" "bar"; in builtins.toFile "baz" "${foo}""#,
            ]),
    );
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        format!("\"{NIX_BAZ}\"")
    );
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// Starts `cmd` with its stdin, stdout and stderr piped.
fn spawn_piped(cmd: &mut Command) -> std::process::Child {
    use std::process::Stdio;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Runs `cmd` with `input` on stdin (then EOF) and waits for it, like
/// `Command::output`; panics if it does not read all of `input`.
pub fn output_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    let (out, written) = output_after_writing(cmd, input);
    if let Err(e) = written {
        panic!("{cmd:?} did not read all of its input: {e}");
    }
    out
}

/// [`output_with_input`] for a command that may exit before it has read all
/// of `input`: how the write went comes back beside the output.
pub fn output_after_writing(
    cmd: &mut Command,
    input: &[u8],
) -> (std::process::Output, std::io::Result<()>) {
    let mut child = spawn_piped(cmd);
    // Dropped after the write: the command sees EOF.
    let written = child.stdin.take().expect("piped stdin").write_all(input);
    let out = child.wait_with_output().expect("wait");
    (out, written)
}

/// Runs `cmd` (a `sandoff` with its store options) as `derivation add` with
/// `drv` (show-derivation JSON) on stdin; panics with its stderr if it fails;
/// returns the `.drv` path it printed.
pub fn derivation_add(cmd: &mut Command, drv: &serde_json::Value) -> String {
    let out = output_with_input(cmd.args(["derivation", "add"]), drv.to_string().as_bytes());
    assert!(
        out.status.success(),
        "derivation add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// How long [`output_or_kill`] lets a command run: far more than it needs,
/// so only a hang reaches it (it is not a timing assertion).
pub const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `cmd` (stdin closed) to completion like `Command::output`, but
/// kills it and panics if it is still running after [`WATCHDOG`], so that a
/// regression to a hang fails the test instead of stalling the suite.
pub fn output_or_kill(cmd: &mut Command) -> std::process::Output {
    feed_or_kill(cmd, drop)
}

/// [`output_or_kill`] with `feed` writing the command's stdin from a thread
/// of its own (it may write more than the command reads: write errors
/// are for `feed` to ignore).
pub fn feed_or_kill(
    cmd: &mut Command,
    feed: impl FnOnce(std::process::ChildStdin) + Send + 'static,
) -> std::process::Output {
    let mut child = spawn_piped(cmd);
    let stdin = child.stdin.take().expect("piped stdin");
    // Not joined: a feeder blocked on a full pipe ends with EPIPE once the
    // command is gone.
    std::thread::spawn(move || feed(stdin));
    output_or_kill_child(child, &format!("{cmd:?}"))
}

/// The output of `child` (what is left of its piped stdout and stderr),
/// killed if it runs longer than the watchdog allows.
pub fn output_or_kill_child(mut child: std::process::Child, what: &str) -> std::process::Output {
    use std::io::Read as _;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = std::time::Instant::now() + WATCHDOG;
    // Polled rather than waited for in another thread: the child is only
    // killed while it is still ours (not yet reaped), never a reused pid.
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {WATCHDOG:?}: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

#[test]
fn this_test_names_the_enclosing_fn_even_inside_closures() {
    assert_eq!(
        crate::this_test!(),
        "this_test_names_the_enclosing_fn_even_inside_closures"
    );
    let in_closure = || crate::this_test!();
    assert_eq!(
        in_closure(),
        "this_test_names_the_enclosing_fn_even_inside_closures"
    );
    fn nested() -> &'static str {
        crate::this_test!()
    }
    assert_eq!(nested(), "nested", "the innermost fn is the one named");
}

/// Polls `ready` until it gives a value, as long as a loaded machine may
/// need (a guard against a hang, not a measurement); panics with `what`.
pub fn wait_for<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited in vain: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The build directories left under `<state>/builds`: all but the build
/// users' reusable ones (`uid-<uid>/sandoff-build`) with nothing in them.
pub fn leftover_build_dirs(state: &Path) -> Vec<PathBuf> {
    let empty = |p: PathBuf| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none());
    let clean_user_dir = |p: &PathBuf| {
        let top = p.join("sandoff-build");
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("uid-"))
            && ["build", "store", "root"]
                .iter()
                .all(|d| empty(top.join(d)))
    };
    match std::fs::read_dir(state.join("builds")) {
        Ok(d) => d
            .map(|e| e.expect("entry").path())
            .filter(|p| !clean_user_dir(p))
            .collect(),
        Err(_) => Vec::new(),
    }
}
