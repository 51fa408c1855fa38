//! The build-hook line protocol of guix-daemon and Nix 1.x, for
//! `sandoff hook SYSTEM MAX-SILENT-TIME PRINT-BUILD-TRACE BUILD-TIMEOUT`
//! (nix-daemon 2.x's wire protocol is in [`nix`]; both answer and build
//! through [`offload`]).
//!
//! The daemon writes one request per line on the hook's stdin,
//! `AM-WILLING SYSTEM DRV-PATH FEATURES` (features comma-separated, so an
//! empty list leaves a trailing space), parsed as Guix's `guix offload` does
//! with `([01]) ([a-z0-9_-]+) (/[[:graph:]]+.drv) ([[:graph:]]*)`, except
//! that the whole line must match and `.drv` is literal: anything else is an
//! error naming the line ([`parse_request`]). The hook answers each with one
//! line, `# accept`, `# decline` or `# postpone` ([`Reply`]), on stdout
//! (which the daemon joins with stderr), flushed at once. One process
//! answers declines and postpones until it accepts one
//! ([`serve_requests`]); at end of input it exits 0. After `# accept` the
//! daemon writes the inputs line (the input closure and the whole .drv
//! closure, space-separated with a trailing space) and the outputs line (the
//! missing outputs' store paths), then closes stdin ([`read_paths`]).
//!
//! # Which reply
//!
//! Each request is decided by [`crate::decide`] with the machines file read
//! again (as Guix does), the local facts of the daemon's SYSTEM and the
//! policy of [`placement`]:
//!
//! - a machine was chosen, its slot taken and a connection to it made:
//!   `accept` (a machine that cannot be reached goes into backoff and the
//!   request is decided again first, as Nix 1.x connected before
//!   accepting; Guix accepts first and fails the build);
//! - no machine can build it (no machines file, unknown system or
//!   features, every fitting machine in backoff, or a local-build
//!   derivation, which sandoff never offloads): `decline`, so the daemon
//!   builds it itself or fails with its own message (a `Fail` decision
//!   declines too: the daemon's message is the one its user expects). This
//!   holds whatever AM-WILLING says, as in `build-remote.pl`: with it 0 the
//!   daemon waits for a local slot itself, and postponing would only make
//!   it ask again. (guix-daemon asks about a `preferLocalBuild` derivation
//!   only when it cannot build it; Guix would offload it, sandoff's
//!   decision keeps it local, so the daemon reports why it cannot.);
//! - fitting machines exist but all their slots are taken: `postpone`,
//!   unless AM-WILLING is 1 and the local machine can build it, then
//!   `decline`. This is Nix 1.x's `build-remote.pl` rule ("postpone if we
//!   have a machine of the right type, except if the local system can and
//!   wants to do the build"); Guix postpones regardless. AM-WILLING is
//!   therefore the policy's `local_when_busy`: with it 0 (no free local
//!   slot) a busy machine is waited for rather than handing the build back
//!   to a daemon that cannot start it now;
//! - anything fails while answering (the machines file cannot be read, the
//!   `.drv` is not valid here or cannot be read, slot or backoff files):
//!   `decline`, after a line `sandoff: REASON` for the daemon's user
//!   ([`offload::answer_or_decline`]). guix-daemon fails the build of a
//!   hook that exits before replying ("unexpected EOF"); a decline lets
//!   it build the derivation itself or say why it cannot.
//!
//! A malformed request line and the end of input are the only ways the
//! hook ends without replying: there is then no request to answer.
//!
//! After the accept [`offload::build`] builds it, with the failover policy
//! of `sandoff build`, and the caller exits with [`exit_code`]: 0
//! when the outputs are valid here, [`EXIT_BUILD_FAILED`] (100) for a
//! failed remote build, [`EXIT_TIMED_OUT`] (101) for a timeout, 1 for
//! anything else (the daemon's transient "hook failure").

pub mod nix;
pub mod offload;

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, Write};

use crate::bounded::{self, BoundedError};
use crate::decide::{Decision, LocalFacts, Machine, Placement, Policy};
use crate::serve_protocol::BuildStatus;
use crate::store::{StoreDir, StorePath};
use crate::termsafe;

/// The longest request line read: a real one is a store path and a few
/// words, far below this.
pub const REQUEST_LINE_LIMIT: u64 = 1 << 20;

/// The longest inputs or outputs line read: a large closure lists tens of
/// thousands of store paths, each under 256 bytes (a few MiB), far below
/// this.
pub const PATHS_LINE_LIMIT: u64 = 64 << 20;

/// Exit status for a build that failed on the machine (the daemon's
/// `PermanentFailure`).
pub const EXIT_BUILD_FAILED: u8 = 100;

/// Exit status for a build that timed out on the machine (`TimedOut`).
pub const EXIT_TIMED_OUT: u8 = 101;

/// Why the conversation with the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A request line that is not `AM-WILLING SYSTEM DRV-PATH FEATURES`.
    #[error("invalid request line {line}: {reason}")]
    BadRequest {
        /// The start of the line, quoted ([`termsafe::quote_short`]).
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An inputs or outputs line that is not a list of store paths.
    #[error("invalid {what} line {line}: {reason}")]
    BadPaths {
        /// `inputs` or `outputs`.
        what: &'static str,
        /// The start of the line, quoted ([`termsafe::quote_short`]).
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line longer than its limit ([`REQUEST_LINE_LIMIT`],
    /// [`PATHS_LINE_LIMIT`]); the rest of it is not read.
    #[error("the daemon's {what} line is longer than the limit of {}", bounded::size(*limit))]
    LineTooLong {
        /// `request`, `inputs` or `outputs`.
        what: &'static str,
        /// The limit, in bytes.
        limit: u64,
    },
    /// The input ended after `# accept` before the inputs or outputs line.
    #[error("the daemon closed the hook's input before sending the {what} line")]
    MissingLine {
        /// `inputs` or `outputs`.
        what: &'static str,
    },
    /// Reading from or writing to the daemon failed.
    #[error("cannot {action} the daemon: {source}")]
    Io {
        /// `read from` or `reply to`.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One request from the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The daemon has a free local build slot (`nrLocalBuilds < maxBuildJobs`).
    pub am_willing: bool,
    /// The derivation's system.
    pub system: String,
    /// The derivation, a full store path ending in `.drv` (checked against
    /// the store by the caller).
    pub drv_path: String,
    /// Its `requiredSystemFeatures`.
    pub features: BTreeSet<String>,
}

/// The hook's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The hook builds it; the inputs and outputs lines follow.
    Accept,
    /// The daemon builds it (or fails) itself.
    Decline,
    /// Ask again later.
    Postpone,
}

impl Reply {
    /// The reply line, with its newline.
    pub fn line(self) -> &'static str {
        match self {
            Reply::Accept => "# accept\n",
            Reply::Decline => "# decline\n",
            Reply::Postpone => "# postpone\n",
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reply::Accept => "accept",
            Reply::Decline => "decline",
            Reply::Postpone => "postpone",
        })
    }
}

/// `[[:graph:]]` in the C locale: printable ASCII other than space.
fn graph(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &str) -> Result<Request, HookError> {
    let bad = |reason: &str| HookError::BadRequest {
        line: termsafe::quote_short(line),
        reason: reason.to_owned(),
    };
    let mut fields = line.splitn(4, ' ');
    let (Some(willing), Some(system), Some(drv), Some(features)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(bad(
            "expected 'AM-WILLING SYSTEM DRV-PATH FEATURES' (4 fields separated by single spaces)",
        ));
    };
    let am_willing = match willing {
        "0" => false,
        "1" => true,
        _ => return Err(bad("AM-WILLING must be 0 or 1")),
    };
    if system.is_empty()
        || !system
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
    {
        return Err(bad("SYSTEM must be one or more of a-z, 0-9, '_' and '-'"));
    }
    let drv_ok =
        drv.starts_with('/') && drv.len() > "/.drv".len() && drv.ends_with(".drv") && graph(drv);
    if !drv_ok {
        return Err(bad(
            "DRV-PATH must be an absolute path ending in '.drv' without spaces",
        ));
    }
    if !graph(features) {
        return Err(bad(
            "FEATURES must be a comma-separated list without spaces",
        ));
    }
    Ok(Request {
        am_willing,
        system: system.to_owned(),
        drv_path: drv.to_owned(),
        // As Guix's `string-tokenize` with "not a comma": empty items vanish.
        features: features
            .split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// One line without its newline, or `None` at end of input. A line
/// longer than `limit` is an error after reading `limit + 1` bytes of it:
/// the daemon is not to make the hook hold more.
fn read_line(
    input: &mut dyn BufRead,
    what: &'static str,
    limit: u64,
) -> Result<Option<String>, HookError> {
    let buf = match bounded::read_line(input, limit) {
        Ok(Some(buf)) => buf,
        Ok(None) => return Ok(None),
        Err(BoundedError::Io { source }) => {
            return Err(HookError::Io {
                action: "read from",
                source,
            })
        }
        Err(_) => return Err(HookError::LineTooLong { what, limit }),
    };
    // Not UTF-8 is not `[[:graph:]]` either: report it as a bad line.
    Ok(Some(match String::from_utf8(buf) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// Writes `reply` on a line of its own and flushes it: the daemon waits
/// for it.
pub fn write_reply(output: &mut dyn Write, reply: Reply) -> Result<(), HookError> {
    output
        .write_all(reply.line().as_bytes())
        .and_then(|()| output.flush())
        .map_err(|source| HookError::Io {
            action: "reply to",
            source,
        })
}

/// How the caller answers one request.
pub enum Answer<T> {
    /// Build it; `T` is what the build needs (the machine and its slot).
    Accept(T),
    /// Let the daemon build it.
    Decline,
    /// Ask again later.
    Postpone,
}

/// Reads requests from `input` and answers each with `answer` on `output`
/// until one is accepted: returns that request and what `answer` gave for
/// it, after `# accept` was written, or `None` at end of input. A malformed
/// line ends the session with [`HookError::BadRequest`].
pub fn serve_requests<T, E: From<HookError>>(
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    mut answer: impl FnMut(&Request) -> Result<Answer<T>, E>,
) -> Result<Option<(Request, T)>, E> {
    while let Some(line) = read_line(input, "request", REQUEST_LINE_LIMIT)? {
        let request = parse_request(&line)?;
        match answer(&request)? {
            Answer::Accept(t) => {
                write_reply(output, Reply::Accept)?;
                return Ok(Some((request, t)));
            }
            Answer::Decline => write_reply(output, Reply::Decline)?,
            Answer::Postpone => write_reply(output, Reply::Postpone)?,
        }
    }
    Ok(None)
}

/// Reads the inputs or outputs line sent after `# accept`: store paths
/// separated by spaces (with a trailing space from Guix and Nix 1.x).
pub fn read_paths(
    input: &mut dyn BufRead,
    dir: &StoreDir,
    what: &'static str,
) -> Result<BTreeSet<StorePath>, HookError> {
    let line = read_line(input, what, PATHS_LINE_LIMIT)?.ok_or(HookError::MissingLine { what })?;
    parse_paths(&line, dir, what)
}

/// Parses an inputs or outputs line (without its newline).
pub fn parse_paths(
    line: &str,
    dir: &StoreDir,
    what: &'static str,
) -> Result<BTreeSet<StorePath>, HookError> {
    line.split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| {
            dir.parse_path(p).map_err(|e| HookError::BadPaths {
                what,
                line: termsafe::quote_short(line),
                // The reason quotes the bad path, which may be long too.
                reason: termsafe::shorten(&e.to_string(), termsafe::QUOTE_MAX),
            })
        })
        .collect()
}

/// What a request is decided with: `machines`, the local facts of the
/// daemon's `system` (`kvm` as detected) and a policy that may offload,
/// with `local_when_busy` = `am_willing` (see the module docs).
pub fn placement(machines: Vec<Machine>, system: &str, kvm: bool, am_willing: bool) -> Placement {
    let mut local = LocalFacts::for_system(system, kvm);
    local.free_slot = am_willing;
    Placement {
        machines,
        local,
        policy: Policy {
            local_only: false,
            local_when_busy: am_willing,
        },
    }
}

/// The reply when a derivation is decided with every machine idle: a
/// decision to build locally or to fail can only stay so with the
/// machines' real slots and backoff (those only make machines unusable),
/// so it is a decline without touching the slot files; `None`: ask the
/// offloader, which takes a slot.
pub fn screen(idle_decision: &Decision) -> Option<Reply> {
    match idle_decision {
        Decision::Local { .. } | Decision::Fail { .. } => Some(Reply::Decline),
        Decision::Remote { .. } | Decision::Postpone { .. } => None,
    }
}

/// The exit status for a remote build that ended with `status`: 0 for a
/// success, [`EXIT_TIMED_OUT`] for a timeout, [`EXIT_BUILD_FAILED`] for
/// every other failure.
pub fn exit_code(status: BuildStatus) -> u8 {
    match status {
        BuildStatus::Built
        | BuildStatus::Substituted
        | BuildStatus::AlreadyValid
        | BuildStatus::ResolvesToAlreadyValid => 0,
        BuildStatus::TimedOut => EXIT_TIMED_OUT,
        _ => EXIT_BUILD_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/gnu/store/6m2ss4z7jhz1ya4vs4sk5mn5xmkg9yzg-hello-2.12.drv";

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_requests_as_the_daemons_write_them() {
        let r = parse_request(&format!("1 x86_64-linux {DRV} ")).expect("empty features");
        assert_eq!(
            r,
            Request {
                am_willing: true,
                system: "x86_64-linux".into(),
                drv_path: DRV.into(),
                features: BTreeSet::new(),
            }
        );
        let r = parse_request(&format!("0 aarch64-linux {DRV} kvm,big-parallel")).expect("ok");
        assert!(!r.am_willing);
        assert_eq!(r.system, "aarch64-linux");
        assert_eq!(r.features, set(&["big-parallel", "kvm"]));
        // Empty items vanish, as with Guix's string-tokenize.
        let r = parse_request(&format!("1 i686-linux {DRV} ,kvm,,")).expect("ok");
        assert_eq!(r.features, set(&["kvm"]));
        let r = parse_request(&format!("1 builtin {DRV} ")).expect("builtin");
        assert_eq!(r.system, "builtin");
    }

    #[test]
    fn an_endless_request_line_is_refused_at_the_limit() {
        // `io::repeat` never ends: reading the whole line would never return.
        let mut input = io::BufReader::new(io::repeat(b'x'));
        let e = serve_requests(&mut input, &mut Vec::new(), |_| {
            Ok::<_, HookError>(Answer::<()>::Decline)
        })
        .expect_err("refused");
        assert!(
            matches!(
                e,
                HookError::LineTooLong {
                    what: "request",
                    limit: REQUEST_LINE_LIMIT
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the daemon's request line is longer than the limit of 1 MiB"
        );
    }

    #[test]
    fn an_endless_paths_line_is_refused_at_the_limit() {
        let mut input = io::BufReader::new(io::repeat(b'/'));
        let e = read_paths(&mut input, &StoreDir::default(), "inputs").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the daemon's inputs line is longer than the limit of 64 MiB"
        );
    }

    #[test]
    fn bad_lines_are_quoted_short_and_escaped() {
        let long = format!("1 x86_64-linux {DRV} {}\x1b]0;t\x07", "k".repeat(100_000));
        let e = parse_request(&long).unwrap_err().to_string();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(!e.contains('\x1b'), "{e:?}");
        let line = format!("/nix/store/{}", "a".repeat(100_000));
        let e = parse_paths(&line, &StoreDir::default(), "outputs")
            .unwrap_err()
            .to_string();
        assert!(e.len() < 1024, "{} bytes: {}", e.len(), &e[..200]);
    }

    #[test]
    fn rejects_malformed_requests_naming_the_line() {
        let bad = [
            ("", "4 fields"),
            ("garbage", "4 fields"),
            (&format!("1 x86_64-linux {DRV}") as &str, "4 fields"),
            (&format!("2 x86_64-linux {DRV} "), "AM-WILLING"),
            (&format!("yes x86_64-linux {DRV} "), "AM-WILLING"),
            (&format!("1 X86_64-Linux {DRV} "), "SYSTEM"),
            (&format!("1  x86_64-linux {DRV} "), "SYSTEM"),
            ("1 x86_64-linux gnu/store/x-a.drv ", "DRV-PATH"),
            ("1 x86_64-linux /gnu/store/x-a ", "DRV-PATH"),
            ("1 x86_64-linux /.drv ", "DRV-PATH"),
            ("1 x86_64-linux /gnu/store/x-a\tb.drv ", "DRV-PATH"),
            (
                &format!("1 x86_64-linux {DRV} kvm big-parallel"),
                "FEATURES",
            ),
            (&format!("1 x86_64-linux {DRV}  "), "FEATURES"),
            (&format!("1 x86_64-linux {DRV} kvm\r"), "FEATURES"),
            (&format!("1 x86_64-linux {DRV} k\u{e9}"), "FEATURES"),
        ];
        for (line, field) in bad {
            let e = parse_request(line).expect_err(line);
            let msg = e.to_string();
            assert!(msg.starts_with("invalid request line"), "{msg}");
            assert!(msg.contains(&format!("{line:?}")), "names the line: {msg}");
            assert!(msg.contains(field), "{line:?}: {msg}");
        }
    }

    #[test]
    fn replies_are_lines_of_their_own() {
        let mut out = Vec::new();
        for r in [Reply::Decline, Reply::Postpone, Reply::Accept] {
            write_reply(&mut out, r).expect("write");
        }
        assert_eq!(out, b"# decline\n# postpone\n# accept\n");
        assert_eq!(Reply::Postpone.to_string(), "postpone");
    }

    fn answers(
        lines: &str,
        accept_at: Option<usize>,
    ) -> (Result<Option<(Request, usize)>, HookError>, String) {
        let mut input = io::Cursor::new(lines.as_bytes().to_vec());
        let mut output = Vec::new();
        let mut n = 0;
        let r = serve_requests(&mut input, &mut output, |_| -> Result<_, HookError> {
            n += 1;
            Ok(match (accept_at, n) {
                (Some(a), n) if a == n => Answer::Accept(n),
                (_, n) if n % 2 == 0 => Answer::Postpone,
                _ => Answer::Decline,
            })
        });
        (r, String::from_utf8(output).expect("utf-8"))
    }

    #[test]
    fn one_session_answers_until_it_accepts_or_input_ends() {
        let req = |d: &str| format!("1 x86_64-linux {d} \n");
        let three = [req(DRV), req(DRV), req(DRV)].concat();
        let (r, out) = answers(&three, None);
        assert!(r.expect("ok").is_none());
        assert_eq!(out, "# decline\n# postpone\n# decline\n");

        // Accepting stops reading requests: what follows is for the build.
        let more = format!("{three}/gnu/store/aaaa-in \n");
        let (r, out) = answers(&more, Some(2));
        let (request, n) = r.expect("ok").expect("accepted");
        assert_eq!((request.drv_path.as_str(), n), (DRV, 2));
        assert_eq!(out, "# decline\n# accept\n");

        // No newline at the end is still a line.
        let (r, out) = answers(&format!("0 x86_64-linux {DRV} kvm"), None);
        assert!(r.expect("ok").is_none());
        assert_eq!(out, "# decline\n");

        let (r, out) = answers(&format!("{}oops\n{}", req(DRV), req(DRV)), None);
        let e = r.expect_err("malformed");
        assert!(e.to_string().contains("\"oops\""), "{e}");
        assert_eq!(out, "# decline\n");
    }

    #[test]
    fn paths_lines() {
        let dir = StoreDir::new("/gnu/store").expect("store dir");
        let a = "/gnu/store/6m2ss4z7jhz1ya4vs4sk5mn5xmkg9yzg-a";
        let b = "/gnu/store/9d0cf4z9avnrpccj7wgaxa0x6vrkjbmp-b.drv";
        let paths = parse_paths(&format!("{a} {b} "), &dir, "inputs").expect("ok");
        let shown: Vec<String> = paths.iter().map(|p| dir.display(p)).collect();
        assert_eq!(shown, [a, b]);
        assert!(parse_paths("", &dir, "inputs").expect("empty").is_empty());
        let e =
            parse_paths(&format!("{a} /nix/store/x-b"), &dir, "outputs").expect_err("other store");
        assert!(e.to_string().starts_with("invalid outputs line"), "{e}");

        let mut input = io::Cursor::new(format!("{a} \n{b}\n").into_bytes());
        assert_eq!(
            read_paths(&mut input, &dir, "inputs")
                .expect("inputs")
                .len(),
            1
        );
        assert_eq!(
            read_paths(&mut input, &dir, "outputs")
                .expect("outputs")
                .len(),
            1
        );
        let e = read_paths(&mut input, &dir, "outputs").expect_err("eof");
        assert!(
            matches!(e, HookError::MissingLine { what: "outputs" }),
            "{e}"
        );
    }

    #[test]
    fn exit_codes_keep_the_failure_class() {
        assert_eq!(exit_code(BuildStatus::Built), 0);
        assert_eq!(exit_code(BuildStatus::AlreadyValid), 0);
        assert_eq!(exit_code(BuildStatus::TimedOut), 101);
        assert_eq!(exit_code(BuildStatus::PermanentFailure), 100);
        assert_eq!(exit_code(BuildStatus::MiscFailure), 100);
        assert_eq!(exit_code(BuildStatus::LogLimitExceeded), 100);
    }

    #[test]
    fn busy_machines_postpone_unless_the_daemon_is_willing() {
        use crate::decide::{decide, DrvFacts, MachineState};
        let machines = crate::decide::nix_format::parse(
            "ssh://b1 x86_64-linux - 1 1 kvm\n",
            "machines",
            "x86_64-linux",
            &crate::decide::nix_format::NoIncludes,
        )
        .expect("machines");
        let drv = |system: &str, features: &[&str]| DrvFacts {
            system: system.to_owned(),
            required_features: set(features),
            prefer_local: false,
        };
        let reply = |d: &DrvFacts, busy: bool, willing: bool| {
            let p = placement(machines.clone(), "x86_64-linux", false, willing);
            let states: Vec<MachineState<'_>> = p
                .machines
                .iter()
                .map(|m| MachineState {
                    slots_in_use: u32::from(busy),
                    ..MachineState::idle(m)
                })
                .collect();
            match decide(d, &states, &p.local, &p.policy) {
                Decision::Remote { .. } => Reply::Accept,
                Decision::Postpone { .. } => Reply::Postpone,
                other => screen(&other).expect("local or fail declines"),
            }
        };
        let x86 = drv("x86_64-linux", &[]);
        assert_eq!(reply(&x86, false, true), Reply::Accept);
        assert_eq!(reply(&x86, false, false), Reply::Accept);
        assert_eq!(reply(&x86, true, true), Reply::Decline);
        assert_eq!(reply(&x86, true, false), Reply::Postpone);
        // Buildable only there: waiting is the only way.
        let kvm = drv("x86_64-linux", &["kvm"]);
        assert_eq!(reply(&kvm, true, true), Reply::Postpone);
        // Nothing fits: the daemon decides.
        for willing in [true, false] {
            assert_eq!(
                reply(&drv("aarch64-linux", &[]), false, willing),
                Reply::Decline
            );
            assert_eq!(
                reply(&drv("x86_64-linux", &["cuda"]), false, willing),
                Reply::Decline
            );
        }
    }
}
