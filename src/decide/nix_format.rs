//! Nix's machines format (`/etc/nix/machines`, the `builders` setting), read
//! as Nix (HEAD, `machines.cc`) reads it.
//!
//! Each line loses everything from its first `#`, then splits on `;` into
//! entries; entries are trimmed and blank ones skipped. An entry `@FILE`
//! splices in FILE's entries (a missing FILE is skipped, as in Nix; a
//! relative FILE is opened relative to the working directory, as Nix's
//! `readFile` does). Other entries are up to eight fields separated by spaces
//! or tabs; `-` or a missing field takes the default. Nix ignores fields past
//! the eighth, and so does this reader (with a warning).
//!
//! Nix itself has no guard against `@a` including itself; this reader refuses
//! include cycles and nesting deeper than [`MAX_INCLUDE_DEPTH`], and reads
//! at most [`MACHINES_FILE_LIMIT`] bytes for a file and all its includes
//! together (an include of `/dev/zero`, or one file included a million
//! times, would otherwise never end).
//!
//! Stricter than Nix: the store URI must be `ssh://` or `ssh-ng://` (a bare
//! `[user@]host` becomes `ssh://`, as in Nix) with a host name or IP
//! address as its host and a plain user name ([`super::machines::check_host`]).
//! `@/etc/shadow` makes each line of that file an entry; such a line is
//! refused by file and line number without being shown.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine as _;
use thiserror::Error;

use super::machines::{self, Compression, Machine, MachineError, MachineFormat, MachineName};
use crate::bounded::{self, BoundedError};
use crate::termsafe;

pub use crate::bounded::MACHINES_FILE_LIMIT;

/// How deep `@file` includes may nest before the reader gives up.
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// The eight fields, named as in Nix's documentation (used in errors).
const FIELD_NAMES: [&str; 8] = [
    "store URI",
    "systems",
    "SSH key",
    "maxJobs",
    "speedFactor",
    "supportedFeatures",
    "mandatoryFeatures",
    "public host key",
];

/// Why a Nix machines file was refused. Every variant names the file and
/// line (1-based) it is about.
#[derive(Debug, Error)]
pub enum NixMachinesError {
    #[error("{file}:{line}: field {field} (#{column}) '{value}' {why}")]
    BadField {
        file: String,
        line: usize,
        field: &'static str,
        column: usize,
        value: String,
        why: &'static str,
    },
    #[error("{file}:{line}: the store URI (first field) is missing")]
    MissingUri { file: String, line: usize },
    // The URI is not shown: the line may be a line of another file read
    // through an include (a password hash, a key), and file and line find it.
    #[error("{file}:{line}: the store URI (first field) is not valid: {why}")]
    BadUri {
        file: String,
        line: usize,
        uri: String,
        why: &'static str,
    },
    #[error("{file}:{line}: the store URI (first field) is not an ssh:// or ssh-ng:// URI or a host name (not shown); sandoff builds on other machines over SSH only")]
    NotSsh { file: String, line: usize },
    #[error("{file}:{line}: {source}")]
    Machine {
        file: String,
        line: usize,
        #[source]
        source: MachineError,
    },
    #[error("{file}:{line}: cannot read included machines file '{path}': {source}")]
    Include {
        file: String,
        line: usize,
        path: String,
        #[source]
        source: BoundedError,
    },
    #[error(
        "{file}:{line}: included machines file '{path}' takes the machines files past their limit of {} together",
        bounded::size(*limit)
    )]
    IncludesTooLarge {
        file: String,
        line: usize,
        path: String,
        limit: u64,
    },
    #[error("{file}:{line}: machines file '{path}' includes itself (cycle: {chain})")]
    IncludeCycle {
        file: String,
        line: usize,
        path: String,
        chain: String,
    },
    #[error("{file}:{line}: '@' includes nested deeper than {max}")]
    IncludeTooDeep {
        file: String,
        line: usize,
        max: usize,
    },
}

/// Reads the files named by `@file` entries. Passed in so that parsing stays
/// testable without touching the file system.
pub trait IncludeReader {
    /// The text of `path`, `Ok(None)` if it does not exist (Nix skips it);
    /// more than `limit` bytes is an error ([`BoundedError::TooLarge`]).
    fn read(&self, path: &str, limit: u64) -> Result<Option<String>, BoundedError>;
}

/// Reads includes from the file system, relative paths from the working
/// directory, as Nix does.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsIncludes;

impl IncludeReader for FsIncludes {
    /// Regular files only: a FIFO or device is an error, not a hang.
    fn read(&self, path: &str, limit: u64) -> Result<Option<String>, BoundedError> {
        match bounded::read_file_to_string(Path::new(path), limit) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A reader for text that must not include anything: every include is
/// reported missing and skipped (used by fuzzing and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIncludes;

impl IncludeReader for NoIncludes {
    fn read(&self, _path: &str, _limit: u64) -> Result<Option<String>, BoundedError> {
        Ok(None)
    }
}

/// What parsing carries through the includes: the chain of files being
/// read (for cycles and depth) and the bytes read so far (for the limit).
struct Includes<'a> {
    reader: &'a dyn IncludeReader,
    chain: Vec<String>,
    bytes: u64,
}

/// Parses a machines file. `file` names it in errors; `default_system` is the
/// `systems` of entries that leave that field out (Nix uses its own `system`,
/// not the extra platforms).
pub fn parse(
    text: &str,
    file: &str,
    default_system: &str,
    includes: &dyn IncludeReader,
) -> Result<Vec<Machine>, NixMachinesError> {
    let mut machines = Vec::new();
    let mut includes = Includes {
        reader: includes,
        chain: vec![file.to_owned()],
        bytes: text.len() as u64,
    };
    parse_into(text, file, default_system, &mut includes, &mut machines)?;
    Ok(machines)
}

fn parse_into(
    text: &str,
    file: &str,
    default_system: &str,
    includes: &mut Includes<'_>,
    out: &mut Vec<Machine>,
) -> Result<(), NixMachinesError> {
    for (index, raw_line) in text.split('\n').enumerate() {
        let line = index + 1;
        let uncommented = raw_line.split('#').next().unwrap_or("");
        for entry in uncommented.split(';') {
            let entry = entry.trim_matches(|c| " \t\r\n".contains(c));
            if entry.is_empty() {
                continue;
            }
            if let Some(path) = entry.strip_prefix('@') {
                let path = path.trim_matches(|c| " \t\r\n".contains(c));
                include(path, file, line, default_system, includes, out)?;
                continue;
            }
            out.push(parse_entry(entry, file, line, default_system)?);
        }
    }
    Ok(())
}

fn include(
    path: &str,
    file: &str,
    line: usize,
    default_system: &str,
    includes: &mut Includes<'_>,
    out: &mut Vec<Machine>,
) -> Result<(), NixMachinesError> {
    if includes.chain.iter().any(|p| p == path) {
        let mut names = includes.chain.clone();
        names.push(path.to_owned());
        return Err(NixMachinesError::IncludeCycle {
            file: file.to_owned(),
            line,
            path: path.to_owned(),
            chain: names.join(" -> "),
        });
    }
    if includes.chain.len() > MAX_INCLUDE_DEPTH {
        return Err(NixMachinesError::IncludeTooDeep {
            file: file.to_owned(),
            line,
            max: MAX_INCLUDE_DEPTH,
        });
    }
    let left = MACHINES_FILE_LIMIT.saturating_sub(includes.bytes);
    let text = includes
        .reader
        .read(path, left)
        .map_err(|source| match source {
            BoundedError::TooLarge { .. } => NixMachinesError::IncludesTooLarge {
                file: file.to_owned(),
                line,
                path: path.to_owned(),
                limit: MACHINES_FILE_LIMIT,
            },
            source => NixMachinesError::Include {
                file: file.to_owned(),
                line,
                path: path.to_owned(),
                source,
            },
        })?;
    let Some(text) = text else {
        tracing::debug!("cannot find machines file '{path}' (included from {file}:{line})");
        return Ok(());
    };
    includes.bytes += text.len() as u64;
    includes.chain.push(path.to_owned());
    let result = parse_into(&text, path, default_system, includes, out);
    includes.chain.pop();
    result
}

/// Parses one entry (one machine) of `file` at `line`.
fn parse_entry(
    entry: &str,
    file: &str,
    line: usize,
    default_system: &str,
) -> Result<Machine, NixMachinesError> {
    let tokens: Vec<&str> = entry.split([' ', '\t']).filter(|t| !t.is_empty()).collect();
    if tokens.len() > FIELD_NAMES.len() {
        tracing::warn!(
            "{file}:{line}: ignoring {} field(s) past the eighth, as Nix does",
            tokens.len() - FIELD_NAMES.len()
        );
    }
    let field = |i: usize| -> Option<&str> {
        tokens
            .get(i)
            .copied()
            .filter(|t| !t.is_empty() && *t != "-")
    };
    let bad = |i: usize, value: &str, why: &'static str| NixMachinesError::BadField {
        file: file.to_owned(),
        line,
        field: FIELD_NAMES[i],
        column: i + 1,
        // A token of the line, possibly huge: only its start is shown.
        value: termsafe::shorten(&value.escape_debug().to_string(), termsafe::QUOTE_MAX),
        why,
    };
    let Some(uri) = field(0) else {
        return Err(NixMachinesError::MissingUri {
            file: file.to_owned(),
            line,
        });
    };
    let store = StoreUri::parse(uri).map_err(|why| NixMachinesError::BadUri {
        file: file.to_owned(),
        line,
        uri: uri.to_owned(),
        why,
    })?;
    // Checked before anything else quotes the line: see `check_host`.
    let machine_err = |source| NixMachinesError::Machine {
        file: file.to_owned(),
        line,
        source,
    };
    let Some(host) = &store.host else {
        return Err(NixMachinesError::NotSsh {
            file: file.to_owned(),
            line,
        });
    };
    machines::check_host(host).map_err(machine_err)?;
    if let Some(user) = &store.user {
        machines::check_user(user).map_err(machine_err)?;
    }
    let systems = match field(1) {
        Some(s) => comma_set(s),
        None => BTreeSet::from([default_system.to_owned()]),
    };
    let max_jobs = match field(3) {
        Some(s) => parse_unsigned(s).ok_or_else(|| bad(3, s, "is not an unsigned integer"))?,
        None => 1,
    };
    let speed_factor = match field(4) {
        Some(s) => {
            let v = parse_float(s).ok_or_else(|| bad(4, s, "is not a number"))?;
            if v < 0.0 {
                return Err(bad(4, s, "is negative (speed factor must be >= 0)"));
            }
            // Nix reads 0 as "unset" and uses 1.
            if v == 0.0 {
                1.0
            } else {
                v
            }
        }
        None => 1.0,
    };
    let host_key = match field(7) {
        Some(s) => Some(decode_host_key(s).map_err(|why| bad(7, s, why))?),
        None => None,
    };
    let compression = store
        .compression()
        .map_err(|why| NixMachinesError::BadUri {
            file: file.to_owned(),
            line,
            uri: store.uri.clone(),
            why,
        })?;
    let name = MachineName::new(&store.uri).map_err(|source| NixMachinesError::Machine {
        file: file.to_owned(),
        line,
        source,
    })?;
    let machine = Machine {
        name,
        format: MachineFormat::Nix,
        store_uri: store.uri,
        host: store.host,
        systems,
        user: store.user,
        port: store.port,
        private_key: field(2).map(str::to_owned),
        max_jobs,
        speed_factor,
        supported_features: field(5).map(comma_set).unwrap_or_default(),
        mandatory_features: field(6).map(comma_set).unwrap_or_default(),
        host_key,
        compression,
        guix: None,
    };
    machine
        .check()
        .map_err(|source| NixMachinesError::Machine {
            file: file.to_owned(),
            line,
            source,
        })?;
    Ok(machine)
}

/// Nix's `tokenizeString(s, ",")`: empty items dropped, as a set.
fn comma_set(s: &str) -> BTreeSet<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Nix's `string2Int<unsigned int>`: decimal digits only (an optional `+`
/// is not accepted by Nix's `from_chars` either), within 32 bits.
fn parse_unsigned(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Nix's `string2Float<float>`: a decimal number; `inf`/`nan` refused here
/// since a speed factor must be a finite number.
fn parse_float(s: &str) -> Option<f64> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if !ok_chars || !s.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The host key field is the base64 of an OpenSSH public-key line; the model
/// keeps the decoded line.
fn decode_host_key(s: &str) -> Result<String, &'static str> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s))
        .map_err(|_| "is not valid base64")?;
    let text = String::from_utf8(bytes).map_err(|_| "does not decode to text")?;
    let line = text.trim_end_matches(['\n', '\r']).trim();
    if line.is_empty() || line.contains('\n') {
        return Err("does not decode to one OpenSSH public-key line");
    }
    Ok(line.to_owned())
}

/// The parts of a store URI that sandoff uses.
#[derive(Debug, PartialEq)]
pub struct StoreUri {
    /// The URI as Nix completes it: schemeless hosts get `ssh://`.
    pub uri: String,
    /// `ssh`, `ssh-ng`, or another store scheme (`""` for paths and the
    /// special words `auto`, `daemon`, `local`).
    pub scheme: String,
    /// The user before `@`, for `ssh`/`ssh-ng`.
    pub user: Option<String>,
    /// The host, without brackets, for `ssh`/`ssh-ng`.
    pub host: Option<String>,
    /// The port after the host, for `ssh`/`ssh-ng`.
    pub port: Option<u16>,
    /// The query parameters (`?remote-program=...&compress=true`), in order.
    pub params: Vec<(String, String)>,
}

impl StoreUri {
    /// Parses a store URI as the first field of a machines line.
    pub fn parse(written: &str) -> Result<StoreUri, &'static str> {
        // Nix's backwards compatibility rule: only a bare host gets `ssh://`.
        let special = ["auto", "daemon", "local"];
        let keep = written.contains("://")
            || written.contains('/')
            || special.contains(&written)
            || special
                .iter()
                .any(|w| written.starts_with(&format!("{w}?")))
            || written.starts_with('?');
        let uri = if keep {
            written.to_owned()
        } else {
            format!("ssh://{written}")
        };
        let (before_query, query) = match uri.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (uri.as_str(), None),
        };
        let params = query.map(parse_query).unwrap_or_default();
        let Some((scheme, authority)) = before_query.split_once("://") else {
            return Ok(StoreUri {
                scheme: String::new(),
                uri,
                user: None,
                host: None,
                port: None,
                params,
            });
        };
        if scheme != "ssh" && scheme != "ssh-ng" {
            return Ok(StoreUri {
                scheme: scheme.to_owned(),
                uri,
                user: None,
                host: None,
                port: None,
                params,
            });
        }
        if authority.contains('/') {
            return Err("an ssh store URI has no path");
        }
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(u.to_owned()), h),
            Some(_) => return Err("the user before '@' is empty"),
            None => (None, authority),
        };
        let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or("'[' without ']'")?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or("junk after ']'")?)),
            }
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                // Several colons without brackets: a bare IPv6 address.
                Some(_) => (host_port, None),
                None => (host_port, None),
            }
        };
        if host.is_empty() {
            return Err("the host is empty");
        }
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or("the port is not a number from 1 to 65535")?,
            ),
            None => None,
        };
        Ok(StoreUri {
            scheme: scheme.to_owned(),
            uri: uri.clone(),
            user,
            host: Some(host.to_owned()),
            port,
            params,
        })
    }
}

impl StoreUri {
    /// The `compress` parameter, read as Nix reads a Boolean setting
    /// (`true`/`yes`/`1`, `false`/`no`/`0`; the first one counts, as in
    /// Nix's `decodeQuery`): [`Compression::On`] at the default level,
    /// [`Compression::Off`], or [`Compression::Unset`] when absent.
    pub fn compression(&self) -> Result<Compression, &'static str> {
        let Some((_, value)) = self.params.iter().find(|(k, _)| k == "compress") else {
            return Ok(Compression::Unset);
        };
        match value.as_str() {
            "true" | "yes" | "1" => Ok(Compression::On {
                level: Compression::DEFAULT_LEVEL,
            }),
            "false" | "no" | "0" => Ok(Compression::Off),
            _ => Err("its compress= parameter is not a Boolean (true or false)"),
        }
    }
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn p(text: &str) -> Result<Vec<Machine>, NixMachinesError> {
        parse(text, "machines", "x86_64-linux", &NoIncludes)
    }

    struct MapIncludes(BTreeMap<&'static str, &'static str>);
    impl IncludeReader for MapIncludes {
        fn read(&self, path: &str, limit: u64) -> Result<Option<String>, BoundedError> {
            match self.0.get(path) {
                Some(s) if s.len() as u64 > limit => Err(BoundedError::TooLarge { limit }),
                Some(s) => Ok(Some((*s).to_owned())),
                None => Ok(None),
            }
        }
    }

    #[test]
    fn reads_all_eight_fields() {
        let key = base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAAC3 root@b\n");
        let m = p(&format!(
            "ssh://nix@b.example:2222 x86_64-linux,i686-linux /k 8 2.5 kvm,big-parallel benchmark {key}"
        ))
        .unwrap();
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert_eq!(m.name.as_str(), "ssh://nix@b.example:2222");
        assert_eq!(m.user.as_deref(), Some("nix"));
        assert_eq!(m.host.as_deref(), Some("b.example"));
        assert_eq!(m.port, Some(2222));
        assert_eq!(m.systems.len(), 2);
        assert_eq!(m.private_key.as_deref(), Some("/k"));
        assert_eq!(m.max_jobs, 8);
        assert_eq!(m.speed_factor, 2.5);
        assert!(m.supported_features.contains("kvm"));
        assert!(m.mandatory_features.contains("benchmark"));
        assert_eq!(m.host_key.as_deref(), Some("ssh-ed25519 AAAAC3 root@b"));
    }

    #[test]
    fn compress_parameter_sets_compression() {
        let c = |uri: &str| p(&format!("{uri} x86_64-linux")).map(|m| m[0].compression);
        assert_eq!(c("ssh://h").unwrap(), Compression::Unset);
        assert_eq!(c("h").unwrap(), Compression::Unset);
        for on in ["true", "yes", "1"] {
            assert_eq!(
                c(&format!("ssh://h?compress={on}")).unwrap(),
                Compression::On {
                    level: Compression::DEFAULT_LEVEL
                }
            );
        }
        for off in ["false", "no", "0"] {
            assert_eq!(
                c(&format!("ssh-ng://h?remote-program=x&compress={off}")).unwrap(),
                Compression::Off
            );
        }
        // The first one counts, as in Nix.
        assert_eq!(
            c("ssh://h?compress=false&compress=true").unwrap(),
            Compression::Off
        );
        let e = c("ssh://h?compress=maybe").unwrap_err();
        assert!(e.to_string().contains("compress= parameter"), "{e}");
        assert!(
            matches!(e, NixMachinesError::BadUri { line: 1, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn dashes_and_missing_fields_take_defaults() {
        let m = &p("host - - - -").unwrap()[0];
        assert_eq!(m.name.as_str(), "ssh://host");
        assert_eq!(
            m.systems,
            BTreeSet::from(["x86_64-linux".to_owned()]),
            "default system is the local one"
        );
        assert_eq!((m.max_jobs, m.speed_factor), (1, 1.0));
        assert_eq!((m.user.as_ref(), m.port), (None, None));
    }

    #[test]
    fn splits_on_semicolons_and_strips_comments() {
        let m = p("a x86_64-linux ; b aarch64-linux # c i686-linux ; d\n# e\n\n  f\t;;").unwrap();
        let names: Vec<_> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["ssh://a", "ssh://b", "ssh://f"]);
    }

    #[test]
    fn zero_speed_means_one_and_negative_is_refused() {
        assert_eq!(p("a - - 1 0").unwrap()[0].speed_factor, 1.0);
        let e = p("\na - - 1 -2").unwrap_err().to_string();
        assert!(
            e.starts_with("machines:2: field speedFactor (#5) '-2'"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_max_jobs_with_line_and_field() {
        let e = p("a x86_64-linux\nb x86_64-linux - eight").unwrap_err();
        assert_eq!(
            e.to_string(),
            "machines:2: field maxJobs (#4) 'eight' is not an unsigned integer"
        );
        assert!(p("a - - -1").is_err());
    }

    #[test]
    fn quotes_a_long_bad_field_short() {
        let e = p(&format!("a - - {}", "9x".repeat(100_000)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(e.starts_with("machines:1: field maxJobs (#4) '9x9x"), "{e}");
    }

    #[test]
    fn rejects_bad_host_key() {
        let e = p("a - - - - - - !!!").unwrap_err().to_string();
        assert!(
            e.contains("public host key (#8) '!!!' is not valid base64"),
            "{e}"
        );
    }

    #[test]
    fn ignores_fields_past_the_eighth() {
        assert_eq!(p("a - - - - - - - extra more").unwrap().len(), 1);
    }

    #[test]
    fn store_uri_forms() {
        let u = StoreUri::parse("ssh-ng://u@[::1]:22?remote-program=/bin/nix-daemon&compress=true")
            .unwrap();
        assert_eq!(u.scheme, "ssh-ng");
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.port, Some(22));
        assert_eq!(
            u.params[0],
            ("remote-program".into(), "/bin/nix-daemon".into())
        );
        assert_eq!(StoreUri::parse("u@h").unwrap().uri, "ssh://u@h");
        assert_eq!(StoreUri::parse("local").unwrap().scheme, "");
        assert_eq!(StoreUri::parse("daemon?x=1").unwrap().uri, "daemon?x=1");
        assert_eq!(StoreUri::parse("unix:///s").unwrap().scheme, "unix");
        assert!(StoreUri::parse("ssh://h:99999").is_err());
        assert!(StoreUri::parse("ssh://@h").is_err());
    }

    #[test]
    fn includes_splice_and_missing_ones_are_skipped() {
        let inc = MapIncludes(BTreeMap::from([("/etc/more", "b\n@/nowhere\nc")]));
        let m = parse("a\n@/etc/more\nd", "machines", "x86_64-linux", &inc).unwrap();
        let names: Vec<_> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["ssh://a", "ssh://b", "ssh://c", "ssh://d"]);
    }

    #[test]
    fn refuses_include_cycles() {
        let inc = MapIncludes(BTreeMap::from([("/a", "x\n@/b"), ("/b", "@/a")]));
        let e = parse("@/a", "machines", "s", &inc).unwrap_err().to_string();
        assert_eq!(
            e,
            "/b:1: machines file '/a' includes itself (cycle: machines -> /a -> /b -> /a)"
        );
    }

    #[test]
    fn includes_share_one_byte_limit() {
        // One small file included many times: each read alone is small,
        // together they pass the limit.
        let big: &'static str = format!("#{}", "x".repeat((1 << 20) - 1)).leak();
        let inc = MapIncludes(BTreeMap::from([("/big", big)]));
        let text = "@/big\n".repeat(20);
        let e = parse(&text, "machines", "s", &inc).unwrap_err().to_string();
        assert_eq!(
            e,
            "machines:16: included machines file '/big' takes the machines files past their limit of 16 MiB together"
        );
    }

    #[test]
    fn accepts_every_valid_host_form() {
        let m = p("ssh://nix@b.example:2222 ; ssh-ng://builder@arm.example.org:22?remote-program=/run/current-system/sw/bin/nix-daemon ; host ; user@host ; ssh://[::1]:22 ; ssh://[fe80::1%eth0] ; 10.0.0.2 ; ::1 ; under_score.example")
            .expect("valid");
        let hosts: Vec<_> = m.iter().map(|m| m.host.as_deref().unwrap_or("")).collect();
        assert_eq!(
            hosts,
            [
                "b.example",
                "arm.example.org",
                "host",
                "host",
                "::1",
                "fe80::1%eth0",
                "10.0.0.2",
                "::1",
                "under_score.example"
            ]
        );
    }

    #[test]
    fn a_line_of_an_included_secret_is_refused_without_showing_it() {
        // `@/etc/shadow`: its lines become machines lines. A hash with `/`
        // reads as a store path, one without as a host; neither is shown.
        let inc = MapIncludes(BTreeMap::from([(
            "/etc/shadow",
            "root:$6$salt$hash:19000:0:99999:7:::\nnix:$y$j9T$s4lt/s3cret:19000::::::",
        )]));
        let e = parse("@/etc/shadow", "machines", "s", &inc).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/shadow:1: the host is not a host name"),
            "{msg}"
        );
        assert!(!msg.contains("salt") && !msg.contains("root"), "{msg}");
        let inc = MapIncludes(BTreeMap::from([(
            "/etc/shadow",
            "nix:$y$j9T$s4lt/s3cret:19000::::::",
        )]));
        let msg = parse("@/etc/shadow", "machines", "s", &inc)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("/etc/shadow:1: the store URI (first field) is not an ssh://"),
            "{msg}"
        );
        assert!(!msg.contains("s3cret") && !msg.contains("nix:"), "{msg}");
    }

    #[test]
    fn refuses_hosts_and_users_that_are_not_names() {
        for entry in [
            "ssh://a%2Fb",
            "ssh://-oProxyCommand=sh",
            "ssh://h\x1b]0;t\x07",
            "ssh://[::g]:22",
            "ssh://-x@h",
            "local",
            "unix:///run/nix/socket",
            "/some/store",
        ] {
            let e = p(&format!("ok\n{entry}")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("machines:2: "), "{entry}: {msg}");
            assert!(!msg.contains(entry), "{msg}");
        }
    }

    #[test]
    fn errors_in_included_files_name_that_file() {
        let inc = MapIncludes(BTreeMap::from([("/a", "ok\nbad - - x")]));
        let e = parse("@/a", "machines", "s", &inc).unwrap_err().to_string();
        assert!(e.starts_with("/a:2: field maxJobs"), "{e}");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics(text in "[a-z@:/?=;#\\- \t\n,.0-9+]{0,120}") {
            let _ = parse(&text, "machines", "x86_64-linux", &NoIncludes);
        }

        #[test]
        fn accepted_machines_keep_invariants(
            // `auto`, `daemon` and `local` name stores, not hosts (refused
            // as not SSH, see `refuses_hosts_and_users_that_are_not_names`).
            host in "[a-z]{1,8}".prop_filter("a store's name, not a host", |h| {
                !matches!(h.as_str(), "auto" | "daemon" | "local")
            }),
            jobs in "[0-9]{1,3}|-",
            speed in "[0-9]{1,2}(\\.[0-9])?|-",
        ) {
            let m = parse(&format!("{host} x86_64-linux - {jobs} {speed}"), "m", "s", &NoIncludes).unwrap();
            prop_assert!(m[0].check().is_ok());
        }
    }
}
