//! `sandoff enter` and `sandoff build --shell-on-failure`, the way a user
//! sees them: a failed build kept with `--keep-failed`, its sandbox entered
//! through a real terminal (tmux on a private socket: keys typed, the screen
//! read) or without one.
//!
//! Needs what the build tests need (root, busybox, namespaces, the build
//! users) and tmux for the terminal tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::build::{text, Store};
use crate::support::{self, Need};
use crate::this_test;

/// What the failing derivation leaves in its build directory.
const LEFT_BEHIND: &str = "left-behind-file";

/// A derivation that leaves [`LEFT_BEHIND`] in its build directory and fails.
fn failing_drv(s: &Store) -> String {
    s.script_drv(
        "fails",
        &format!("echo 'left by the build' > {LEFT_BEHIND}; echo failing; exit 1"),
    )
}

/// Builds `drv` with `--keep-failed`; checks that the failure names the
/// `sandoff enter` command of the kept directory, and returns that directory.
fn build_and_keep(s: &Store, drv: &str) -> PathBuf {
    let out = s.build(&["--keep-failed", drv]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let named = stderr
        .split("sandoff enter ")
        .nth(1)
        .unwrap_or_else(|| panic!("no enter command in: {stderr}"));
    let dir = PathBuf::from(
        named
            .split(|c: char| c == ';' || c.is_whitespace())
            .next()
            .expect("a path"),
    );
    let kept: Vec<PathBuf> = s
        .build_dirs()
        .iter()
        .flat_map(|slot| std::fs::read_dir(slot).expect("readdir"))
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(kept, vec![dir.clone()], "the kept directory is named");
    dir
}

/// The build user a kept build ran as, from its saved sandbox.
fn build_uid(kept: &Path) -> u32 {
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(kept.join("sandbox.json")).expect("read sandbox.json"),
    )
    .expect("json");
    let uid = saved["user"]["uid"].as_u64().expect("uid") as u32;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .expect("lookup")
        .expect("the build user exists");
    assert!(user.name.starts_with("sandoffbld"), "{}", user.name);
    uid
}

/// `'text'` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A tmux server on a private socket running one command in a pane wide
/// enough for no line to wrap; killed on drop.
struct Tmux {
    dir: tempfile::TempDir,
}

impl Tmux {
    /// Starts `command` (sh) in a new session; its exit status goes to a
    /// file (see [`Tmux::status`]).
    fn start(command: &str) -> Tmux {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = dir.path().join("status");
        let script = format!("{command}; echo $? > {}", quote(&status.to_string_lossy()));
        let t = Tmux { dir };
        support::run_ok(
            t.tmux()
                .args(["new-session", "-d", "-x", "200", "-y", "50", &script]),
        );
        t
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(self.dir.path().join("sock"));
        c
    }

    /// Types `line` and Enter.
    fn type_line(&self, line: &str) {
        support::run_ok(self.tmux().args(["send-keys", "-l", line]));
        support::run_ok(self.tmux().args(["send-keys", "Enter"]));
    }

    /// Resizes the window (as a user resizing their terminal).
    fn resize(&self, columns: u32, lines: u32) {
        support::run_ok(self.tmux().args([
            "resize-window",
            "-x",
            &columns.to_string(),
            "-y",
            &lines.to_string(),
        ]));
    }

    /// The pane's screen and history, wrapped lines joined.
    fn screen(&self) -> String {
        text(&support::run_ok(self.tmux().args([
            "capture-pane",
            "-p",
            "-J",
            "-S",
            "-",
        ])))
    }

    /// Waits until the screen shows `needle`; returns the screen.
    fn wait_for_screen(&self, needle: &str) -> String {
        let mut last = String::new();
        support::wait_for(&format!("'{needle}' on the screen"), || {
            last = self.screen();
            last.contains(needle).then(|| last.clone())
        })
    }

    /// Types `commands` between two markers and returns the lines they
    /// printed (the markers are typed quoted, so only their output matches).
    fn run(&self, commands: &str) -> Vec<String> {
        let ends = |screen: &str| screen.lines().filter(|l| l.trim_end() == "END").count();
        let before = ends(&self.screen());
        self.type_line(&format!("echo BEG''IN; {commands}; echo EN''D"));
        let screen = support::wait_for("the commands' output", || {
            let screen = self.screen();
            (ends(&screen) > before).then_some(screen)
        });
        let lines: Vec<&str> = screen.lines().map(str::trim_end).collect();
        let end = lines.iter().rposition(|l| *l == "END").expect("END");
        let begin = lines[..end]
            .iter()
            .rposition(|l| *l == "BEGIN")
            .expect("BEGIN");
        lines[begin + 1..end]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// The exit status of the command, once it ended.
    fn status(&self) -> i32 {
        let file = self.dir.path().join("status");
        support::wait_for("the command in tmux to end", || {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|s| s.ends_with('\n'))
        })
        .trim()
        .parse()
        .expect("a status")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server is gone already if its only session ended.
        let _ = self
            .tmux()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// The command line of `sandoff` with `s`'s store, for a shell.
fn sandoff_line(s: &Store, args: &[&str]) -> String {
    let mut words = vec![
        "env".to_owned(),
        "-u".to_owned(),
        "SANDOFF_USER_POOL_DIR".to_owned(),
        "-u".to_owned(),
        "SANDOFF_STATE_DIR".to_owned(),
        "-u".to_owned(),
        "SANDOFF_STORE_DIR".to_owned(),
        quote(env!("CARGO_BIN_EXE_sandoff")),
        "--store-root".to_owned(),
        quote(&s.root().to_string_lossy()),
    ];
    words.extend(args.iter().map(|a| quote(a)));
    words.join(" ")
}

fn ready_with_tmux(test: &str) -> Option<Store> {
    if !support::require(test, &[Need::Root, Need::Program("tmux")]) {
        return None;
    }
    Store::ready(test)
}

#[test]
fn enter_gives_a_shell_in_the_failed_builds_own_world_on_a_terminal() {
    let Some(s) = ready_with_tmux(this_test!()) else {
        return;
    };
    let d = failing_drv(&s);
    let kept = build_and_keep(&s, &d);
    let uid = build_uid(&kept);
    let tmux = Tmux::start(&sandoff_line(&s, &["enter", &kept.to_string_lossy()]));
    tmux.wait_for_screen("[sandoff-enter:");
    let seen = tmux.run(&format!(
        "echo $out; ls -1 /; id -u; pwd; cat ./{LEFT_BEHIND}; ls -1 /nix/store"
    ));
    let bb = s.path(&s.bb);
    let expected: Vec<String> = [
        crate::build::logical(&s.out(&d)).as_str(),
        // The sandbox's root: no /root, /home or anything else of the host's.
        "dev",
        "etc",
        "nix",
        "proc",
        "tmp",
        &uid.to_string(),
        "/tmp/sandoff-build",
        "left by the build",
        // Only the input closure (the build made no output).
        bb.base_name(),
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    assert_eq!(seen, expected, "screen:\n{}", tmux.screen());
    // A terminal of its own, as the controlling one: job control works.
    let seen = tmux.run("test -t 0 && echo stdin-is-a-terminal");
    assert_eq!(seen, ["stdin-is-a-terminal"], "{}", tmux.screen());
    assert!(
        !tmux.screen().contains("job control turned off"),
        "{}",
        tmux.screen()
    );
    // The window's size, at the start and after a resize (tmux applies a
    // resize on its next round, so the size is asked until it changes).
    assert_eq!(tmux.run("stty size"), ["50 200"]);
    tmux.resize(150, 40);
    support::wait_for("the new size in the sandbox", || {
        (tmux.run("stty size") == ["40 150"]).then_some(())
    });
    tmux.type_line("exit 3");
    assert_eq!(tmux.status(), 3, "the shell's status is enter's");
}

#[test]
fn enter_runs_a_command_without_a_terminal() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let kept = build_and_keep(&s, &failing_drv(&s));
    let uid = build_uid(&kept);
    let out = support::output_or_kill(s.cmd().arg("enter").arg(&kept).args([
        "--",
        "sh",
        "-c",
        "id -u; pwd; ls -1 /",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{uid}\n/tmp/sandoff-build\ndev\netc\nnix\nproc\ntmp\n")
    );
    // Locked down as the builder was: no capabilities, no_new_privs, the
    // seccomp filter, only loopback, the sandbox's host name.
    let out = support::output_or_kill(s.cmd().arg("enter").arg(&kept).args([
        "--",
        "sh",
        "-c",
        "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
         grep -c : /proc/net/dev; hostname",
    ]));
    assert_eq!(
        text(&out.stdout),
        "CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
         CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n\
         1\nlocalhost\n",
        "{}",
        text(&out.stderr)
    );
    let out = support::output_or_kill(
        s.cmd()
            .arg("enter")
            .arg(&kept)
            .args(["--", "sh", "-c", "exit 3"]),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // The command's file descriptors are sandoff's, but it is no terminal's
    // and in no terminal's session.
    let out = support::output_or_kill(s.cmd().arg("enter").arg(&kept).args([
        "--",
        "sh",
        "-c",
        "test -t 0 || echo no-terminal",
    ]));
    assert_eq!(text(&out.stdout), "no-terminal\n", "{}", text(&out.stderr));
    // --shell chooses: here the `sh` the build installed in its directory.
    let out = support::output_or_kill(s.cmd().arg("enter").arg(&kept).args([
        "--shell",
        "/tmp/sandoff-build/bin/sh",
        "--",
        "sh",
        "-c",
        "echo $0 via the chosen shell",
    ]));
    assert_eq!(
        text(&out.stdout),
        "sh via the chosen shell\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn enter_waits_for_its_build_user_or_fails_with_no_wait() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let kept = build_and_keep(&s, &failing_drv(&s));
    let uid = build_uid(&kept);
    // A build running as that user holds its lock (the default pool's).
    let lock_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/run/sandoff/userpool").join(uid.to_string()))
        .expect("the user's lock file");
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the build user");
    let out = support::output_or_kill(
        s.cmd()
            .arg("enter")
            .arg("--no-wait")
            .arg(&kept)
            .args(["--", "true"]),
    );
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, &format!("(uid {uid}) is in use by a build"));

    let stderr = tempfile::NamedTempFile::new().expect("tempfile");
    let mut waiting = s
        .cmd()
        .arg("enter")
        .arg(&kept)
        .args(["--", "sh", "-c", "exit 7"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().expect("reopen"))
        .spawn()
        .expect("spawn");
    support::wait_for("enter to say it waits", || {
        let said = std::fs::read_to_string(stderr.path()).expect("read");
        said.contains("waiting for build user").then_some(())
    });
    assert_eq!(waiting.try_wait().expect("try_wait"), None, "it waits");
    drop(lock);
    let status = support::wait_for("enter to end", || waiting.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(7));
}

#[test]
fn enter_refuses_a_kept_build_whose_input_left_the_store() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = failing_drv(&s);
    let kept = build_and_keep(&s, &d);
    let bb = s.path(&s.bb);
    // As a garbage collection would: the .drv (which refers to busybox)
    // first, then busybox, files and all.
    let store = s.open();
    store
        .registry()
        .invalidate(&s.path(&d))
        .expect("invalidate the drv");
    store
        .registry()
        .invalidate(&bb)
        .expect("invalidate busybox");
    drop(store);
    std::fs::remove_dir_all(s.real(&bb)).expect("delete busybox");
    let out = support::output_or_kill(s.cmd().arg("enter").arg(&kept).args(["--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "input '{}' of the build is no longer valid in the store",
            s.bb
        )),
        "{stderr}"
    );
}

#[test]
fn enter_refuses_a_saved_sandbox_others_could_have_changed() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let kept = build_and_keep(&s, &failing_drv(&s));
    let saved = kept.join("sandbox.json");
    let enter = || support::output_or_kill(s.cmd().arg("enter").arg(&kept).args(["--", "true"]));
    std::os::unix::fs::chown(&saved, Some(1), None).expect("chown");
    let out = enter();
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, "owned by uid 1, not root");
    std::os::unix::fs::chown(&saved, Some(0), None).expect("chown");
    std::fs::set_permissions(&saved, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let out = enter();
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, "mode 666 lets others change it");
    std::fs::set_permissions(&saved, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let out = enter();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // An input's mount point in the scratch store that the setup did not
    // make (a symlink its bind would follow) is refused, not mounted on.
    let point = kept.join("store").join(s.path(&s.bb).base_name());
    std::fs::remove_dir(&point).expect("remove the mount point");
    std::os::unix::fs::symlink("/etc", &point).expect("symlink");
    let out = enter();
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, "mount point in the scratch store is not the one");
    // A directory without one is not a kept build.
    let out = support::output_or_kill(s.cmd().arg("enter").arg(s.root()).args(["--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, "is not a kept build directory");
}

#[test]
fn shell_on_failure_opens_the_shell_at_once_on_a_terminal() {
    let Some(s) = ready_with_tmux(this_test!()) else {
        return;
    };
    let d = failing_drv(&s);
    let tmux = Tmux::start(&sandoff_line(&s, &["build", "--shell-on-failure", &d]));
    let screen = tmux.wait_for_screen("[sandoff-enter:");
    assert!(screen.contains("sandoff enter "), "{screen}");
    let seen = tmux.run(&format!("cat ./{LEFT_BEHIND}; echo $out"));
    assert_eq!(
        seen,
        [
            "left by the build".to_owned(),
            crate::build::logical(&s.out(&d))
        ],
        "{}",
        tmux.screen()
    );
    tmux.type_line("exit 0");
    assert_eq!(tmux.status(), 1, "the build's status, not the shell's");
}

#[test]
fn shell_on_failure_without_a_terminal_only_names_the_command() {
    let Some(s) = Store::ready(this_test!()) else {
        return;
    };
    let d = failing_drv(&s);
    let out = support::output_or_kill(s.cmd().args(["build", "--shell-on-failure", &d]));
    assert_eq!(out.status.code(), Some(1));
    crate::build::assert_stderr_has(&out, "to investigate in its sandbox: sandoff enter ");
}
