//! Each build in its own cgroup, when cgroup v2 is usable: whatever the
//! build starts can be killed at once (`cgroup.kill`), and its CPU time and
//! peak memory are measured.
//!
//! # Choices
//!
//! - The cgroup2 hierarchy is found in `/proc/self/mountinfo` (fstype
//!   `cgroup2`): `/sys/fs/cgroup` on a unified machine (Debian 12),
//!   `/sys/fs/cgroup/unified` on a hybrid one (v1 controllers beside an
//!   empty v2 tree). The build's cgroup is
//!   `<mount>/<sandoff's own cgroup>/sandoff-build-uid-<uid>`, named after
//!   the build user as Nix's `nix-build-uid-<uid>`: the user's lease makes
//!   the name unique among running builds, and a leftover of a crashed
//!   build of that user is killed and removed by its next build.
//! - The child is cloned into the cgroup (`clone3` with
//!   `CLONE_INTO_CGROUP`, kernel 5.7), so no process of the build is ever
//!   outside it. Writing a pid to a `cgroup.procs` instead would move it,
//!   and any move (v1 or v2) takes the cgroup threadgroup lock for
//!   writing, whose release waits for an RCU grace period: 10-15 ms on
//!   this machine, more than the rest of a trivial build. A kernel without
//!   `clone3` runs the build outside the cgroup (a debug line).
//! - CPU time: `usage_usec` of `cpu.stat`, which cgroup v2 keeps without
//!   any controller enabled. Peak memory: `memory.peak` when the memory
//!   controller is enabled for the cgroup (kernel 5.19 and later), the
//!   whole build's; else the largest single process's peak resident size
//!   (`ru_maxrss` of the builder, which covers the descendants it reaped,
//!   as GNU time reports it), from `wait4`. A v1 memory cgroup would give
//!   the whole build's on a hybrid machine, but joining one is a move (see
//!   above). sandoff does not enable controllers: whether the build's cgroup gets
//!   the memory controller is up to how sandoff's own cgroup is delegated
//!   (systemd `Delegate=yes`).
//! - Killing: `cgroup.kill` (kernel 5.14); without it, `SIGKILL` to each
//!   pid of `cgroup.procs` until it is empty. The cgroup is killed when the
//!   builder has exited, whatever the outcome, and again when it is
//!   dropped (a panic, a cancelled build), then removed.
//! - No usable cgroup2 (not mounted, not writable, a container without
//!   delegation): the build runs as before, with one debug line; a cgroup
//!   is never a reason for a build to fail. The PID namespace still kills
//!   everything on a time limit (its init dies), and the build user's
//!   processes are killed after each build.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`BuildCgroup`] waits, after killing, for the cgroup to empty
/// before it gives up removing it (the next build of the user removes it).
const EMPTY_WAIT: Duration = Duration::from_secs(10);

/// What went wrong with a build's cgroup (logged, never a build failure).
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct CgroupError {
    /// What was being done.
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

fn cg_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What one build used, as far as it could be measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// User and system CPU time of every process of the build.
    pub cpu: Option<Duration>,
    /// The most memory the build's processes used at once, in bytes.
    pub peak_memory: Option<u64>,
}

/// A mounted cgroup hierarchy: which of its cgroups is mounted (`root`,
/// `/` unless a container mounted only its own part) and where.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mounted {
    root: PathBuf,
    point: PathBuf,
}

impl Mounted {
    /// Where the cgroup `path` (as `/proc/self/cgroup` names it) is, if it
    /// is inside the mounted part.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rest = Path::new(path).strip_prefix(&self.root).ok()?;
        Some(self.point.join(rest))
    }
}

/// The first mount of `/proc/self/mountinfo` whose filesystem type and
/// super options `want` accepts.
fn find_mount(mountinfo: &str, want: impl Fn(&str, &str) -> bool) -> Option<Mounted> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let options = post.nth(1).unwrap_or("");
        if !want(fstype, options) {
            return None;
        }
        let mut pre = pre.split_whitespace();
        Some(Mounted {
            root: unescape(pre.nth(3)?)?,
            point: unescape(pre.next()?)?,
        })
    })
}

fn find_cgroup2(mountinfo: &str) -> Option<Mounted> {
    find_mount(mountinfo, |fstype, _| fstype == "cgroup2")
}

fn find_v1(mountinfo: &str, controller: &str) -> Option<Mounted> {
    find_mount(mountinfo, |fstype, options| {
        fstype == "cgroup" && options.split(',').any(|o| o == controller)
    })
}

/// The mount point of the cgroup2 hierarchy in a `/proc/self/mountinfo`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    find_cgroup2(mountinfo).map(|m| m.point)
}

/// The mount point of the cgroup v1 hierarchy holding `controller`.
pub fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    find_v1(mountinfo, controller).map(|m| m.point)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let s = std::str::from_utf8(&b[i + 1..i + 4]).ok()?;
            out.push(u8::from_str_radix(s, 8).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// This process's cgroup in the v2 hierarchy (`0::<path>`), or in the v1
/// hierarchy of `controller`, from `/proc/self/cgroup`.
pub fn own_cgroup(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_owned())
    })
}

/// `usage_usec` of a `cpu.stat`.
pub fn cpu_usage(cpu_stat: &str) -> Option<Duration> {
    cpu_stat.lines().find_map(|l| {
        let usec = l.strip_prefix("usage_usec ")?.trim().parse().ok()?;
        Some(Duration::from_micros(usec))
    })
}

/// One build's cgroup (and its v1 memory companion on a hybrid machine);
/// killed and removed when dropped.
#[derive(Debug)]
pub struct BuildCgroup {
    /// The v2 cgroup's directory.
    dir: PathBuf,
}

impl BuildCgroup {
    /// A fresh cgroup for a build as `uid`, or `None` (logged at debug
    /// level) when cgroup v2 cannot be used here.
    pub fn create(uid: u32) -> Option<BuildCgroup> {
        match Self::try_create(uid) {
            Ok(Some(cg)) => Some(cg),
            Ok(None) => {
                tracing::debug!("no cgroup2 hierarchy: building without a cgroup");
                None
            }
            Err(e) => {
                tracing::debug!("building without a cgroup: {e}");
                None
            }
        }
    }

    fn try_create(uid: u32) -> Result<Option<BuildCgroup>, CgroupError> {
        // Where sandoff's own cgroup is does not change while it runs:
        // found once (reading mountinfo took a tenth of a millisecond).
        static PARENT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
        let parent = match PARENT.get() {
            Some(p) => p.clone(),
            None => {
                let read = |p: &str| fs::read_to_string(p).map_err(cg_err("read", Path::new(p)));
                let mountinfo = read("/proc/self/mountinfo")?;
                let own = read("/proc/self/cgroup")?;
                let found =
                    find_cgroup2(&mountinfo).and_then(|m| m.dir_of(&own_cgroup(&own, None)?));
                PARENT.get_or_init(|| found).clone()
            }
        };
        let Some(parent) = parent else {
            return Ok(None);
        };
        let name = format!("sandoff-build-uid-{uid}");
        let dir = parent.join(&name);
        fresh_dir(&dir)?;
        tracing::debug!(cgroup = %dir.display(), "build cgroup created");
        Ok(Some(BuildCgroup { dir }))
    }

    /// The v2 cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in the cgroup.
    pub fn kill(&self) {
        if let Err(e) = kill(&self.dir) {
            tracing::warn!("cannot kill the build's cgroup: {e}");
        }
    }

    /// What the build used so far.
    pub fn usage(&self) -> ResourceUsage {
        let cpu = fs::read_to_string(self.dir.join("cpu.stat"))
            .ok()
            .and_then(|s| cpu_usage(&s));
        let number = |p: PathBuf| fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        let peak_memory = number(self.dir.join("memory.peak"));
        ResourceUsage { cpu, peak_memory }
    }
}

impl BuildCgroup {
    /// Kills what is left, reads what the build used, and removes the
    /// cgroup; the flag is `true` when it is gone, so that no process of
    /// the build is left anywhere.
    pub fn close(mut self) -> (ResourceUsage, bool) {
        self.kill();
        let usage = self.usage();
        let dir = std::mem::take(&mut self.dir);
        let gone = match remove(&dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e} (the next build of this user removes it)");
                false
            }
        };
        (usage, gone)
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return; // closed
        }
        self.kill();
        if let Err(e) = remove(&self.dir) {
            tracing::warn!("{e} (the next build of this user removes it)");
        }
    }
}

/// Creates `dir`, first killing and removing a leftover of a dead build.
fn fresh_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            tracing::info!(cgroup = %dir.display(), "removing the cgroup of a dead build");
            remove(dir)?;
            fs::create_dir(dir).map_err(cg_err("create", dir))
        }
        Err(e) => Err(cg_err("create", dir)(e)),
    }
}

/// Kills the processes of the cgroup at `dir`: `cgroup.kill`, else each
/// pid of `cgroup.procs` (v1, or v2 before 5.14).
fn kill(dir: &Path) -> Result<(), CgroupError> {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        return fs::write(&kill_file, "1").map_err(cg_err("write", &kill_file));
    }
    let procs = dir.join("cgroup.procs");
    let pids = fs::read_to_string(&procs).map_err(cg_err("read", &procs))?;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(())
}

/// Kills what is left in the cgroup at `dir`, waits for it to be empty,
/// and removes it.
fn remove(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY: processes (dying ones, too) are still in it.
            Err(e) if start.elapsed() < EMPTY_WAIT => {
                tracing::trace!(cgroup = %dir.display(), "not empty yet: {e}");
                let _ = kill(dir);
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(cg_err("remove", dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kind: v1 controllers and an empty cgroup2 tree.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// Debian 12.
    const UNIFIED: &str = "\
22 1 0:21 / / rw - ext4 /dev/sda1 rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_machines() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"),
            None
        );
        assert_eq!(
            v1_mount(HYBRID, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1_mount(UNIFIED, "memory"), None);
        assert_eq!(v1_mount(HYBRID, "mem"), None, "whole option names only");
    }

    #[test]
    fn own_cgroups_are_found_under_the_mounted_part_only() {
        let own = "0::/docker/abc/inner\n";
        let path = own_cgroup(own, None).expect("v2 line");
        let whole = find_cgroup2(UNIFIED).expect("mounted");
        assert_eq!(
            whole.dir_of(&path),
            Some(PathBuf::from("/sys/fs/cgroup/docker/abc/inner"))
        );
        // A container that mounts only its own part of the tree.
        let part = find_cgroup2("30 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
            .expect("mounted");
        assert_eq!(
            part.dir_of(&path),
            Some(PathBuf::from("/sys/fs/cgroup/inner"))
        );
        assert_eq!(part.dir_of("/elsewhere"), None, "not reachable");
        let v1 = find_v1(HYBRID, "memory").expect("mounted");
        assert_eq!(
            v1.dir_of("/process_api/69"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/69"))
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        let line = "41 31 0:38 / /a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(line), Some(PathBuf::from("/a b")));
    }

    #[test]
    fn reads_own_cgroups_and_cpu_usage() {
        let own = "4:memory:/process_api/69\n1:cpu:/\n0::/system.slice/x.service\n";
        assert_eq!(
            own_cgroup(own, None).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(
            own_cgroup(own, Some("memory")).as_deref(),
            Some("/process_api/69")
        );
        assert_eq!(own_cgroup("1:cpu:/\n", None), None);
        let stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(cpu_usage(stat), Some(Duration::from_micros(1500)));
        assert_eq!(cpu_usage("user_usec 3\n"), None);
    }
}
