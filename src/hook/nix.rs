//! The build-hook protocol of nix-daemon 2.x, for `sandoff nix-build-hook
//! VERBOSITY` (run by the daemon as `sandoff-build-hook VERBOSITY`: its
//! `build-hook` setting names one program, and it passes the program's base
//! name as `argv[0]`). Recorded from Debian's nix-daemon 2.8; the bytes are
//! in this module's tests.
//!
//! Everything on the hook's stdin is in Nix's wire format
//! ([`crate::store::wire`]: `u64` little-endian, strings length-prefixed and
//! zero-padded to 8, a set as a count then its strings):
//!
//! 1. the daemon's settings, once: `1 NAME VALUE` for each (all of them,
//!    sorted by name, values as `nix show-config` prints them), then `0`
//!    ([`read_settings`], [`Config::from_settings`]);
//! 2. per derivation: `"try" AM-WILLING SYSTEM DRV-PATH FEATURES`, with
//!    AM-WILLING a `u64` (1: a local slot is free), FEATURES the
//!    derivation's `requiredSystemFeatures` as a string set
//!    ([`read_request`]); the end of input (or another word) ends the hook;
//! 3. after an accept: the input paths (a string set of store paths; empty
//!    for a derivation with no input derivations or sources), then the
//!    wanted outputs (a string set of output *names*, not paths), and stdin
//!    closes ([`read_accepted`]).
//!
//! The hook answers on **stderr**, where the daemon takes a line starting
//! with `# ` as the reply, a line `@nix {json}` as a structured log message
//! for the client (`{"action":"msg","level":0,"msg":...}` is shown to it),
//! and prints any other line on its own stderr only ([`Reply`],
//! [`JsonMessages`]). `# accept` is followed by one more line, the store
//! URI of the machine, which the daemon shows as `building '…' on '…'`.
//! `# decline-permanently` (no machines at all) makes the daemon stop
//! asking this hook. After the accept the build log goes to fd 4, and the
//! exit status says how it went, as for Nix 1.x (0, 100 failed, 101 timed
//! out, other: "hook failure").

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use thiserror::Error;

use super::Request;
use crate::store::wire::{self, WireError};

/// The longest setting name, setting value, system or path read.
pub const STRING_LIMIT: u64 = 1 << 20;

/// The most settings, features, inputs or outputs read.
pub const COUNT_LIMIT: u64 = 1 << 20;

/// Why the daemon's words could not be used.
#[derive(Debug, Error)]
pub enum NixHookError {
    /// The wire format broke while reading `what`.
    #[error("cannot read the daemon's {what}")]
    Wire {
        /// `settings`, `request`, `inputs` or `outputs`.
        what: &'static str,
        #[source]
        source: WireError,
    },
    /// A settings entry tag other than 0 (end) or 1 (one more).
    #[error("invalid settings entry tag {tag} (expected 0 or 1)")]
    BadSettingTag { tag: u64 },
    /// A setting with a value sandoff cannot use.
    #[error("invalid setting '{name}' = '{value}': {reason}")]
    BadSetting {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn wire(what: &'static str) -> impl FnOnce(WireError) -> NixHookError {
    move |source| NixHookError::Wire { what, source }
}

/// Reads the settings block: `(1 NAME VALUE)* 0`.
pub fn read_settings(r: &mut dyn Read) -> Result<BTreeMap<String, String>, NixHookError> {
    let mut settings = BTreeMap::new();
    loop {
        match wire::read_u64(r).map_err(wire("settings"))? {
            0 => return Ok(settings),
            1 => {
                let name = wire::read_string(r, STRING_LIMIT).map_err(wire("settings"))?;
                let value = wire::read_string(r, STRING_LIMIT).map_err(wire("settings"))?;
                settings.insert(name, value);
            }
            tag => return Err(NixHookError::BadSettingTag { tag }),
        }
        if settings.len() as u64 > COUNT_LIMIT {
            return Err(NixHookError::Wire {
                what: "settings",
                source: WireError::TooLong {
                    len: settings.len() as u64,
                    max: COUNT_LIMIT,
                },
            });
        }
    }
}

/// Reads one request, or `None` at the end of input or when the daemon
/// sends a word other than `try` (as `build-remote` ends then too).
pub fn read_request(r: &mut dyn Read) -> Result<Option<Request>, NixHookError> {
    // A clean end of input is only possible before the first byte.
    let mut first = [0u8; 1];
    loop {
        match r.read(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(wire("request")(WireError::Io(e))),
        }
    }
    let mut rest = io::Read::chain(&first[..], r);
    let word = wire::read_bytes(&mut rest, STRING_LIMIT).map_err(wire("request"))?;
    if word != b"try" {
        return Ok(None);
    }
    let am_willing = wire::read_bool(&mut rest).map_err(wire("request"))?;
    let system = wire::read_string(&mut rest, STRING_LIMIT).map_err(wire("request"))?;
    let drv_path = wire::read_string(&mut rest, STRING_LIMIT).map_err(wire("request"))?;
    let features =
        wire::read_string_set(&mut rest, COUNT_LIMIT, STRING_LIMIT).map_err(wire("request"))?;
    Ok(Some(Request {
        am_willing,
        system,
        drv_path,
        features,
    }))
}

/// What the daemon sends after an accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedData {
    /// The input paths (store paths, unchecked).
    pub inputs: BTreeSet<String>,
    /// The names of the outputs the daemon does not have yet.
    pub outputs: BTreeSet<String>,
}

/// Reads the inputs and the wanted outputs sent after `# accept`.
pub fn read_accepted(r: &mut dyn Read) -> Result<AcceptedData, NixHookError> {
    let inputs = wire::read_string_set(r, COUNT_LIMIT, STRING_LIMIT).map_err(wire("inputs"))?;
    let outputs = wire::read_string_set(r, COUNT_LIMIT, STRING_LIMIT).map_err(wire("outputs"))?;
    Ok(AcceptedData { inputs, outputs })
}

/// The hook's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Build it on the machine with this store URI.
    Accept { store_uri: String },
    /// The daemon builds it (or fails) itself.
    Decline,
    /// No machines at all: the daemon stops asking this hook.
    DeclinePermanently,
    /// Ask again later.
    Postpone,
}

impl Reply {
    /// The reply's lines, as written on stderr. A store URI with a line
    /// break would end the reply early: it is cut there (machines files
    /// hold one machine a line, so it cannot come from one).
    pub fn text(&self) -> String {
        match self {
            Reply::Accept { store_uri } => {
                let uri = store_uri.split(['\n', '\r']).next().unwrap_or_default();
                format!("# accept\n{uri}\n")
            }
            Reply::Decline => "# decline\n".to_owned(),
            Reply::DeclinePermanently => "# decline-permanently\n".to_owned(),
            Reply::Postpone => "# postpone\n".to_owned(),
        }
    }
}

/// `text` as one `@nix` message line that the daemon passes to its
/// client (a plain stderr line stays in the daemon's own log).
pub fn message_line(text: &str) -> String {
    message_line_at(0, text)
}

/// [`message_line`] at Nix's verbosity `level` (0 error, 1 warn, 2 notice,
/// 3 info, 4 talkative, 5 chatty, 6 debug, 7 vomit): the daemon shows it to
/// a client whose verbosity is at least that.
pub fn message_line_at(level: u8, text: &str) -> String {
    let json = serde_json::json!({"action": "msg", "level": level, "msg": text});
    format!("@nix {json}\n")
}

/// Nix's verbosity level of a `tracing` level: error 0, warn 1, info 4
/// (lvlTalkative: sandoff's info events say what it is doing, as Nix's
/// build-remote does at that level, "copying dependencies to …", and a
/// client sees them with `-v`), debug 6 (lvlDebug), trace 7 (lvlVomit).
pub fn nix_level(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 0,
        tracing::Level::WARN => 1,
        tracing::Level::INFO => 4,
        tracing::Level::DEBUG => 6,
        tracing::Level::TRACE => 7,
    }
}

/// The most verbose `tracing` level shown at Nix verbosity `verbosity`
/// (the hook's only argument): events whose [`nix_level`] is at most it.
pub fn tracing_level(verbosity: u8) -> tracing::Level {
    match verbosity {
        0 => tracing::Level::ERROR,
        1..=3 => tracing::Level::WARN,
        4 | 5 => tracing::Level::INFO,
        6 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    }
}

/// A writer that sends every complete line written to it on as a
/// [`message_line`] (the rest when dropped or flushed), so that code
/// writing plain messages reaches the daemon's client.
pub struct JsonMessages<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> JsonMessages<W> {
    /// Messages to `inner` (the hook's stderr).
    pub fn new(inner: W) -> JsonMessages<W> {
        JsonMessages {
            inner,
            pending: Vec::new(),
        }
    }

    fn emit(&mut self, line: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(line);
        self.inner.write_all(message_line(&text).as_bytes())
    }
}

impl<W: Write> Write for JsonMessages<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(n) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=n).collect();
            self.emit(&line[..n])?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line)?;
        }
        self.inner.flush()
    }
}

impl<W: Write> Drop for JsonMessages<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Where the machines come from: the daemon's `builders` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Builders {
    /// `@FILE`: a machines file.
    File(PathBuf),
    /// Machines lines, separated by `;` or newlines (empty: none).
    Inline(String),
}

/// The daemon's store, from its `store` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonStoreSetting {
    /// The store under this root: `/` for `auto`, `local`, or an empty
    /// value; `R` for a chroot store `R` or `local?root=R`.
    Local { root: PathBuf },
}

/// What the hook uses of the daemon's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub builders: Builders,
    /// `system`.
    pub system: String,
    /// `extra-platforms`.
    pub extra_platforms: Vec<String>,
    /// `system-features`.
    pub system_features: BTreeSet<String>,
    /// `max-jobs` (0: the daemon builds nothing itself; absent: 1).
    pub max_jobs: u64,
    /// `max-silent-time`, seconds (0: none).
    pub max_silent_time: u64,
    /// `timeout`, seconds (0: none).
    pub timeout: u64,
    /// `max-build-log-size`, bytes (0: none).
    pub max_log_size: u64,
    /// `builders-use-substitutes`: the machine substitutes the inputs it
    /// lacks from its own substituters before they are sent to it.
    pub builders_use_substitutes: bool,
    pub store: DaemonStoreSetting,
}

impl Config {
    /// The settings the hook needs; a missing one has Nix's default (an
    /// empty `builders`, no limits, the store `auto`), except `system`,
    /// which every daemon sends.
    pub fn from_settings(settings: &BTreeMap<String, String>) -> Result<Config, NixHookError> {
        let get = |name: &str| settings.get(name).map(String::as_str).unwrap_or("");
        let number = |name: &'static str| -> Result<u64, NixHookError> {
            let v = get(name);
            if v.is_empty() {
                return Ok(0);
            }
            v.parse().map_err(|_| NixHookError::BadSetting {
                name,
                value: v.to_owned(),
                reason: "not a number",
            })
        };
        // Nix's spellings of a boolean setting; absent is false.
        let boolean = |name: &'static str| -> Result<bool, NixHookError> {
            match get(name) {
                "" | "false" | "no" | "0" => Ok(false),
                "true" | "yes" | "1" => Ok(true),
                v => Err(NixHookError::BadSetting {
                    name,
                    value: v.to_owned(),
                    reason: "not a boolean",
                }),
            }
        };
        let system = get("system");
        if system.is_empty() {
            return Err(NixHookError::BadSetting {
                name: "system",
                value: String::new(),
                reason: "the daemon sent no system",
            });
        }
        let builders = get("builders").trim();
        let builders = match builders.strip_prefix('@') {
            Some(file) => Builders::File(PathBuf::from(file)),
            None => Builders::Inline(builders.replace(';', "\n")),
        };
        Ok(Config {
            builders,
            system: system.to_owned(),
            extra_platforms: get("extra-platforms")
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            system_features: get("system-features")
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            // Nix's default is 1; `auto` is the number of cores.
            max_jobs: match get("max-jobs") {
                "" | "auto" => 1,
                _ => number("max-jobs")?,
            },
            max_silent_time: number("max-silent-time")?,
            timeout: number("timeout")?,
            max_log_size: number("max-build-log-size")?,
            builders_use_substitutes: boolean("builders-use-substitutes")?,
            store: parse_store(get("store"))?,
        })
    }
}

/// The daemon's `store` setting as a local store root. Remote stores
/// (`daemon`, `unix://`, `ssh://`…) are refused: the hook writes the
/// outputs into the daemon's database itself.
pub fn parse_store(value: &str) -> Result<DaemonStoreSetting, NixHookError> {
    let bad = |reason| NixHookError::BadSetting {
        name: "store",
        value: value.to_owned(),
        reason,
    };
    let (base, query) = value.split_once('?').unwrap_or((value, ""));
    let root_param = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("root="))
        .filter(|r| !r.is_empty());
    let root = match base {
        "" | "auto" | "local" => root_param.unwrap_or("/"),
        path if path.starts_with('/') => {
            if root_param.is_some() {
                return Err(bad("a path store and a root= parameter"));
            }
            path
        }
        _ => {
            return Err(bad(
                "only a local store (auto, local, local?root=DIR, DIR) can be the hook's",
            ))
        }
    };
    if !root.starts_with('/') {
        return Err(bad("the store root must be an absolute path"));
    }
    Ok(DaemonStoreSetting::Local {
        root: PathBuf::from(root),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        wire::write_bytes(out, s.as_bytes()).expect("vec");
    }

    /// The bytes nix-daemon 2.8 (Debian 12's nix-bin) wrote to a recording
    /// hook for `derivation { system = "x86_64-linux"; requiredSystemFeatures
    /// = ["big" "kvm"]; … }` with `max-jobs = 0`, settings abridged: after
    /// the settings, `try`, AM-WILLING 0, the system, the .drv, the set.
    #[test]
    fn verbosity_shows_the_events_whose_nix_level_it_reaches() {
        use tracing::Level;
        for verbosity in 0..=9u8 {
            let most = tracing_level(verbosity);
            for level in [
                Level::ERROR,
                Level::WARN,
                Level::INFO,
                Level::DEBUG,
                Level::TRACE,
            ] {
                // tracing orders levels by verbosity, ERROR < … < TRACE.
                let shown = level <= most;
                assert_eq!(shown, nix_level(level) <= verbosity, "{verbosity} {level}");
            }
        }
        assert_eq!(
            message_line_at(6, "a \"b\""),
            "@nix {\"action\":\"msg\",\"level\":6,\"msg\":\"a \\\"b\\\"\"}\n"
        );
    }

    #[test]
    fn builders_use_substitutes_takes_nix_spellings_of_a_boolean() {
        let config = |v: &str| {
            let settings = [("system", "x86_64-linux"), ("builders-use-substitutes", v)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Config::from_settings(&settings)
        };
        for v in ["true", "yes", "1"] {
            assert!(config(v).expect(v).builders_use_substitutes, "{v}");
        }
        for v in ["", "false", "no", "0"] {
            assert!(!config(v).expect(v).builders_use_substitutes, "{v}");
        }
        let e = config("sometimes").expect_err("not a boolean");
        assert!(e.to_string().contains("builders-use-substitutes"), "{e}");
    }

    #[test]
    fn recorded_request_from_nix_daemon_2_8() {
        let mut bytes = Vec::new();
        for (k, v) in [
            ("builders", "@/tmp/nh/machines"),
            ("max-jobs", "0"),
            ("store", "/tmp/nh/root"),
            ("system", "x86_64-linux"),
        ] {
            wire::write_u64(&mut bytes, 1).expect("vec");
            string(&mut bytes, k);
            string(&mut bytes, v);
        }
        wire::write_u64(&mut bytes, 0).expect("vec");
        let request: &[u8] = b"\x03\x00\x00\x00\x00\x00\x00\x00try\x00\x00\x00\x00\x00\
            \x00\x00\x00\x00\x00\x00\x00\x00\
            \x0c\x00\x00\x00\x00\x00\x00\x00x86_64-linux\x00\x00\x00\x00\
            1\x00\x00\x00\x00\x00\x00\x00/nix/store/gdby02j6d2l6whfyagff2lff2k2cb0dn-x.drv\x00\x00\x00\x00\x00\x00\x00\
            \x02\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00big\x00\x00\x00\x00\x00\
            \x03\x00\x00\x00\x00\x00\x00\x00kvm\x00\x00\x00\x00\x00";
        bytes.extend_from_slice(request);
        // After `# accept`: no inputs, the output `out`.
        bytes.extend_from_slice(
            b"\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\
              \x03\x00\x00\x00\x00\x00\x00\x00out\x00\x00\x00\x00\x00",
        );
        let mut r = &bytes[..];
        let settings = read_settings(&mut r).expect("settings");
        let config = Config::from_settings(&settings).expect("config");
        assert_eq!(config.builders, Builders::File("/tmp/nh/machines".into()));
        assert_eq!(
            config.store,
            DaemonStoreSetting::Local {
                root: "/tmp/nh/root".into()
            }
        );
        let req = read_request(&mut r).expect("request").expect("one");
        assert_eq!(
            req,
            Request {
                am_willing: false,
                system: "x86_64-linux".into(),
                drv_path: "/nix/store/gdby02j6d2l6whfyagff2lff2k2cb0dn-x.drv".into(),
                features: ["big".to_owned(), "kvm".to_owned()].into(),
            }
        );
        let accepted = read_accepted(&mut r).expect("accepted");
        assert!(accepted.inputs.is_empty());
        assert_eq!(accepted.outputs, ["out".to_owned()].into());
        assert!(read_request(&mut r).expect("eof").is_none());
    }

    #[test]
    fn end_of_input_or_another_word_ends_the_requests() {
        assert!(read_request(&mut &b""[..]).expect("eof").is_none());
        let mut bytes = Vec::new();
        string(&mut bytes, "exit");
        assert!(read_request(&mut &bytes[..]).expect("word").is_none());
    }

    #[test]
    fn a_request_cut_short_is_an_error() {
        let mut bytes = Vec::new();
        string(&mut bytes, "try");
        wire::write_u64(&mut bytes, 1).expect("vec");
        assert!(matches!(
            read_request(&mut &bytes[..]),
            Err(NixHookError::Wire {
                what: "request",
                source: WireError::Truncated
            })
        ));
    }

    #[test]
    fn a_bad_settings_tag_is_refused() {
        let mut bytes = Vec::new();
        wire::write_u64(&mut bytes, 7).expect("vec");
        assert!(matches!(
            read_settings(&mut &bytes[..]),
            Err(NixHookError::BadSettingTag { tag: 7 })
        ));
    }

    fn config(pairs: &[(&str, &str)]) -> Result<Config, NixHookError> {
        let mut m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        m.entry("system".into())
            .or_insert_with(|| "x86_64-linux".into());
        Config::from_settings(&m)
    }

    #[test]
    fn settings_the_hook_uses() {
        let c = config(&[
            ("builders", "ssh://a x86_64-linux; ssh://b"),
            ("extra-platforms", "i686-linux x86_64-v1-linux"),
            ("system-features", "benchmark big-parallel kvm nixos-test"),
            ("max-silent-time", "30"),
            ("timeout", "60"),
            ("max-build-log-size", "0"),
            ("store", "auto"),
        ])
        .expect("config");
        assert_eq!(
            c.builders,
            Builders::Inline("ssh://a x86_64-linux\n ssh://b".into())
        );
        assert_eq!(c.extra_platforms, ["i686-linux", "x86_64-v1-linux"]);
        assert!(c.system_features.contains("kvm"));
        assert_eq!((c.max_silent_time, c.timeout), (30, 60));
        assert_eq!(c.max_jobs, 1, "Nix's default");
        assert_eq!(config(&[("max-jobs", "0")]).expect("config").max_jobs, 0);
        assert_eq!(c.store, DaemonStoreSetting::Local { root: "/".into() });
        assert!(matches!(
            config(&[("timeout", "soon")]),
            Err(NixHookError::BadSetting {
                name: "timeout",
                ..
            })
        ));
        assert!(matches!(
            Config::from_settings(&BTreeMap::new()),
            Err(NixHookError::BadSetting { name: "system", .. })
        ));
    }

    #[test]
    fn store_settings() {
        let local = |r: &str| DaemonStoreSetting::Local { root: r.into() };
        assert_eq!(parse_store("/tmp/r").expect("path"), local("/tmp/r"));
        assert_eq!(
            parse_store("local?root=/tmp/r").expect("root"),
            local("/tmp/r")
        );
        assert_eq!(parse_store("local").expect("local"), local("/"));
        assert_eq!(parse_store("").expect("empty"), local("/"));
        for bad in [
            "daemon",
            "unix:///s",
            "ssh://h",
            "local?root=rel",
            "/a?root=/b",
        ] {
            assert!(parse_store(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_and_messages() {
        let accept = Reply::Accept {
            store_uri: "ssh://h\n# decline".into(),
        };
        assert_eq!(accept.text(), "# accept\nssh://h\n");
        assert_eq!(Reply::DeclinePermanently.text(), "# decline-permanently\n");
        let mut out = Vec::new();
        {
            let mut m = JsonMessages::new(&mut out);
            write!(m, "sandoff: one\nsandoff: \"two\"").expect("write");
        }
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"sandoff: one\"}\n\
             @nix {\"action\":\"msg\",\"level\":0,\"msg\":\"sandoff: \\\"two\\\"\"}\n"
        );
    }
}
