//! The build coordinator end to end: a `sandoff coordinator` process,
//! `sandoff agent` processes (each with its own store root, sharing the
//! `sandoffbld` build users), and clients (`sandoff coordinator submit`,
//! `builds`, `agents`, `tokens`), all on loopback; Nix 2.8 as a consumer of
//! the cache.
//!
//! Needs root, busybox and namespaces (agents build in the sandbox); the
//! Nix part needs `nix-store`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::build::{text, Spec, Store};
use crate::support::{self, Need};
use crate::this_test;

/// A coordinator, its agents and their files, under one temporary
/// directory; every process is killed (by pid) when dropped.
pub(crate) struct Farm {
    pub(crate) tmp: tempfile::TempDir,
    agent_port: u16,
    client_port: u16,
    lease_secs: u32,
    coordinator: Option<Child>,
    pub(crate) key: String,
    agents: Vec<(String, Child)>,
    /// Token files by role.
    pub(crate) admin: PathBuf,
    pub(crate) submitter: PathBuf,
    pub(crate) reader: PathBuf,
    /// More arguments for the coordinator, used from its next start on.
    pub(crate) extra_args: Vec<String>,
    /// A PostgreSQL database as the datastore (else a SQLite file); dropped
    /// after the processes are killed.
    database: Option<crate::coordinator_datastore::Db>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Farm {
    /// Starts a coordinator whose leases last `lease_secs`.
    pub(crate) fn start(lease_secs: u32) -> Farm {
        Farm::start_with(lease_secs, &[])
    }

    /// Starts a coordinator with more arguments (hooks, metrics).
    pub(crate) fn start_with(lease_secs: u32, extra_args: &[String]) -> Farm {
        Farm::start_on(lease_secs, extra_args, None)
    }

    /// Starts a coordinator on `database` (else a SQLite file).
    pub(crate) fn start_on(
        lease_secs: u32,
        extra_args: &[String],
        database: Option<crate::coordinator_datastore::Db>,
    ) -> Farm {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut farm = Farm {
            admin: tmp.path().join("admin.token"),
            submitter: tmp.path().join("submit.token"),
            reader: tmp.path().join("read.token"),
            tmp,
            agent_port: free_port(),
            client_port: free_port(),
            lease_secs,
            coordinator: None,
            key: String::new(),
            agents: Vec::new(),
            extra_args: extra_args.to_vec(),
            database,
        };
        for (role, file) in [
            ("admin", &farm.admin),
            ("submit", &farm.submitter),
            ("read", &farm.reader),
        ] {
            let out = support::run_ok(support::sandoff().args([
                "coordinator",
                "tokens",
                "new",
                "--role",
                role,
                "--datastore",
                &farm.datastore(),
            ]));
            std::fs::write(file, out).expect("write token");
        }
        farm.start_coordinator();
        farm
    }

    fn datastore(&self) -> String {
        match &self.database {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}/coordinator.db", self.tmp.path().display()),
        }
    }

    pub(crate) fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub(crate) fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.agent_port)
    }

    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    /// (Re)starts the coordinator on the farm's ports and waits until it
    /// listens.
    pub(crate) fn start_coordinator(&mut self) {
        assert!(self.coordinator.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("coordinator.log"))
            .expect("log");
        let mut child = support::sandoff()
            .args(["coordinator", "--datastore", &self.datastore()])
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{}", self.agent_port))
            .arg("--client-listen")
            .arg(format!("127.0.0.1:{}", self.client_port))
            .arg("--cache-dir")
            .arg(self.cache_dir())
            .arg("--secret-key-file")
            .arg(self.tmp.path().join("coordinator.sec"))
            .args(["--lease-seconds", &self.lease_secs.to_string()])
            .args(["--retry-base-seconds", "1"])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn coordinator");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        for _ in 0..3 {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("coordinator stopped: {}", self.log("coordinator")))
                .expect("read");
            if let Some(k) = line.strip_prefix("cache key: ") {
                self.key = k.to_owned();
            }
        }
        // Keeps the pipe drained.
        std::thread::spawn(move || lines.for_each(drop));
        self.coordinator = Some(child);
    }

    /// kill -9 the coordinator.
    pub(crate) fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// A process's log, for failure messages.
    pub(crate) fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.tmp.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `sandoff coordinator ARGS… --url … --token-file TOKEN`.
    pub(crate) fn client(&self, token: &Path, args: &[&str]) -> Command {
        let mut c = support::sandoff();
        c.arg("coordinator")
            .args(args)
            .arg("--url")
            .arg(self.client_url())
            .arg("--token-file")
            .arg(token);
        c
    }

    /// Creates agent `name` and starts it with `slots` build slots.
    pub(crate) fn add_agent(&mut self, name: &str, slots: u32) {
        let out = support::run_ok(&mut self.client(&self.admin.clone(), &["agents", "new", name]));
        let token = self.tmp.path().join(format!("{name}.token"));
        std::fs::write(&token, out).expect("write token");
        self.start_agent(name, slots);
    }

    /// Starts (again) an existing agent.
    pub(crate) fn start_agent(&mut self, name: &str, slots: u32) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(format!("{name}.log")))
            .expect("log");
        let child = support::sandoff()
            .arg("--store-root")
            .arg(self.tmp.path().join("agents").join(name))
            .env_remove("SANDOFF_USER_POOL_DIR")
            .env_remove("SANDOFF_STORE_DIR")
            .env_remove("SANDOFF_STATE_DIR")
            .args(["agent", "--coordinator", &self.agent_url()])
            .arg("--token-file")
            .arg(self.tmp.path().join(format!("{name}.token")))
            .args(["--max-parallel-builds", &slots.to_string()])
            .args(["--poll-seconds", "0.2", "--system", "x86_64-linux"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agents.push((name.to_owned(), child));
    }

    /// kill -9 agent `name`.
    pub(crate) fn kill_agent(&mut self, name: &str) {
        if let Some(i) = self.agents.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.agents.remove(i);
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Every build, as `builds list --json` shows them.
    pub(crate) fn builds(&self) -> Vec<Value> {
        let out = support::run_ok(&mut self.client(
            &self.reader,
            &["builds", "list", "--json", "--limit", "100000"],
        ));
        let v: Value = serde_json::from_slice(&out).expect("json");
        v["builds"].as_array().expect("builds").clone()
    }

    /// Waits until no build is active; returns them all.
    pub(crate) fn wait_idle(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let builds = self.builds();
            let active = builds
                .iter()
                .filter(|b| matches!(b["state"].as_str(), Some("queued" | "allocated")))
                .count();
            if active == 0 {
                return builds;
            }
            assert!(
                Instant::now() < deadline,
                "{active} builds still active\ncoordinator:\n{}",
                self.log("coordinator")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Submits `drvs` from `store`; returns the JSON answer.
    pub(crate) fn submit(&self, store: &Store, drvs: &[&str], extra: &[&str]) -> Value {
        let mut c = store.cmd();
        c.args(["coordinator", "submit", "--json"])
            .args(extra)
            .arg("--url")
            .arg(self.client_url())
            .arg("--token-file")
            .arg(&self.submitter)
            .args(drvs);
        let out = support::run_ok(&mut c);
        serde_json::from_slice(&out).expect("json")
    }

    /// A raw HTTP request to `url` with an optional bearer token: the status.
    pub(crate) fn status(method: &str, url: &str, token: Option<&str>) -> u16 {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut req = agent.request(method, url);
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = if matches!(method, "POST" | "PUT") {
            req.set("Content-Type", "application/json")
                .send_string("{}")
        } else {
            req.call()
        };
        match res {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{method} {url}: {e}"),
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let names: Vec<String> = self.agents.iter().map(|(n, _)| n.clone()).collect();
        for n in names {
            self.kill_agent(&n);
        }
        self.kill_coordinator();
        if std::thread::panicking() {
            eprintln!("--- coordinator log ---\n{}", self.log("coordinator"));
            for n in ["a1", "a2", "a3"] {
                eprintln!("--- {n} log ---\n{}", self.log(n));
            }
        }
    }
}

/// Root, busybox, namespaces and build users (agents build).
fn ready(test: &str) -> bool {
    crate::build::ready(test)
}

/// A layered graph of `layers` x `width` derivations in `store`: each one
/// reads the outputs of two of the layer below (so a build that ran before
/// its dependencies fails). Returns the `.drv` paths, layer by layer.
fn graph(store: &Store, tag: &str, layers: usize, width: usize, sleep: &str) -> Vec<Vec<String>> {
    let mut all: Vec<Vec<String>> = Vec::new();
    for l in 0..layers {
        let mut layer = Vec::new();
        for i in 0..width {
            let deps: Vec<String> = match all.last() {
                Some(below) => vec![below[i].clone(), below[(i + 1) % width].clone()],
                None => Vec::new(),
            };
            let mut script = format!("sleep {sleep}\necho {tag}-{l}-{i} > $out\n");
            for d in &deps {
                let out = store.dir.display(&store.out(d));
                script.push_str(&format!("cat {out} >> $out\n"));
            }
            let inputs: Vec<(&str, &str)> = deps.iter().map(|d| (d.as_str(), "out")).collect();
            layer.push(store.drv(
                &format!("{tag}-{l}-{i}"),
                Spec {
                    script: &script,
                    inputs: &inputs,
                    ..Spec::default()
                },
            ));
        }
        all.push(layer);
    }
    all
}

fn by_drv(builds: &[Value]) -> BTreeMap<String, Value> {
    builds
        .iter()
        .map(|b| (b["drv"].as_str().expect("drv").to_owned(), b.clone()))
        .collect()
}

#[test]
fn fifty_derivations_build_over_three_agents_in_order_and_nix_substitutes_the_results() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    let layers = graph(&store, "g", 5, 10, "0");
    let tops: Vec<&str> = layers[4].iter().map(String::as_str).collect();
    let mut farm = Farm::start(30);
    // Submitted before any agent exists: the builds wait, saying why.
    let low: Vec<&str> = tops[..5].to_vec();
    let answer = farm.submit(&store, &low, &["--priority", "1"]);
    let high = farm.submit(
        &store,
        &tops[5..],
        &["--priority", "50", "--tag", "job=high"],
    );
    assert_eq!(answer["builds"].as_array().expect("builds").len(), 5);
    let builds = by_drv(&farm.builds());
    assert_eq!(builds.len(), 50, "dependencies get builds of their own");
    // A dependency of a priority-50 build inherits 50; the bottom layer's
    // critical path is the graph's depth.
    let shared = &builds[&layers[3][5]];
    assert_eq!(shared["effective_priority"], 50, "{shared}");
    assert_eq!(builds[&layers[0][5]]["critical_path"], 5);
    assert_eq!(builds[&layers[0][5]]["waiting_on"], 0);
    assert_eq!(builds[&layers[1][5]]["waiting_on"], 2);
    let id = high["builds"][0]["id"].to_string();
    let show = text(&support::run_ok(
        &mut farm.client(&farm.reader, &["builds", "show", &id]),
    ));
    assert!(
        show.contains("cannot start: no enabled agent builds x86_64-linux"),
        "{show}"
    );

    for a in ["a1", "a2", "a3"] {
        farm.add_agent(a, 2);
    }
    let done = farm.wait_idle();
    let failed: Vec<&Value> = done.iter().filter(|b| b["state"] != "succeeded").collect();
    assert!(failed.is_empty(), "{failed:?}");
    let agents: BTreeSet<&str> = done.iter().filter_map(|b| b["agent"].as_str()).collect();
    assert!(agents.len() >= 2, "work is spread: {agents:?}");
    // Dependency order: every build started after its dependencies ended.
    let done = by_drv(&done);
    for (l, layer) in layers.iter().enumerate().skip(1) {
        for (i, d) in layer.iter().enumerate() {
            for dep in [&layers[l - 1][i], &layers[l - 1][(i + 1) % 10]] {
                assert!(done[d]["started_at"].as_i64() >= done[dep]["finished_at"].as_i64());
            }
        }
    }

    // Nix 2.8 substitutes a result from the cache over HTTP, with the
    // coordinator's key and a read token in its netrc file.
    if !support::require_programs(test, &["nix-store"]) {
        return;
    }
    let top = store.out(tops[9]);
    let full = store.dir.display(&top);
    let nix = farm.tmp.path().join("nix");
    let netrc = farm.tmp.path().join("netrc");
    let token = std::fs::read_to_string(&farm.reader).expect("token");
    std::fs::write(
        &netrc,
        format!("machine 127.0.0.1 login nix password {}\n", token.trim()),
    )
    .expect("netrc");
    let nix_store = |args: &[&str]| {
        let mut c = support::nix_cmd("nix-store", &nix.join("conf"));
        c.arg("--store")
            .arg(nix.join("root"))
            .args(["--option", "substituters"])
            .arg(format!("{}/cache", farm.client_url()))
            .args(["--option", "trusted-public-keys", &farm.key])
            .args(["--option", "netrc-file"])
            .arg(&netrc)
            .args(["--option", "require-sigs", "true"])
            .args(args);
        c
    };
    support::run_ok(&mut nix_store(&["--realise", &full]));
    support::run_ok(&mut nix_store(&["--verify-path", &full]));
    let got = std::fs::read_to_string(nix.join("root").join(full.trim_start_matches('/')))
        .expect("output");
    assert!(got.starts_with("g-4-9\n"), "{got}");
    // Without the token, the cache is closed.
    let url = format!("{}/cache/nix-cache-info", farm.client_url());
    assert_eq!(Farm::status("GET", &url, None), 401);
}

#[test]
fn an_agent_killed_mid_build_loses_nothing_and_the_build_completes_elsewhere() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    let drv = store.script_drv("slow", "sleep 4\necho slow > $out\n");
    let mut farm = Farm::start(4);
    farm.add_agent("a1", 1);
    farm.submit(&store, &[&drv], &[]);
    support::wait_for("the build to be leased to a1", || {
        let b = farm.builds();
        (b[0]["state"] == "allocated").then_some(())
    });
    farm.kill_agent("a1");
    farm.add_agent("a2", 1);
    let done = farm.wait_idle();
    assert_eq!(done[0]["state"], "succeeded", "{:?}", done[0]);
    assert_eq!(done[0]["agent"], "a2");
    assert!(
        done[0]["attempts"].as_i64() >= Some(1),
        "the lost lease counts: {:?}",
        done[0]
    );
    // The expiry is an event (agent and builds) and a counter.
    let reader = std::fs::read_to_string(&farm.reader).expect("token");
    let events = read_events(&farm, reader.trim(), None, |got| {
        got.iter().any(|(_, k, _)| k == "agent-lost")
    });
    let lost = events
        .iter()
        .find(|(_, k, _)| k == "agent-lost")
        .map(|(_, _, d)| d)
        .expect("agent-lost");
    assert_eq!(lost["agent"], "a1", "{lost}");
    assert_eq!(lost["builds"], serde_json::json!([done[0]["id"]]), "{lost}");
    let (_, metrics) = scrape(&farm.client_url(), Some(reader.trim()));
    assert_eq!(
        metrics.get("sandoff_coordinator_lease_expiries_total"),
        Some(&1.0)
    );
    // a1 comes back: it gets nothing of what a2 finished.
    farm.start_agent("a1", 1);
    std::thread::sleep(Duration::from_secs(2));
    let again = farm.builds();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["state"], "succeeded");
    assert_eq!(again[0]["finished_at"], done[0]["finished_at"]);
}

#[test]
fn a_killed_coordinator_restarts_with_nothing_lost_and_nothing_built_twice() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    killed_coordinator_loses_nothing(Farm::start(10));
}

/// The same on PostgreSQL: the coordinator process, its restart and the
/// CLI's `tokens new` go through `--datastore postgresql://…`.
#[test]
fn a_killed_coordinator_on_postgresql_restarts_with_nothing_lost_and_nothing_built_twice() {
    use crate::coordinator_datastore::{Backend, Db};
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let Some(db) = Db::new(Backend::Postgres, test) else {
        return;
    };
    killed_coordinator_loses_nothing(Farm::start_on(10, &[], Some(db)));
}

/// A graph of 12 builds submitted, the coordinator killed -9 after a first
/// success and restarted: every build completes, none is built twice.
fn killed_coordinator_loses_nothing(mut farm: Farm) {
    let store = Store::new();
    let layers = graph(&store, "r", 3, 4, "1");
    let tops: Vec<&str> = layers[2].iter().map(String::as_str).collect();
    farm.submit(&store, &tops, &[]);
    farm.add_agent("a1", 2);
    support::wait_for("a first success", || {
        farm.builds()
            .iter()
            .any(|b| b["state"] == "succeeded")
            .then_some(())
    });
    let before = by_drv(&farm.builds());
    farm.kill_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    farm.start_coordinator();
    let after = by_drv(&farm.wait_idle());
    assert_eq!(after.len(), 12, "no submitted build lost");
    for (drv, b) in &before {
        if b["state"] == "succeeded" {
            assert_eq!(
                after[drv]["finished_at"], b["finished_at"],
                "not built again: {drv}"
            );
        }
    }
    assert!(
        after.values().all(|b| b["state"] == "succeeded"),
        "{after:?}"
    );
}

#[test]
fn bad_tokens_are_refused_on_every_endpoint() {
    let test = this_test!();
    if !support::require(test, &[Need::Root]) {
        return;
    }
    let mut farm = Farm::start(30);
    let expiring = text(&support::run_ok(&mut farm.client(
        &farm.admin.clone(),
        &["tokens", "new", "--role", "admin", "--expires-in", "1"],
    )));
    let agent_token = text(&support::run_ok(
        &mut farm.client(&farm.admin.clone(), &["agents", "new", "x"]),
    ));
    std::thread::sleep(Duration::from_millis(2100));
    let client = [
        ("GET", "/client/v1/info"),
        ("POST", "/client/v1/missing"),
        (
            "HEAD",
            "/client/v1/uploads/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz",
        ),
        (
            "PUT",
            "/client/v1/uploads/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz",
        ),
        (
            "POST",
            "/client/v1/uploads/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz/finish",
        ),
        ("POST", "/client/v1/builds"),
        ("GET", "/client/v1/builds"),
        ("GET", "/client/v1/builds/1"),
        ("GET", "/client/v1/builds/1/log"),
        ("POST", "/client/v1/ui-login-codes"),
        ("POST", "/client/v1/builds/1/cancel"),
        ("POST", "/client/v1/builds/1/priority"),
        ("GET", "/client/v1/agents"),
        ("POST", "/client/v1/agents"),
        ("POST", "/client/v1/agents/x/token"),
        ("POST", "/client/v1/agents/x/disable"),
        ("POST", "/client/v1/agents/x/enable"),
        ("GET", "/client/v1/tokens"),
        ("POST", "/client/v1/tokens"),
        ("POST", "/client/v1/tokens/abc/revoke"),
        ("GET", "/client/v1/events"),
        ("GET", "/metrics"),
        ("GET", "/cache/nix-cache-info"),
        ("GET", "/cache/5xd714cbfnkz02h2vbsj4fm03x3f15nf.narinfo"),
        (
            "GET",
            "/cache/nar/1111111111111111111111111111111111111111111111111111.nar.zst",
        ),
        ("GET", "/cache/log/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz.drv"),
    ];
    let agent = [
        ("GET", "/agent/v1/info"),
        ("POST", "/agent/v1/allocate"),
        ("GET", "/agent/v1/leases"),
        ("POST", "/agent/v1/heartbeat"),
        ("POST", "/agent/v1/builds/1/start"),
        ("GET", "/agent/v1/builds/1/drv"),
        ("HEAD", "/agent/v1/builds/1/outputs/out"),
        ("PUT", "/agent/v1/builds/1/outputs/out"),
        ("PUT", "/agent/v1/builds/1/log"),
        ("POST", "/agent/v1/builds/1/log"),
        ("POST", "/agent/v1/builds/1/result"),
        ("GET", "/metrics"),
        ("GET", "/cache/nix-cache-info"),
    ];
    let wrong = "sandoff_0000000000000000000000000000000000000000000000000000000000000000";
    for (base, routes) in [
        (farm.client_url(), &client[..]),
        (farm.agent_url(), &agent[..]),
    ] {
        for (method, path) in routes {
            let url = format!("{base}{path}");
            for (what, token) in [
                ("no", None),
                ("a wrong", Some(wrong)),
                ("an expired", Some(expiring.trim())),
            ] {
                assert_eq!(
                    Farm::status(method, &url, token),
                    401,
                    "{method} {path} with {what} token"
                );
            }
        }
    }
    // Roles and kinds: a read token cannot submit, an agent token is not a
    // client's, a client token is not an agent's.
    let read = std::fs::read_to_string(&farm.reader).expect("token");
    let submit = format!("{}/client/v1/builds", farm.client_url());
    assert_eq!(Farm::status("POST", &submit, Some(read.trim())), 403);
    assert_eq!(Farm::status("GET", &submit, Some(agent_token.trim())), 403);
    let alloc = format!("{}/agent/v1/leases", farm.agent_url());
    assert_eq!(Farm::status("GET", &alloc, Some(read.trim())), 403);
    assert_eq!(Farm::status("GET", &alloc, Some(agent_token.trim())), 200);
    // A disabled agent's token is refused.
    support::run_ok(&mut farm.client(&farm.admin.clone(), &["agents", "disable", "x"]));
    assert_eq!(Farm::status("GET", &alloc, Some(agent_token.trim())), 401);
    farm.kill_coordinator();
}

/// Sends the first `n` bytes of `body` as a `PUT` that claims the whole
/// length, then closes the connection: an upload cut in the middle.
fn cut_upload(host: &str, path: &str, token: &str, body: &[u8], n: usize) {
    let mut s = TcpStream::connect(host).expect("connect");
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("write");
    s.write_all(&body[..n]).expect("write body");
    s.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
}

#[test]
fn an_upload_cut_in_the_middle_resumes_and_a_tampered_nar_is_refused() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    // A source of a few MiB of incompressible bytes.
    let src = store.tmp.path().join("blob");
    let mut bytes = vec![0u8; 4 << 20];
    let mut x: u64 = 88172645463325252;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&src, &bytes).expect("write");
    let added = text(&support::run_ok(
        store.cmd().args(["store", "add"]).arg(&src),
    ));
    let path = store.path(added.trim());
    let farm = Farm::start(30);
    let token = std::fs::read_to_string(&farm.submitter).expect("token");
    // The compressed NAR, as `submit` sends it.
    let mut nar = Vec::new();
    sandoff::store::nar::dump(&store.loc().real_path(&path), &mut nar).expect("nar");
    let zst = zstd::encode_all(nar.as_slice(), 1).expect("zstd");
    let upload = format!("/client/v1/uploads/{}", path.base_name());
    let host = format!("127.0.0.1:{}", farm.client_port);
    cut_upload(&host, &upload, token.trim(), &zst, zst.len() / 2);
    let client = sandoff::coordinator::client::Client::new(&farm.client_url(), token.trim(), None)
        .expect("client");
    let held = client.upload_offset(&upload).expect("offset");
    assert!(
        held > 0 && held < zst.len() as u64,
        "the first half is kept: {held}"
    );
    let spool = farm.tmp.path().join("blob.nar.zst");
    std::fs::write(&spool, &zst).expect("write");
    let sent = client.upload(&upload, &spool).expect("resume");
    assert_eq!(sent, zst.len() as u64 - held, "only the rest is sent");
    // A false claim (another NAR hash) is refused and nothing enters.
    let info = store.info(&path).expect("valid");
    let claim = |hash: &str| serde_json::json!({"kind": "source", "references": [], "nar_hash": hash, "nar_size": info.nar_size});
    let lie = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    let err = client
        .post_only(&format!("{upload}/finish"), Some(&claim(lie)))
        .expect_err("a false NAR hash is refused");
    assert_eq!(err.status(), Some(422), "{err}");
    let missing: sandoff::coordinator::api::Paths = client
        .post(
            "/client/v1/missing",
            &sandoff::coordinator::api::Paths {
                paths: vec![added.trim().to_owned()],
            },
        )
        .expect("missing");
    assert_eq!(missing.paths.len(), 1, "nothing entered the cache");
    // Tampered bytes (one flipped in the middle of the file's contents)
    // under the true claim: refused too.
    let mut bad = nar.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let bad_zst = zstd::encode_all(bad.as_slice(), 1).expect("zstd");
    std::fs::write(&spool, &bad_zst).expect("write");
    client.upload(&upload, &spool).expect("upload");
    let err = client
        .post_only(
            &format!("{upload}/finish"),
            Some(&claim(&info.nar_hash.to_nix32_prefixed())),
        )
        .expect_err("a tampered NAR is refused");
    assert_eq!(err.status(), Some(422), "{err}");
    // The true bytes under the true claim enter.
    std::fs::write(&spool, &zst).expect("write");
    client.upload(&upload, &spool).expect("upload");
    client
        .post_only(
            &format!("{upload}/finish"),
            Some(&claim(&info.nar_hash.to_nix32_prefixed())),
        )
        .expect("accepted");
    let missing: sandoff::coordinator::api::Paths = client
        .post(
            "/client/v1/missing",
            &sandoff::coordinator::api::Paths {
                paths: vec![added.trim().to_owned()],
            },
        )
        .expect("missing");
    assert!(missing.paths.is_empty());
}

#[test]
fn with_a_certificate_both_apis_speak_tls_and_clients_check_it() {
    let test = this_test!();
    if !support::require(
        test,
        &[Need::Root, Need::Program("openssl"), Need::Program("curl")],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    support::run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    let db = format!("sqlite://{}/db", tmp.path().display());
    let token = text(&support::run_ok(support::sandoff().args([
        "coordinator",
        "tokens",
        "new",
        "--role",
        "read",
        "--datastore",
        &db,
    ])));
    let mut child = support::sandoff()
        .args([
            "coordinator",
            "--datastore",
            &db,
            "--agent-listen",
            "127.0.0.1:0",
            "--client-listen",
            "127.0.0.1:0",
        ])
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let agent_line = lines.next().expect("line").expect("read");
    let client_line = lines.next().expect("line").expect("read");
    let url = client_line
        .strip_prefix("client API: ")
        .expect("client API line")
        .to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert!(
        agent_line.starts_with("agent API: https://"),
        "{agent_line}"
    );
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &token).expect("write");
    let list = |ca: Option<&Path>| {
        let mut c = support::sandoff();
        c.args(["coordinator", "agents", "list", "--json", "--url", &url])
            .arg("--token-file")
            .arg(&token_file);
        if let Some(ca) = ca {
            c.arg("--ca-cert").arg(ca);
        }
        c.output().expect("run")
    };
    let trusted = list(Some(&cert));
    assert!(trusted.status.success(), "{}", text(&trusted.stderr));
    assert_eq!(text(&trusted.stdout).trim(), r#"{"agents":[]}"#);
    // Without the CA, the self-signed certificate is refused.
    let untrusted = list(None);
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted.stderr).contains("certificate"),
        "{}",
        text(&untrusted.stderr)
    );
    // Over TLS, the web page's session cookie is `Secure`.
    let headers = support::run_ok(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-D", "-", "--cacert"])
            .arg(&cert)
            .args(["--data-urlencode", &format!("token={}", token.trim())])
            .arg(format!("{url}/login")),
    );
    let set_cookie = text(&headers)
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {}", text(&headers)))
        .to_owned();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    // Plain HTTP to the TLS port gets nothing.
    let plain = url.replace("https://", "http://");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    assert!(agent
        .get(&format!("{plain}/client/v1/info"))
        .call()
        .is_err());
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
}

#[test]
fn a_restarted_agent_resumes_the_builds_still_leased_to_it() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    let drv = store.script_drv("resumed", "sleep 3\necho resumed > $out\n");
    let mut farm = Farm::start(60);
    farm.add_agent("a1", 1);
    farm.submit(&store, &[&drv], &[]);
    support::wait_for("the build to start on a1", || {
        let b = farm.builds();
        b[0]["started_at"].is_i64().then_some(())
    });
    // Killed and back well within its lease: the build is still a1's, so
    // a1 takes it up again; no lease expired, nothing counts as a failure.
    farm.kill_agent("a1");
    farm.start_agent("a1", 1);
    let done = farm.wait_idle();
    assert_eq!(done[0]["state"], "succeeded", "{:?}", done[0]);
    assert_eq!(done[0]["agent"], "a1");
    assert_eq!(done[0]["attempts"], 0, "{:?}", done[0]);
    let log = text(&support::run_ok(
        &mut farm.client(&farm.reader, &["builds", "log", &done[0]["id"].to_string()]),
    ));
    assert!(log.is_empty() || !log.contains("error"), "{log}");
    assert!(
        farm.log("a1")
            .contains("resuming builds still leased to this agent"),
        "{}",
        farm.log("a1")
    );
}

#[test]
fn builds_are_reprioritised_canceled_and_explained_from_the_cli() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    let layers = graph(&store, "c", 3, 2, "0");
    let farm = Farm::start(30);
    let first = farm.submit(&store, &[&layers[1][0]], &[]);
    let uploaded = first["uploaded"]["paths"].as_i64().expect("paths");
    // busybox, the two bottom .drv files and the middle one.
    assert_eq!(uploaded, 4, "{first}");
    // Only what the coordinator lacks is sent the second time.
    let second = farm.submit(&store, &[&layers[2][0]], &["--tag", "job=x"]);
    assert_eq!(second["uploaded"]["paths"], 2, "{second}");
    let id_of = |drv: &str| -> String {
        let b = by_drv(&farm.builds());
        b[drv]["id"].to_string()
    };
    let top = id_of(&layers[2][0]);
    let bottom = id_of(&layers[0][0]);
    let json = |args: &[&str]| -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_slice(&support::run_ok(&mut farm.client(&farm.submitter, &a)))
            .expect("json")
    };
    let raised = json(&["builds", "set-priority", &top, "70"]);
    assert_eq!(raised["priority"], 70);
    assert_eq!(json(&["builds", "show", &bottom])["effective_priority"], 70);
    let lowered = json(&["builds", "set-priority", &top, "-5"]);
    assert_eq!(lowered["effective_priority"], -5);
    assert_eq!(json(&["builds", "show", &bottom])["effective_priority"], 0);
    let tagged = json(&["builds", "list", "--tag", "job=x"]);
    // The new builds carry the tag: c-2-0 and c-1-1 (the rest were active).
    assert_eq!(
        tagged["builds"].as_array().expect("builds").len(),
        2,
        "{tagged}"
    );
    // Canceling a dependency cancels what needs it, and nothing else.
    let canceled = json(&["builds", "cancel", &id_of(&layers[0][1])]);
    let canceled: BTreeSet<i64> = canceled["canceled"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(
        canceled.len(),
        4,
        "c-0-1, both of layer 1, c-2-0: {canceled:?}"
    );
    assert_eq!(json(&["builds", "show", &bottom])["state"], "queued");
    // Bad input is one clear line and changes nothing.
    let unknown = farm
        .client(&farm.reader, &["builds", "show", "999"])
        .output()
        .expect("run");
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no build 999"),
        "{}",
        text(&unknown.stderr)
    );
    let bad = farm
        .client(&farm.reader, &["builds", "show", "abc"])
        .output()
        .expect("run");
    assert!(
        text(&bad.stderr).contains("is not a build id"),
        "{}",
        text(&bad.stderr)
    );
    let mut c = store.cmd();
    c.args(["coordinator", "submit", "--url", &farm.client_url()])
        .arg("--token-file")
        .arg(&farm.submitter)
        .arg(&store.bb);
    let not_drv = c.output().expect("run");
    assert!(
        text(&not_drv.stderr).contains("is not a derivation"),
        "{}",
        text(&not_drv.stderr)
    );
    // A revoked token is refused from then on.
    let tokens: Value = serde_json::from_slice(&support::run_ok(
        &mut farm.client(&farm.admin, &["tokens", "list", "--json"]),
    ))
    .expect("json");
    let reader_hash = {
        use sha2::Digest;
        let t = std::fs::read_to_string(&farm.reader).expect("token");
        let h = sha2::Sha256::digest(t.trim().as_bytes());
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let id = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .find(|id| reader_hash.starts_with(id))
        .expect("the read token is listed")
        .to_owned();
    support::run_ok(&mut farm.client(&farm.admin, &["tokens", "revoke", &id]));
    let refused = farm
        .client(&farm.reader, &["builds", "list"])
        .output()
        .expect("run");
    assert!(
        text(&refused.stderr).contains("HTTP 401"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn ssh_machines_take_builds_from_the_queue_as_agentless_workers() {
    let test = this_test!();
    if !(ready(test) && support::require(test, crate::hosts::NEEDS)) {
        return;
    }
    // A sandoff host and a stock Nix 2.8 host, as a Nix machines file.
    let hosts = [
        crate::hosts::TestHost::start(93),
        crate::hosts::TestHost::start_nix(94),
    ];
    let store = Store::new();
    let layers = graph(&store, "w", 2, 3, "1");
    let dir = tempfile::tempdir().expect("tempdir");
    let machines = dir.path().join("machines");
    let lines: String = hosts
        .iter()
        .map(|h| format!("{}\n", h.machine_line()))
        .collect();
    std::fs::write(&machines, lines).expect("machines");
    let keys = dir.path().join("trusted");
    let sandoff_key = hosts[0].root().join("nix/var/sandoff/keys/signing-key.pub");
    let sandoff_key = std::fs::read_to_string(sandoff_key).expect("host key");
    let nix_key = hosts[1].signing_public_key();
    std::fs::write(&keys, format!("{}\n{nix_key}\n", sandoff_key.trim())).expect("keys");
    let extra: Vec<String> = vec![
        "--machines".into(),
        machines.display().to_string(),
        "--machines-trusted-keys".into(),
        keys.display().to_string(),
    ];
    let mut farm = Farm::start_with(30, &extra);
    // And an agent: one queue for both kinds.
    farm.add_agent("a1", 1);
    let tops: Vec<&str> = layers[1].iter().map(String::as_str).collect();
    farm.submit(&store, &tops, &[]);
    let done = farm.wait_idle();
    assert_eq!(done.len(), 6);
    let mut workers: Vec<String> = hosts
        .iter()
        .map(|h| sandoff::coordinator::workers::agent_name(&h.machine()))
        .collect();
    assert!(workers[0].starts_with("ssh-127.0.0.94-"), "{workers:?}");
    workers.push("a1".to_owned());
    for b in &done {
        assert_eq!(b["state"], "succeeded", "{b}");
        let agent = b["agent"].as_str().expect("agent");
        assert!(workers.iter().any(|w| w == agent), "{b}");
    }
    // Both workers are listed beside the agent; each machine holds the
    // outputs it built.
    let agents: Value = serde_json::from_slice(&support::run_ok(
        &mut farm.client(&farm.reader, &["agents", "list", "--json"]),
    ))
    .expect("json");
    let listed: BTreeSet<&str> = agents["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(
        listed,
        workers.iter().map(String::as_str).collect(),
        "{agents}"
    );
    for b in done.iter().filter(|b| b["agent"] != "a1") {
        let i = workers
            .iter()
            .position(|w| b["agent"] == w.as_str())
            .expect("worker");
        let out = store.out(b["drv"].as_str().expect("drv"));
        let on_host = hosts[i]
            .root()
            .join(store.dir.display(&out).trim_start_matches('/'));
        assert!(on_host.exists(), "{} built on {}", b["drv"], workers[i]);
    }
}
/// What the webhook receiver got: (`X-Sandoff-Event`, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A tiny webhook receiver on 127.0.0.1: every POST's `X-Sandoff-Event`
/// and body, answered 200. Its thread serves until the test process ends.
fn webhook_receiver() -> (String, Received) {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn);
            let mut kind = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "x-sandoff-event" => kind = v.trim().to_owned(),
                        "content-length" => length = v.trim().parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            if let Ok(v) = serde_json::from_slice(&body) {
                sink.lock().expect("lock").push((kind, v));
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

/// (event, build id) of JSON events.
fn event_pairs<'a>(events: impl IntoIterator<Item = &'a Value>) -> BTreeSet<(String, i64)> {
    events
        .into_iter()
        .map(|e| {
            (
                e["event"].as_str().expect("event").to_owned(),
                e["build"]["id"].as_i64().expect("build id"),
            )
        })
        .collect()
}

/// The JSON lines a hook program appended.
fn json_lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a hook got JSON"))
        .collect()
}

/// One scrape of `/metrics`: the status and the samples (name with
/// labels, value).
fn scrape(url: &str, token: Option<&str>) -> (u16, BTreeMap<String, f64>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut req = agent.get(&format!("{url}/metrics"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => {
            assert!(
                r.header("Content-Type")
                    .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
                "{:?}",
                r.header("Content-Type")
            );
            let text = r.into_string().expect("text");
            let samples = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| {
                    let (name, value) = l.rsplit_once(' ').expect("a sample line");
                    (name.to_owned(), value.parse().expect("a number"))
                })
                .collect();
            (200, samples)
        }
        Err(ureq::Error::Status(s, _)) => (s, BTreeMap::new()),
        Err(e) => panic!("/metrics: {e}"),
    }
}

/// Reads server-sent events from `/client/v1/events` until `until` says
/// stop; returns (id, event, data) of each.
fn read_events(
    farm: &Farm,
    token: &str,
    last_event_id: Option<i64>,
    mut until: impl FnMut(&[(i64, String, Value)]) -> bool,
) -> Vec<(i64, String, Value)> {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(120))
        .build();
    let mut req = agent
        .get(&format!("{}/client/v1/events?after=0", farm.client_url()))
        .set("Authorization", &format!("Bearer {token}"));
    if let Some(id) = last_event_id {
        req = req.set("Last-Event-ID", &id.to_string());
    }
    let r = req.call().expect("GET /client/v1/events");
    assert_eq!(r.content_type(), "text/event-stream");
    let mut lines = BufReader::new(r.into_reader()).lines();
    let mut out = Vec::new();
    let (mut id, mut kind, mut data) = (None, None, None);
    while !until(&out) {
        let line = lines.next().expect("the stream goes on").expect("read");
        if line.is_empty() {
            if let (Some(i), Some(k), Some(d)) = (id.take(), kind.take(), data.take()) {
                out.push((i, k, d));
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse::<i64>().expect("numeric id"));
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data = Some(serde_json::from_str::<Value>(v.trim()).expect("JSON data"));
        }
    }
    out
}

#[test]
fn hooks_the_event_stream_and_metrics_follow_builds_across_a_coordinator_kill() {
    let test = this_test!();
    if !ready(test) {
        return;
    }
    let store = Store::new();
    let good = store.drv(
        "hk-good",
        Spec {
            script: "echo good > $out\n",
            ..Spec::default()
        },
    );
    let bad = store.drv(
        "hk-bad",
        Spec {
            script: "echo failing on purpose >&2\nexit 1\n",
            ..Spec::default()
        },
    );
    // A program hook that appends its stdin, one that fails until the
    // test creates `flip`, and a webhook.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let append = d.join("append.sh");
    std::fs::write(
        &append,
        format!(
            "#!/bin/sh\n{{ cat; echo; }} >> {}/program.log\n",
            d.display()
        ),
    )
    .expect("write");
    let flaky = d.join("flaky.sh");
    std::fs::write(
        &flaky,
        format!(
            "#!/bin/sh\nd={}\nif [ -e $d/flip ]; then {{ cat; echo; }} >> $d/flaky.log; exit 0; fi\necho \"$SANDOFF_EVENT\" >> $d/flaky.tries\nexit 1\n",
            d.display()
        ),
    )
    .expect("write");
    let (webhook, received) = webhook_receiver();
    let kinds = [
        "build-submitted",
        "build-started",
        "build-success",
        "build-failure",
    ];
    let mut args = Vec::new();
    for k in kinds {
        args.push("--hook".to_owned());
        args.push(format!("{k}=/bin/sh {}", append.display()));
        args.push("--hook".to_owned());
        args.push(format!("{k}={webhook}"));
    }
    args.push("--hook".to_owned());
    args.push(format!("build-failure=/bin/sh {}", flaky.display()));
    args.extend([
        "--hook-parallelism".to_owned(),
        "build-submitted=4".to_owned(),
    ]);
    let mut farm = Farm::start_with(10, &args);
    let read_token = std::fs::read_to_string(&farm.reader).expect("token");
    let read_token = read_token.trim();

    // Metrics need a read token; before any build, the counters are 0.
    assert_eq!(scrape(&farm.client_url(), None).0, 401);
    let (status, before) = scrape(&farm.client_url(), Some(read_token));
    assert_eq!(status, 200);
    let m = |s: &BTreeMap<String, f64>, k: &str| {
        *s.get(&format!("sandoff_coordinator_{k}"))
            .unwrap_or_else(|| panic!("no {k} in {s:?}"))
    };
    assert_eq!(
        m(&before, "builds_finished_total{state=\"succeeded\"}"),
        0.0
    );
    assert_eq!(m(&before, "build_duration_seconds_count"), 0.0);
    assert_eq!(scrape(&farm.agent_url(), Some(read_token)).0, 200);

    let good_id = farm.submit(&store, &[&good], &[])["builds"][0]["id"]
        .as_i64()
        .expect("id");
    farm.add_agent("a1", 1);
    farm.wait_idle();
    let bad_id = farm.submit(&store, &[&bad], &[])["builds"][0]["id"]
        .as_i64()
        .expect("id");
    let done = farm.wait_idle();
    assert!(
        done.iter()
            .any(|b| b["id"] == bad_id && b["state"] == "failed"),
        "{done:?}"
    );

    // The flaky hook has failed at least once: kill -9, let it succeed
    // from now on, restart (metrics public from now on).
    support::wait_for("the flaky hook to fail", || {
        std::fs::read_to_string(d.join("flaky.tries"))
            .ok()
            .filter(|t| t.contains("build-failure"))
    });
    farm.kill_coordinator();
    std::fs::write(d.join("flip"), "").expect("flip");
    farm.extra_args.push("--public-metrics".to_owned());
    farm.start_coordinator();
    let failure = support::wait_for("the build-failure delivered after the restart", || {
        json_lines(&d.join("flaky.log"))
            .into_iter()
            .find(|e| e["event"] == "build-failure")
    });
    assert_eq!(failure["build"]["id"], bad_id);
    assert_eq!(failure["build"]["state"], "failed");

    let wanted: BTreeSet<(String, i64)> = [
        ("build-submitted", good_id),
        ("build-started", good_id),
        ("build-success", good_id),
        ("build-submitted", bad_id),
        ("build-started", bad_id),
        ("build-failure", bad_id),
    ]
    .into_iter()
    .map(|(k, i)| (k.to_owned(), i))
    .collect();
    support::wait_for("every event at the program hook", || {
        let got = event_pairs(&json_lines(&d.join("program.log")));
        wanted.is_subset(&got).then_some(())
    });
    support::wait_for("every event at the webhook", || {
        let got = received.lock().expect("lock").clone();
        for (kind, e) in &got {
            assert_eq!(e["event"], kind.as_str(), "X-Sandoff-Event matches");
        }
        wanted
            .is_subset(&event_pairs(got.iter().map(|(_, e)| e)))
            .then_some(())
    });
    // Each hook gets only its own kind.
    let program = json_lines(&d.join("program.log"));
    assert!(
        program
            .iter()
            .all(|e| kinds.contains(&e["event"].as_str().expect("event"))),
        "{program:?}"
    );

    // The stream from the start: ids increase, kinds match the data.
    let all = read_events(&farm, read_token, None, |got| {
        got.iter()
            .any(|(_, k, d)| k == "build-failure" && d["build"]["id"] == bad_id)
    });
    for w in all.windows(2) {
        assert!(w[0].0 < w[1].0, "ids increase: {all:?}");
    }
    for (id, kind, data) in &all {
        assert_eq!(data["id"], *id);
        assert_eq!(data["event"], kind.as_str());
    }
    let good_kinds: Vec<&str> = all
        .iter()
        .filter(|(_, _, d)| d["build"]["id"] == good_id)
        .map(|(_, k, _)| k.as_str())
        .collect();
    assert_eq!(
        good_kinds,
        ["build-submitted", "build-started", "build-success"]
    );
    // Resuming after the second event starts at the third.
    let resumed = read_events(&farm, read_token, Some(all[1].0), |got| !got.is_empty());
    assert_eq!(resumed[0].0, all[2].0);
    // The stream needs a token.
    assert_eq!(
        Farm::status(
            "GET",
            &format!("{}/client/v1/events", farm.client_url()),
            None
        ),
        401
    );

    // Metrics moved, survived the kill, and are public now; nothing else is.
    let (status, after) = scrape(&farm.client_url(), None);
    assert_eq!(status, 200);
    assert_eq!(m(&after, "builds_finished_total{state=\"succeeded\"}"), 1.0);
    assert_eq!(m(&after, "builds_finished_total{state=\"failed\"}"), 1.0);
    assert_eq!(m(&after, "build_duration_seconds_count"), 2.0);
    assert_eq!(m(&after, "build_wait_seconds_bucket{le=\"+Inf\"}"), 2.0);
    assert!(m(&after, "cache_paths") >= 1.0, "{after:?}");
    assert!(m(&after, "uploaded_bytes_total") > 0.0, "{after:?}");
    assert_eq!(
        m(&after, "agents{enabled=\"true\",seen=\"true\"}"),
        1.0,
        "{after:?}"
    );
    assert_eq!(scrape(&farm.agent_url(), None).0, 200);
    assert_eq!(
        Farm::status(
            "GET",
            &format!("{}/client/v1/builds", farm.client_url()),
            None
        ),
        401
    );
}
