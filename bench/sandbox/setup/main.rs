//! Per-build sandbox setup cost: sandoff's sandbox running busybox `true`
//! against `bwrap --unshare-all` running the same command, in one run.
//!
//! Run as root with `bench/sandbox/setup/run.sh` (release build). Reports the
//! median, p10 and p90 of each and the ratio of medians; the target is
//! sandoff <= 2x bwrap.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use sandoff::sandbox::plan::{self, InputPath, SandboxSpec, Timeouts};
use sandoff::sandbox::setup::{ensure_build_users, BuildUsers};
use sandoff::sandbox::{exec, run_build, BuildOutcome, HostDirs, UserPool};
use sandoff::store::{StoreDir, StorePath};

const BUSYBOX: &str = "7c0v0kbrrdc2cqgisi78jdqxn73n3401-busybox";

fn stats(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<44} median {:>7.3} ms  p10 {:>7.3}  p90 {:>7.3}  (n={})",
        ms(pick(0.5)),
        ms(pick(0.1)),
        ms(pick(0.9)),
        v.len()
    );
    pick(0.5)
}

fn time(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..5 {
        f(); // warm-up
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    anyhow::ensure!(n > 0, "the number of runs must be at least 1");
    let tmp = tempfile::tempdir()?;
    let bb_dir = tmp.path().join("root/nix/store").join(BUSYBOX);
    std::fs::create_dir_all(bb_dir.join("bin"))?;
    std::fs::copy("/bin/busybox", bb_dir.join("bin/busybox"))?;
    ensure_build_users(&BuildUsers::Create {
        group: "sandoffbld".to_owned(),
        count: 10,
    })?;
    let pool = UserPool::from_group("sandoffbld", &tmp.path().join("userpool"))?;
    let lease = pool
        .try_acquire()?
        .ok_or_else(|| anyhow::anyhow!("no free build user"))?;

    let spec_for = |dirs: &HostDirs| SandboxSpec {
        store_dir: StoreDir::default(),
        builder: format!("/nix/store/{BUSYBOX}/bin/busybox").into_bytes(),
        args: vec![b"true".to_vec()],
        env: BTreeMap::new(),
        inputs: vec![InputPath {
            source: bb_dir.clone(),
            path: StorePath::from_base_name(BUSYBOX).expect("valid"),
        }],
        outputs: vec![],
        dirs: dirs.dirs().clone(),
        build_dir_name: plan::DEFAULT_BUILD_DIR_NAME.to_owned(),
        user: lease.user().clone(),
        fixed_output: false,
        impure_env: BTreeMap::new(),
        impure_env_allow: Vec::new(),
        limits: Default::default(),
        cores: 1,
        timeouts: Timeouts::default(),
    };

    let mut sink = std::io::sink();
    let dirs = HostDirs::create(tmp.path(), lease.user())?;
    let spec = spec_for(&dirs);
    let core = time(n, || {
        let p = plan::plan(&spec).expect("plan");
        assert_eq!(
            exec::run(&p, &mut sink).expect("run"),
            BuildOutcome::Exited(0)
        );
    });
    let full = time(n, || {
        let d = HostDirs::create(tmp.path(), lease.user()).expect("dirs");
        let s = spec_for(&d);
        assert_eq!(
            run_build(&lease, &s, &mut sink).expect("run"),
            BuildOutcome::Exited(0)
        );
        d.remove().expect("remove");
    });
    let bwrap = time(n, || {
        let st = Command::new("bwrap")
            .args([
                "--unshare-all",
                "--ro-bind",
                "/bin/busybox",
                "/bin/busybox",
                "--proc",
                "/proc",
            ])
            .args(["--dev", "/dev", "--tmpfs", "/tmp", "/bin/busybox", "true"])
            .status()
            .expect("bwrap");
        assert!(st.success());
    });
    let bare = time(n, || {
        assert!(Command::new("/bin/busybox")
            .arg("true")
            .status()
            .expect("busybox")
            .success());
    });

    println!("sandbox setup + busybox true, {n} runs each, after 5 warm-ups:");
    let b = stats("bare busybox true (std::process)", bare);
    let c = stats("sandoff: plan + sandbox run", core);
    let f = stats("sandoff: + dirs, user kill before/after", full);
    let w = stats("bwrap --unshare-all ... true", bwrap);
    let r = |x: Duration| x.as_secs_f64() / w.as_secs_f64();
    println!(
        "ratio sandoff/bwrap (median): core {:.2}x, full {:.2}x (target <= 2x); bare exec {:.2}x",
        r(c),
        r(f),
        r(b)
    );
    dirs.remove()?;
    Ok(())
}
