//! What the tests with real daemons share (guix-daemon, nix-daemon): a
//! daemon process started with its logs in its directory, waited for until
//! it listens, stopped by its pid; and the build machines' keys trusted in
//! the hook's state directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::hosts::TestHost;
use crate::support;

/// A running daemon; killed (by its pid) and reaped when dropped.
pub struct Running {
    child: Child,
    /// Its directory: state, logs, socket.
    pub dir: PathBuf,
}

impl Running {
    /// Spawns `cmd` with its stdout and stderr in `dir/daemon.log` and
    /// `dir/daemon.err`, and waits until it listens on `socket`.
    pub fn spawn(cmd: &mut Command, dir: &Path, socket: &Path) -> Running {
        let _ = std::fs::remove_file(socket);
        Running::spawn_then(cmd, dir, |_| socket.to_owned())
    }

    /// [`Running::spawn`] with the socket's path known only from the
    /// daemon's pid (a socket in a mount namespace of its own, reached
    /// through `/proc/PID/root`).
    pub fn spawn_then(cmd: &mut Command, dir: &Path, socket: impl Fn(u32) -> PathBuf) -> Running {
        let child = cmd
            .stdout(std::fs::File::create(dir.join("daemon.log")).expect("log"))
            .stderr(std::fs::File::create(dir.join("daemon.err")).expect("log"))
            .spawn()
            .expect("start the daemon");
        let socket = socket(child.id());
        let running = Running {
            child,
            dir: dir.to_owned(),
        };
        // A deadline on waiting for the socket, not a measurement.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen: {}",
                std::fs::read_to_string(dir.join("daemon.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }
}

impl Running {
    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dir/bin/<name>`, a symlink to sandoff (a daemon runs its hook by name).
pub fn sandoff_as(dir: &Path, name: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let link = bin.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandoff"), &link).expect("symlink");
    }
    link
}

/// Trusts `host`'s signing key in the hook's state directory, `dir/sandoff`
/// (the daemon's `SANDOFF_STATE_DIR`).
pub fn trust(dir: &Path, host: &TestHost) {
    support::run_ok(
        support::sandoff()
            .arg("--state-dir")
            .arg(dir.join("sandoff"))
            .args(["key", "authorize"])
            .arg(host.home.join("signing-key.pub")),
    );
}

/// `dir/machines`, a Nix machines file with one line per host.
pub fn machines_file(dir: &Path, hosts: &[&TestHost]) -> PathBuf {
    let file = dir.join("machines");
    let lines: String = hosts
        .iter()
        .map(|h| format!("{}\n", h.machine_line()))
        .collect();
    std::fs::write(&file, lines).expect("machines");
    file
}
