//! The build users belong to the machine: by default every sandoff process
//! locks them in one machine-wide directory, whatever its store or state
//! directory, so two processes never give one uid to two builds (each
//! build kills the uid's other processes before it starts).
//!
//! Needs what `build::ready` needs (root, busybox, build users).

use std::time::{Duration, Instant};

use crate::build::{ready, text, Spec, Store};
use crate::this_test;

#[test]
fn two_stores_with_their_own_state_share_the_build_users_locks() {
    if !ready(this_test!()) {
        return;
    }
    let (a, b) = (Store::new(), Store::new());
    // Runs until killed, after saying who it is.
    let long = a.drv(
        "long",
        Spec {
            script: "echo uid=$(id -u); exec sleep 1000",
            ..Spec::default()
        },
    );
    let short = b.drv(
        "short",
        Spec {
            script: "id -u > $out",
            ..Spec::default()
        },
    );
    // The machine-wide default, not the test suite's own directory.
    let mut first = a.spawn_build(a.cmd().env_remove("SANDOFF_USER_POOL_DIR"), &long);
    let log = sandoff::build::log_path(&a.loc(), &a.path(&long));
    // Generous: a deadline on waiting, not a measurement.
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_uid = loop {
        let seen = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(uid) = seen.lines().find_map(|l| l.strip_prefix("uid=")) {
            break uid.trim().to_owned();
        }
        if Instant::now() > deadline {
            let _ = first.kill();
            panic!("the first build did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // While the first build holds its user, a build of another store.
    let out = b
        .cmd()
        .env_remove("SANDOFF_USER_POOL_DIR")
        .args(["build", &short])
        .output()
        .expect("run");
    let still_running = first.try_wait().expect("wait").is_none();
    let _ = first.kill();
    let _ = first.wait();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(still_running, "the first build ended early");
    let second_uid = std::fs::read_to_string(b.real(&b.out(&short))).expect("read");
    assert_ne!(
        first_uid,
        second_uid.trim(),
        "two builds of two stores ran as one build user"
    );
}
