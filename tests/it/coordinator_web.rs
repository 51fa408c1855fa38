//! The coordinator's web page end to end: a coordinator, one agent, a few
//! builds (one that fails, one whose tag holds `<script>`, one no agent
//! can do, one slow one that logs a line and sleeps), then the page as
//! headless Chromium shows it: a screenshot of each view (copied to
//! `target/coordinator-web-screenshots/`) and checks on the DOM Chromium
//! built. The login rules (form, cookie, login codes, logout, refused and
//! revoked tokens) are checked over plain HTTP, and live logs through the
//! client API and `builds log --follow`.
//!
//! Needs what the coordinator tests need, and `chromium` for the page.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::build::{Spec, Store};
use crate::coordinator::Farm;
use crate::support::{self, Need};
use crate::this_test;

const SCRIPT_TAG: &str = "<script>alert(1)</script>";

/// An HTTP client that does not follow redirects (they are checked).
fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(30))
        .build()
}

/// A response, whatever its status.
fn call(res: Result<ureq::Response, ureq::Error>) -> ureq::Response {
    match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    }
}

fn token(file: &Path) -> String {
    std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_owned()
}

/// `POST /login` with `token`: the response.
fn login(farm: &Farm, token: &str) -> ureq::Response {
    call(
        http()
            .post(&format!("{}/login", farm.client_url()))
            .send_form(&[("token", token)]),
    )
}

/// The `name=value` of a `Set-Cookie` header.
fn cookie_of(r: &ureq::Response) -> String {
    let set = r.header("set-cookie").expect("a Set-Cookie header");
    set.split(';').next().expect("name=value").to_owned()
}

/// `GET path` with a cookie: the status and `Location`.
fn get_with_cookie(farm: &Farm, path: &str, cookie: &str) -> (u16, String) {
    let r = call(
        http()
            .get(&format!("{}{path}", farm.client_url()))
            .set("Cookie", cookie)
            .call(),
    );
    (r.status(), r.header("location").unwrap_or("").to_owned())
}

/// A one-time login code's URL that opens `next`.
fn login_url(farm: &Farm, next: &str) -> String {
    let r = call(
        http()
            .post(&format!("{}/client/v1/ui-login-codes", farm.client_url()))
            .set("Authorization", &format!("Bearer {}", token(&farm.reader)))
            .call(),
    );
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.into_string().expect("body")).expect("json");
    format!(
        "{}{}?next={next}",
        farm.client_url(),
        v["path"].as_str().expect("path")
    )
}

/// Build `id`'s log from `offset` through the client API: the text and
/// whether it is complete.
fn log(farm: &Farm, id: i64, offset: u64) -> (String, bool) {
    let r = call(
        http()
            .get(&format!(
                "{}/client/v1/builds/{id}/log?offset={offset}",
                farm.client_url()
            ))
            .set("Authorization", &format!("Bearer {}", token(&farm.reader)))
            .call(),
    );
    assert_eq!(r.status(), 200);
    let complete = r.header("log-complete") == Some("true");
    (r.into_string().expect("text"), complete)
}

/// Waits until `pred` holds for the builds of `drvs` (by `builds list`).
fn wait_for(farm: &Farm, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let builds = farm.builds();
        if pred(&builds) {
            return builds;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what}: {builds:?}\n{}",
            farm.log("coordinator")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn build_of<'a>(builds: &'a [Value], drv: &str) -> Option<&'a Value> {
    builds.iter().find(|b| b["drv"] == drv)
}

fn state_of(builds: &[Value], drv: &str) -> String {
    build_of(builds, drv)
        .and_then(|b| b["state"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Headless Chromium with a profile of its own under `tmp`.
fn chromium(tmp: &Path, args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir_in(tmp).expect("profile");
    let mut c = Command::new("timeout");
    c.arg("120")
        .arg("chromium")
        .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
        .args([
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url);
    let out = c.output().expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The DOM Chromium builds for `next`, logged in by a login code.
fn dom(farm: &Farm, next: &str) -> String {
    let out = chromium(farm.tmp.path(), &["--dump-dom"], &login_url(farm, next));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where screenshots are kept after the test (the temporary directory
/// goes).
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("coordinator-web-screenshots")
}

/// A screenshot of `url` as `name.png`; checks it is a PNG of some size
/// and prints where it is kept.
fn screenshot(farm: &Farm, name: &str, url: &str) {
    let file = farm.tmp.path().join(format!("{name}.png"));
    chromium(
        farm.tmp.path(),
        &[
            &format!("--screenshot={}", file.display()),
            "--window-size=1280,900",
        ],
        url,
    );
    let png = std::fs::read(&file).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{name}: not a PNG file"
    );
    // A blank 1280x900 page compresses to a few kB; a page with tables
    // and text is several times that.
    assert!(png.len() > 10_000, "{name}: only {} bytes", png.len());
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let kept = dir.join(format!("{name}.png"));
    std::fs::copy(&file, &kept).expect("copy");
    // Past the harness's capture (as `support::require` does), so that
    // the test's output lists the screenshots.
    let _ = writeln!(
        std::io::stderr(),
        "screenshot {name}: {} ({} bytes)",
        kept.display(),
        png.len()
    );
}

#[test]
fn the_web_page_shows_queue_running_results_and_agents_in_headless_chromium() {
    let test = this_test!();
    if !crate::build::ready(test) || !support::require(test, &[Need::Program("chromium")]) {
        return;
    }
    let store = Store::new();
    let plain = |name: &str, script: &str| {
        store.drv(
            name,
            Spec {
                script,
                ..Spec::default()
            },
        )
    };
    let ok = plain("web-fine", "echo fine > $out\n");
    let fails = plain("web-broken", "echo about to fail\nexit 3\n");
    let tagged = plain("web-tagged", "echo tagged > $out\n");
    let slow = plain(
        "web-slow",
        &gated(
            "echo first-live-line\n",
            "echo second-live-line\necho done > $out\n",
        ),
    );
    let unbuildable = store.drv(
        "web-needs-kvm",
        Spec {
            script: "echo never > $out\n",
            env: &[("requiredSystemFeatures", "kvm")],
            ..Spec::default()
        },
    );
    let mut farm = Farm::start(30);
    farm.add_agent("web-agent-1", 2);

    let base = farm.client_url();
    // The builds.
    farm.submit(&store, &[&ok, &fails, &unbuildable], &[]);
    farm.submit(
        &store,
        &[&tagged],
        &["--tag", &format!("note={SCRIPT_TAG}")],
    );
    wait_for(&farm, "the quick builds", |b| {
        [&ok, &fails, &tagged]
            .iter()
            .all(|d| matches!(state_of(b, d).as_str(), "succeeded" | "failed"))
    });
    farm.submit(&store, &[&slow], &[]);
    let builds = wait_for(&farm, "the slow build to run", |b| {
        state_of(b, &slow) == "allocated"
    });
    let slow_id = build_of(&builds, &slow).expect("slow")["id"]
        .as_i64()
        .expect("id");
    // The live log: the first line, while the build runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (text, complete) = log(&farm, slow_id, 0);
        if text.contains("first-live-line") {
            assert!(!complete, "{text}");
            assert!(!text.contains("second-live-line"), "{text}");
            assert_eq!(state_of(&farm.builds(), &slow), "allocated");
            // From an offset: the rest only.
            let (rest, _) = log(&farm, slow_id, 6);
            assert_eq!(rest, text[6..]);
            break;
        }
        assert!(Instant::now() < deadline, "no live log: {text:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The CLI follows it until the build ends.
    let follow = farm
        .client(
            &farm.reader,
            &["builds", "log", "--follow", &slow_id.to_string()],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn builds log --follow");
    let now =
        support::run_ok(&mut farm.client(&farm.reader, &["builds", "log", &slow_id.to_string()]));
    assert_eq!(String::from_utf8_lossy(&now), "first-live-line\n");

    // What Chromium shows: the views with the running build first, while
    // it runs (it waits until the test releases it).
    let running = dom(&farm, "/ui/running");
    assert!(running.contains("first-live-line"), "{running}");
    assert!(running.contains("web-agent-1"), "{running}");
    assert!(running.contains("web-slow"), "{running}");
    let page = dom(&farm, &format!("/ui/builds/{slow_id}"));
    assert!(page.contains("first-live-line"), "{page}");
    assert!(page.contains("allocated"), "{page}");
    // The page's script runs under its Content-Security-Policy and polls
    // the live log (it counts its polls in `data-polls`).
    let out = chromium(
        farm.tmp.path(),
        &["--dump-dom", "--virtual-time-budget=4000"],
        &login_url(&farm, &format!("/ui/builds/{slow_id}")),
    );
    let polled = String::from_utf8_lossy(&out.stdout);
    assert!(polled.contains("data-polls=\""), "{polled}");
    screenshot(&farm, "running", &login_url(&farm, "/ui/running"));
    screenshot(
        &farm,
        "build-live-log",
        &login_url(&farm, &format!("/ui/builds/{slow_id}")),
    );
    let overview = dom(&farm, "/");
    for part in ["Running (1)", "Queue (1)", "Agents (1)", "web-broken"] {
        assert!(overview.contains(part), "{part}: {overview}");
    }
    screenshot(&farm, "overview", &login_url(&farm, "/"));
    let agents = dom(&farm, "/ui/agents");
    assert!(agents.contains("web-agent-1"), "{agents}");
    assert!(agents.contains("x86_64-linux"), "{agents}");
    assert!(agents.contains("1 / 2"), "one of two slots busy: {agents}");
    screenshot(&farm, "agents", &login_url(&farm, "/ui/agents"));
    release(&farm, "web-agent-1");
    // Everything after this holds whether the slow build still runs.
    let queue = dom(&farm, "/ui/queue");
    assert!(queue.contains("web-needs-kvm"), "{queue}");
    assert!(
        queue.contains("no enabled agent builds x86_64-linux with features kvm"),
        "{queue}"
    );
    screenshot(&farm, "queue", &login_url(&farm, "/ui/queue"));
    let builds = farm.builds();
    let failure = build_of(&builds, &fails).expect("failed build")["message"]
        .as_str()
        .expect("a failure message")
        .to_owned();
    let recent = dom(&farm, "/ui/recent");
    // Chromium serialises text as HTML again: the message as text is its
    // escaped form.
    let escaped = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    assert!(recent.contains(&escaped(&failure)), "{failure}\n{recent}");
    assert!(recent.contains("web-broken") && recent.contains("web-fine"));
    assert!(recent.contains(&escaped(SCRIPT_TAG)), "{recent}");
    assert!(
        !recent.contains(SCRIPT_TAG),
        "the tag ran as HTML: {recent}"
    );
    assert!(!recent.contains("<script"), "no script on a list view");
    screenshot(&farm, "recent", &login_url(&farm, "/ui/recent"));
    screenshot(&farm, "login", &format!("{base}/login"));
    let failed_id = build_of(&builds, &fails).expect("failed")["id"]
        .as_i64()
        .expect("id");
    let failed_page = dom(&farm, &format!("/ui/builds/{failed_id}"));
    assert!(failed_page.contains("about to fail"), "{failed_page}");
    screenshot(
        &farm,
        "build-failed",
        &login_url(&farm, &format!("/ui/builds/{failed_id}")),
    );

    // The slow build ends: its log is whole, and complete.
    wait_for(&farm, "the slow build to end", |b| {
        state_of(b, &slow) == "succeeded"
    });
    let (text, complete) = log(&farm, slow_id, 0);
    assert!(complete, "{text}");
    assert!(
        text.contains("first-live-line") && text.contains("second-live-line"),
        "{text}"
    );
    let followed = follow.wait_with_output().expect("builds log --follow");
    assert!(followed.status.success(), "{followed:?}");
    assert_eq!(
        String::from_utf8_lossy(&followed.stdout),
        "first-live-line\nsecond-live-line\n"
    );
}

/// The login rules over plain HTTP: every view redirects to the form
/// without a login; bad, agent and revoked tokens are refused; the
/// cookie is a session id that opens the page and never the APIs; logout
/// and login codes.
#[test]
fn the_web_page_needs_a_login_and_its_cookie_opens_only_the_page() {
    let farm = Farm::start(30);
    let base = farm.client_url();
    let r = call(http().get(&format!("{base}/")).call());
    assert_eq!((r.status(), r.header("location")), (303, Some("/login")));
    let r = call(http().get(&format!("{base}/ui/agents")).call());
    assert_eq!(r.status(), 303, "every view needs a login");
    let form = call(http().get(&format!("{base}/login")).call());
    assert_eq!(form.status(), 200);
    let csp = form
        .header("content-security-policy")
        .expect("a CSP")
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(form.into_string().expect("html").contains("name=\"token\""));
    let agent_token = String::from_utf8(support::run_ok(
        &mut farm.client(&farm.admin, &["agents", "new", "web-agent-1"]),
    ))
    .expect("token")
    .trim()
    .to_owned();
    for (bad, why) in [
        ("sandoff_nonsense", "unknown, revoked or expired token"),
        (agent_token.as_str(), "agent"),
    ] {
        let r = login(&farm, bad);
        assert_eq!(r.status(), 401);
        assert!(r.header("set-cookie").is_none());
        assert!(r.into_string().expect("html").contains(why));
    }
    let r = login(&farm, &token(&farm.reader));
    assert_eq!((r.status(), r.header("location")), (303, Some("/")));
    let set = r.header("set-cookie").expect("cookie").to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = cookie_of(&r);
    assert!(
        !cookie.contains(&token(&farm.reader)),
        "the cookie is a session id, not the token"
    );
    assert_eq!(get_with_cookie(&farm, "/ui/queue", &cookie).0, 200);
    // The cookie opens the page only, never the APIs.
    assert_eq!(get_with_cookie(&farm, "/client/v1/builds", &cookie).0, 401);
    assert_eq!(
        Farm::status(
            "GET",
            &format!("{base}/ui/agents"),
            Some(&token(&farm.reader))
        ),
        200,
        "a token in Authorization opens the page too"
    );
    let wrong = "sandoff_0000000000000000000000000000000000000000000000000000000000000000";
    assert_eq!(
        Farm::status("GET", &format!("{base}/ui/queue"), Some(wrong)),
        401
    );
    assert_eq!(
        Farm::status("GET", &format!("{base}/ui/queue"), Some(&agent_token)),
        403,
        "an agent's token does not open the page"
    );
    let r = call(
        http()
            .post(&format!("{base}/logout"))
            .set("Cookie", &cookie)
            .call(),
    );
    assert_eq!((r.status(), r.header("location")), (303, Some("/login")));
    assert_eq!(
        get_with_cookie(&farm, "/", &cookie),
        (303, "/login".to_owned()),
        "logged out"
    );
    // Revoking a token ends its sessions.
    let extra = String::from_utf8(support::run_ok(
        &mut farm.client(&farm.admin, &["tokens", "new", "--role", "read"]),
    ))
    .expect("token")
    .trim()
    .to_owned();
    let revoked_cookie = cookie_of(&login(&farm, &extra));
    assert_eq!(get_with_cookie(&farm, "/", &revoked_cookie).0, 200);
    let tokens: Value = serde_json::from_slice(&support::run_ok(
        &mut farm.client(&farm.admin, &["tokens", "list", "--json"]),
    ))
    .expect("json");
    let hash = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(extra.as_bytes());
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let id = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .find(|id| hash.starts_with(id))
        .expect("listed")
        .to_owned();
    support::run_ok(&mut farm.client(&farm.admin, &["tokens", "revoke", &id]));
    assert_eq!(
        get_with_cookie(&farm, "/", &revoked_cookie),
        (303, "/login".to_owned())
    );
    // A login code works once.
    let url = login_url(&farm, "/ui/recent");
    let r = call(http().get(&url).call());
    assert_eq!(
        (r.status(), r.header("location")),
        (303, Some("/ui/recent"))
    );
    assert!(r.header("set-cookie").is_some());
    let again = call(http().get(&url).call());
    assert_eq!(again.header("location"), Some("/login"));
    assert!(again.header("set-cookie").is_none());
}

/// A build script that runs `before`, waits until the test calls
/// [`release`] (at most five minutes, so that a failed test leaves no
/// build behind for long), then runs `after`: the window in which a test
/// looks at a running build is the test's to close, not a sleep's.
fn gated(before: &str, after: &str) -> String {
    format!(
        "{before}i=0\nwhile [ ! -e \"$TMPDIR/release\" ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done\n{after}"
    )
}

/// Lets the gated builds running on `agent` go on: writes `release` into
/// each of its builds' build directories (`<builds>/<slot>/sandoff-build-*/build`,
/// the builds' `$TMPDIR`).
fn release(farm: &Farm, agent: &str) {
    let builds = farm
        .tmp
        .path()
        .join("agents")
        .join(agent)
        .join("nix/var/sandoff/builds");
    let mut released = 0;
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    for slot in dirs(&builds) {
        for top in dirs(&slot) {
            let build = top.join("build");
            if build.is_dir() {
                std::fs::write(build.join("release"), b"").expect("release");
                released += 1;
            }
        }
    }
    assert!(
        released > 0,
        "no build directory under {}",
        builds.display()
    );
}

/// A build that prints a line, waits and prints another: the first line
/// is read through the client API while it runs, and `builds log
/// --follow` prints both and ends with the build.
#[test]
fn a_running_builds_log_is_read_while_it_runs_and_followed_to_its_end() {
    let test = this_test!();
    if !crate::build::ready(test) {
        return;
    }
    let store = Store::new();
    let slow = store.drv(
        "live-log",
        Spec {
            script: &gated(
                "echo first-live-line\n",
                "echo second-live-line\necho done > $out\n",
            ),
            ..Spec::default()
        },
    );
    let mut farm = Farm::start(30);
    farm.add_agent("a1", 1);
    farm.submit(&store, &[&slow], &[]);
    let builds = wait_for(&farm, "the build to run", |b| {
        state_of(b, &slow) == "allocated"
    });
    let id = build_of(&builds, &slow).expect("build")["id"]
        .as_i64()
        .expect("id");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (text, complete) = log(&farm, id, 0);
        if !text.is_empty() {
            // The agent sends whole lines.
            assert_eq!(text, "first-live-line\n");
            assert!(!complete);
            assert_eq!(state_of(&farm.builds(), &slow), "allocated");
            assert_eq!(log(&farm, id, 6), ("live-line\n".to_owned(), false));
            break;
        }
        assert!(Instant::now() < deadline, "no live log");
        std::thread::sleep(Duration::from_millis(200));
    }
    release(&farm, "a1");
    let followed = support::run_ok(&mut farm.client(
        &farm.reader,
        &["builds", "log", "--follow", &id.to_string()],
    ));
    assert_eq!(
        String::from_utf8_lossy(&followed),
        "first-live-line\nsecond-live-line\n"
    );
    assert_eq!(
        log(&farm, id, 0),
        ("first-live-line\nsecond-live-line\n".to_owned(), true)
    );
    wait_for(&farm, "the build to succeed", |b| {
        state_of(b, &slow) == "succeeded"
    });
}
