//! The HTML of the web page: plain functions from the coordinator's
//! records to strings, rendered on the server. Every string that comes
//! from the datastore (derivation names, tags, failure messages, agent
//! names, logs) goes through [`esc`]; the only scripts and styles are the
//! inline ones here, allowed by the nonce of the page's
//! `Content-Security-Policy`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::coordinator::model::{AgentRecord, BuildRecord};

/// `s` as HTML text or attribute value.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The name of a derivation from its path (`/nix/store/<hash>-hello.drv`
/// → `hello`).
pub(crate) fn drv_name(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let name = base.split_once('-').map_or(base, |(_, n)| n);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// A time as `YYYY-MM-DD HH:MM:SS` UTC (the civil-from-days algorithm of
/// Howard Hinnant's date library), so the page needs no time zone data.
pub(crate) fn utc(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// How long ago `t` was, briefly ("5 s ago").
pub(crate) fn ago(t: i64, now: i64) -> String {
    let d = (now - t).max(0);
    match d {
        0..=119 => format!("{d} s ago"),
        120..=7199 => format!("{} min ago", d / 60),
        7200..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

/// The views, in the navigation's order: (path, title).
pub(crate) const VIEWS: [(&str, &str); 5] = [
    ("/", "Overview"),
    ("/ui/queue", "Queue"),
    ("/ui/running", "Running"),
    ("/ui/recent", "Recent results"),
    ("/ui/agents", "Agents"),
];

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
header a{color:#d0d7de;text-decoration:none}header a.here{color:#fff;font-weight:600}
header form{margin-left:auto}header button{background:none;border:1px solid #8c959f;color:#d0d7de;border-radius:4px;cursor:pointer}
main{padding:1em 1.2em}h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;background:#fff;width:100%;margin:.5em 0}
th,td{border-bottom:1px solid #d8dee4;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
.succeeded{color:#1a7f37}.failed{color:#cf222e}.canceled{color:#6e7781}.allocated{color:#0969da}.queued{color:#9a6700}
.why,.msg{color:#cf222e}.tag{background:#ddf4ff;border-radius:3px;padding:0 .3em;margin-right:.3em;font-size:.9em}
pre{background:#0d1117;color:#e6edf3;padding:.6em;overflow:auto;max-height:32em;white-space:pre-wrap;margin:.3em 0}
pre.tail{max-height:9em;font-size:.85em}.muted{color:#6e7781}
.login{max-width:28em;margin:4em auto;background:#fff;padding:1.5em;border:1px solid #d8dee4;border-radius:6px}
.login input{width:100%;box-sizing:border-box;padding:.4em;margin:.5em 0}.error{color:#cf222e}
";

/// A whole page: `body` under the navigation (none on the login page),
/// reloaded every `refresh` seconds when given.
pub(crate) fn layout(
    title: &str,
    here: Option<&str>,
    nonce: &str,
    refresh: Option<u32>,
    body: &str,
    script: Option<&str>,
) -> String {
    let mut h = String::with_capacity(body.len() + 4096);
    h.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    if let Some(s) = refresh {
        let _ = write!(h, "<meta http-equiv=\"refresh\" content=\"{s}\">");
    }
    let _ = write!(
        h,
        "<title>{} · sandoff coordinator</title><style nonce=\"{nonce}\">{STYLE}</style></head><body>",
        esc(title)
    );
    if let Some(here) = here {
        h.push_str("<header><strong>sandoff coordinator</strong>");
        for (path, name) in VIEWS {
            let class = if path == here { " class=\"here\"" } else { "" };
            let _ = write!(h, "<a href=\"{path}\"{class}>{name}</a>");
        }
        h.push_str(
            "<form method=\"post\" action=\"/logout\"><button type=\"submit\">Log out</button></form></header>",
        );
    }
    h.push_str("<main>");
    h.push_str(body);
    h.push_str("</main>");
    if let Some(js) = script {
        let _ = write!(h, "<script nonce=\"{nonce}\">{js}</script>");
    }
    h.push_str("</body></html>");
    h
}

/// The login form, with an error line when a login was refused.
pub(crate) fn login(error: Option<&str>) -> String {
    let mut b = String::from("<div class=\"login\"><h1>sandoff coordinator</h1>");
    if let Some(e) = error {
        let _ = write!(b, "<p class=\"error\" id=\"error\">{}</p>", esc(e));
    }
    b.push_str(
        "<form method=\"post\" action=\"/login\"><label for=\"token\">Token (read role or above)</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"off\" required autofocus>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"muted\">A browser session lasts 12 hours at most, ends when the token is revoked, \
         and does not survive a restart of the coordinator.</p></div>",
    );
    b
}

fn tags(t: &BTreeMap<String, String>) -> String {
    t.iter()
        .map(|(k, v)| format!("<span class=\"tag\">{}={}</span>", esc(k), esc(v)))
        .collect()
}

fn build_link(b: &BuildRecord) -> String {
    format!("<a href=\"/ui/builds/{id}\">{id}</a>", id = b.id)
}

fn name_cell(b: &BuildRecord) -> String {
    format!(
        "<span title=\"{}\">{}</span> {}",
        esc(&b.drv),
        esc(drv_name(&b.drv)),
        tags(&b.tags)
    )
}

/// A queued build and why it cannot start, if no agent can do it.
pub(crate) struct Queued {
    pub(crate) build: BuildRecord,
    pub(crate) unbuildable: Option<String>,
}

/// The queue: what waits, and for what.
pub(crate) fn queue(builds: &[Queued], now: i64) -> String {
    let mut h = format!("<h2>Queue ({})</h2>", builds.len());
    if builds.is_empty() {
        h.push_str("<p class=\"muted\">Nothing is queued.</p>");
        return h;
    }
    h.push_str(
        "<table id=\"queue\"><tr><th>Build</th><th>Derivation</th><th>System</th>\
         <th>Priority (effective)</th><th>Waiting on</th><th>Queued</th><th>Why it waits</th></tr>",
    );
    for q in builds {
        let b = &q.build;
        let why = match (
            &q.unbuildable,
            b.waiting_on,
            b.defer_until,
            b.next_attempt_at,
        ) {
            (Some(u), ..) => format!("<span class=\"why\">{}</span>", esc(u)),
            (None, n, ..) if n > 0 => format!("{n} build(s) it depends on"),
            (None, _, Some(t), _) if t > now => format!("deferred until {}", utc(t)),
            (None, _, _, Some(t)) if t > now => {
                format!(
                    "retry at {} UTC after {} infrastructure failure(s)",
                    utc(t),
                    b.attempts
                )
            }
            _ => "a free agent slot".to_owned(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{why}</td></tr>",
            build_link(b),
            name_cell(b),
            esc(&b.system),
            b.priority,
            b.effective_priority,
            b.waiting_on,
            ago(b.created_at, now),
        );
    }
    h.push_str("</table>");
    h
}

/// A running build and the end of its log.
pub(crate) struct Running {
    pub(crate) build: BuildRecord,
    pub(crate) tail: String,
}

/// The running builds, each with the end of its live log.
pub(crate) fn running(builds: &[Running], now: i64) -> String {
    let mut h = format!("<h2>Running ({})</h2>", builds.len());
    if builds.is_empty() {
        h.push_str("<p class=\"muted\">Nothing is running.</p>");
        return h;
    }
    h.push_str(
        "<table id=\"running\"><tr><th>Build</th><th>Derivation</th><th>Agent</th>\
         <th>Started</th><th>Log (end)</th></tr>",
    );
    for r in builds {
        let b = &r.build;
        let agent = b
            .agent
            .as_ref()
            .map(|a| esc(a.as_str()))
            .unwrap_or_default();
        let started = b
            .started_at
            .map_or_else(|| "starting".to_owned(), |t| ago(t, now));
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"agent\">{agent}</td><td>{started}</td>\
             <td><pre class=\"tail\">{}</pre><a href=\"/ui/builds/{}\">live log</a></td></tr>",
            build_link(b),
            name_cell(b),
            esc(&r.tail),
            b.id,
        );
    }
    h.push_str("</table>");
    h
}

/// Finished builds, newest first, with their failure messages.
pub(crate) fn recent(builds: &[BuildRecord], now: i64) -> String {
    let mut h = format!("<h2>Recent results ({})</h2>", builds.len());
    if builds.is_empty() {
        h.push_str("<p class=\"muted\">No build has finished yet.</p>");
        return h;
    }
    h.push_str(
        "<table id=\"recent\"><tr><th>Build</th><th>Derivation</th><th>Result</th>\
         <th>Agent</th><th>Finished</th><th>Message</th></tr>",
    );
    for b in builds {
        let state = b.state.as_str();
        let _ =
            write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{state}\">{state}</td><td>{}</td><td>{}</td>\
             <td class=\"msg\">{}</td></tr>",
            build_link(b),
            name_cell(b),
            b.agent.as_ref().map(|a| esc(a.as_str())).unwrap_or_default(),
            b.finished_at.map(|t| ago(t, now)).unwrap_or_default(),
            esc(b.message.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</table>");
    h
}

/// The agents and their load.
pub(crate) fn agents(agents: &[AgentRecord], now: i64) -> String {
    let mut h = format!("<h2>Agents ({})</h2>", agents.len());
    if agents.is_empty() {
        h.push_str("<p class=\"muted\">No agent is registered.</p>");
        return h;
    }
    h.push_str(
        "<table id=\"agents\"><tr><th>Agent</th><th>State</th><th>Systems</th><th>Features</th>\
         <th>Busy / slots</th><th>Last seen</th><th>Builds</th></tr>",
    );
    for a in agents {
        let list = |s: &std::collections::BTreeSet<String>| {
            s.iter().map(|x| esc(x)).collect::<Vec<_>>().join(", ")
        };
        let builds: Vec<String> = a
            .allocated
            .iter()
            .map(|id| format!("<a href=\"/ui/builds/{id}\">{id}</a>"))
            .collect();
        let _ = write!(
            h,
            "<tr><td class=\"agent\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td>\
             <td>{}</td><td>{}</td></tr>",
            esc(a.id.as_str()),
            if a.enabled {
                "enabled"
            } else {
                "<span class=\"failed\">disabled</span>"
            },
            list(&a.systems),
            list(&a.features),
            a.allocated.len(),
            a.max_parallel_builds,
            a.last_seen
                .map_or_else(|| "never".to_owned(), |t| ago(t, now)),
            builds.join(" "),
        );
    }
    h.push_str("</table>");
    h
}

/// One build, with its log so far (`log_from`: where the shown log starts
/// in the whole one, `next`: where the live part is polled from).
pub(crate) struct BuildPage<'a> {
    pub(crate) build: &'a BuildRecord,
    pub(crate) dependencies: &'a [crate::coordinator::model::BuildId],
    pub(crate) outputs: &'a BTreeMap<String, String>,
    pub(crate) unbuildable: Option<&'a str>,
    pub(crate) log: &'a str,
    pub(crate) log_from: u64,
    pub(crate) next: u64,
    pub(crate) complete: bool,
}

/// The page of one build.
pub(crate) fn build(p: &BuildPage<'_>, now: i64) -> String {
    let b = p.build;
    let state = b.state.as_str();
    let mut h = format!(
        "<h1>Build {} · {}</h1><table id=\"build\">",
        b.id,
        esc(drv_name(&b.drv))
    );
    let mut row = |k: &str, v: String| {
        let _ = write!(h, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    row("Derivation", esc(&b.drv));
    row(
        "State",
        format!("<span id=\"state\" class=\"{state}\">{state}</span>"),
    );
    row("System", esc(&b.system));
    row(
        "Priority (effective)",
        format!("{} ({})", b.priority, b.effective_priority),
    );
    row("Tags", tags(&b.tags));
    row(
        "Agent",
        b.agent
            .as_ref()
            .map(|a| esc(a.as_str()))
            .unwrap_or_default(),
    );
    row(
        "Submitted",
        format!("{} UTC ({})", utc(b.created_at), ago(b.created_at, now)),
    );
    if let Some(t) = b.started_at {
        row("Started", format!("{} UTC", utc(t)));
    }
    if let Some(t) = b.finished_at {
        row("Finished", format!("{} UTC", utc(t)));
    }
    row("Infrastructure failures", b.attempts.to_string());
    if !p.dependencies.is_empty() {
        let deps: Vec<String> = p
            .dependencies
            .iter()
            .map(|id| format!("<a href=\"/ui/builds/{id}\">{id}</a>"))
            .collect();
        row("Waiting on", deps.join(" "));
    }
    if let Some(u) = p.unbuildable {
        row(
            "Why it waits",
            format!("<span class=\"why\">{}</span>", esc(u)),
        );
    }
    if let Some(m) = &b.message {
        row("Message", format!("<span class=\"msg\">{}</span>", esc(m)));
    }
    for (name, path) in p.outputs {
        row(&format!("Output {}", esc(name)), esc(path));
    }
    h.push_str("</table><h2>Log</h2>");
    if p.log_from > 0 {
        let _ = write!(
            h,
            "<p class=\"muted\">The first {} bytes are not shown.</p>",
            p.log_from
        );
    }
    let _ = write!(
        h,
        "<pre id=\"log\" data-next=\"{}\" data-complete=\"{}\" data-src=\"/ui/builds/{}/log\">{}</pre>",
        p.next,
        p.complete,
        b.id,
        esc(p.log)
    );
    if !p.complete {
        h.push_str("<p class=\"muted\" id=\"follow\">Following the log…</p>");
    }
    h
}

/// The build page's script: polls the log from where the page's ends,
/// appends new text (as text, never HTML), counts its polls in
/// `data-polls` (which shows that it runs under the page's policy), and
/// reloads the page once the log is complete so that the build's final
/// state shows, or when the session ended (the log request was redirected
/// to the login form, which is not log text).
pub(crate) const FOLLOW_LOG: &str = r#"(function(){
var pre=document.getElementById('log');if(!pre||pre.dataset.complete==='true')return;
var next=pre.dataset.next;
function poll(){fetch(pre.dataset.src+'?offset='+next,{credentials:'same-origin',cache:'no-store'})
.then(function(r){if(r.redirected){location.reload();return;}if(!r.ok)throw new Error(r.status);var n=r.headers.get('upload-offset');var done=r.headers.get('log-complete')==='true';
return r.text().then(function(t){if(t){var end=pre.scrollTop+pre.clientHeight>=pre.scrollHeight-4;pre.appendChild(document.createTextNode(t));if(end)pre.scrollTop=pre.scrollHeight;}
if(n)next=n;pre.dataset.polls=(+(pre.dataset.polls||0)+1);if(done){location.reload();}else{setTimeout(poll,1000);}});})
.catch(function(){setTimeout(poll,5000);});}
setTimeout(poll,1000);})();"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::model::{BuildId, BuildState};

    fn record(drv: &str) -> BuildRecord {
        BuildRecord {
            id: "7".parse::<BuildId>().expect("id"),
            drv: drv.to_owned(),
            system: "x86_64-linux".into(),
            state: BuildState::Failed,
            priority: 0,
            effective_priority: 0,
            critical_path: 0,
            tags: BTreeMap::from([("note".to_owned(), "<script>alert(1)</script>".to_owned())]),
            created_at: 0,
            defer_until: None,
            waiting_on: 0,
            agent: None,
            lease_deadline: None,
            attempts: 1,
            next_attempt_at: None,
            started_at: None,
            finished_at: Some(5),
            message: Some("builder failed: <b>exit 1</b> & \"more\"".into()),
        }
    }

    #[test]
    fn untrusted_strings_are_escaped_everywhere() {
        let b = record("/nix/store/00000000000000000000000000000000-x<script>.drv");
        let html = recent(std::slice::from_ref(&b), 10);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("&amp; &quot;more&quot;"), "{html}");
        let page = build(
            &BuildPage {
                build: &b,
                dependencies: &[],
                outputs: &BTreeMap::new(),
                unbuildable: None,
                log: "</pre><script>x</script>",
                log_from: 0,
                next: 0,
                complete: true,
            },
            10,
        );
        assert!(!page.contains("<script>"), "{page}");
        assert_eq!(esc("'a'"), "&#39;a&#39;");
    }

    #[test]
    fn names_and_times_read_well() {
        assert_eq!(drv_name("/gnu/store/abc-hello-2.12.drv"), "hello-2.12");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_764_763_200), "2025-12-03 12:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(ago(0, 30), "30 s ago");
        assert_eq!(ago(0, 600), "10 min ago");
    }
}
