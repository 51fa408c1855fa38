//! The one machine model that both machines-file formats parse into.
//!
//! Nix and Guix describe a build machine with different fields; sandoff keeps
//! the union, with the Guix-only ones in [`GuixExtras`], so that the decision
//! and the offloader see one type whatever file the machine came from.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use thiserror::Error;

/// Why a machine description was refused.
#[derive(Debug, Error, PartialEq)]
pub enum MachineError {
    #[error("machine name is empty")]
    EmptyName,
    // The name is not shown: a machines line may be a line of another file
    // read through an include (a secret), and its file and line are named.
    #[error("machine name contains whitespace or a control character")]
    BadNameChar { name: String },
    #[error("the host is not a host name (letters, digits, '.', '-', '_') or an IP address (not shown: it may come from a file that is not a machines file)")]
    BadHost,
    #[error("the user is not a user name (no '/', ':', spaces or control characters, not starting with '-'; not shown)")]
    BadUser,
    #[error("machine {machine}: speed factor {speed} is not a positive finite number")]
    BadSpeed { machine: String, speed: f64 },
    #[error(
        "compression level {level} is not a zstd level from {} to {}",
        Compression::MIN_LEVEL,
        Compression::MAX_LEVEL
    )]
    BadCompressionLevel { level: i64 },
}

/// A machine's identity: the Nix store URI as written (`ssh://nix@host`), or
/// the Guix `name` (a host name). It names the machine in decisions, logs and
/// slot-lock files, so it must be one printable word.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct MachineName(String);

impl MachineName {
    /// Checks that `name` is non-empty and holds no whitespace or control
    /// character (it becomes part of file names and one-line messages).
    pub fn new(name: &str) -> Result<MachineName, MachineError> {
        if name.is_empty() {
            return Err(MachineError::EmptyName);
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(MachineError::BadNameChar {
                name: name.to_owned(),
            });
        }
        Ok(MachineName(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks that `host` is something ssh can be given as a host: a host
/// name (ASCII letters, digits, `.`, `-`, `_`, not starting with `-` or
/// `.`, which ssh would take for an option or which no resolver has) or an
/// IP address (IPv6 without brackets, with an optional `%zone`). Anything
/// else in the host part of a machines line is a mistake, or a line of a
/// file that is not a machines file.
pub fn check_host(host: &str) -> Result<(), MachineError> {
    let name_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
    let ok = if host.contains(':') {
        let (addr, zone) = match host.split_once('%') {
            Some((a, z)) => (a, Some(z)),
            None => (host, None),
        };
        addr.parse::<std::net::Ipv6Addr>().is_ok()
            && zone.is_none_or(|z| !z.is_empty() && z.bytes().all(name_char))
    } else {
        !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && host.bytes().all(name_char)
    };
    if ok {
        Ok(())
    } else {
        Err(MachineError::BadHost)
    }
}

/// Checks that `user` can be an SSH login name: not empty, no `/`, `:`,
/// whitespace or control character, and not starting with `-`.
pub fn check_user(user: &str) -> Result<(), MachineError> {
    let ok = !user.is_empty()
        && !user.starts_with('-')
        && !user
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(MachineError::BadUser)
    }
}

/// Which file format a machine was read from; the offloader speaks the
/// matching protocol dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineFormat {
    /// A line of Nix's `machines` file (or `builders` setting).
    Nix,
    /// A `build-machine` record of Guix's `machines.scm`.
    Guix,
}

/// Whether the streams to a machine are compressed, as its entry asks.
///
/// What that means on the wire depends on the machine's serve program,
/// which only the remote layer knows
/// ([`crate::remote::compress::WireCompression`]): between sandoff peers
/// the protocol streams are zstd at `level` (negotiated on sandoff's
/// command line); a stock `nix-store --serve` speaks only plain bytes, so
/// with it "on" means SSH's own zlib compression, as Nix's `-C` and Guix's
/// guile-ssh do, and the level is libssh2's fixed one (zlib's fastest), not
/// this one.
///
/// The default for a Nix entry without `compress=` is [`Compression::Unset`]:
/// zstd at [`Compression::DEFAULT_LEVEL`] with sandoff, nothing with stock
/// Nix (Nix's own default). At that level (1) zstd compresses about 2.5
/// times as fast as a 1 Gbit/s link carries on one core, loaded (300 MB/s
/// against 125), so it does not slow such a link even in the client's one
/// sending thread, which also encrypts, and shrinks real closures to about
/// 40%, which is what a slower link gains; level 3 shrinks them only to 36%
/// and has about half the speed, too little headroom on a busy 2-core
/// machine (figures: `bench/offload/README.md`). SSH zlib is slower per
/// byte still: it is used only when asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never compress (`compress=false`; Guix `compression "none"`).
    Off,
    /// Compress (`compress=true`; Guix's default `"zlib@openssh.com,zlib"`,
    /// or any `compression` but `"none"`), zstd at `level` between sandoff
    /// peers (Guix's `compression-level` when given, else
    /// [`Compression::DEFAULT_LEVEL`]).
    On { level: i32 },
    /// Nothing asked (a Nix entry without `compress=`): zstd at
    /// [`Compression::DEFAULT_LEVEL`] between sandoff peers, none with a
    /// stock Nix serve program.
    Unset,
}

impl Compression {
    /// The zstd level used when an entry names none: measured to keep up
    /// with 1 Gbit/s on one core with room to spare
    /// (`bench/offload/README.md`).
    pub const DEFAULT_LEVEL: i32 = 1;
    /// The lowest level accepted (zstd's negative "fast" levels are left
    /// out: they trade most of the ratio away).
    pub const MIN_LEVEL: i32 = 1;
    /// The highest level accepted: past 19 zstd's "ultra" levels need
    /// windows of up to 128 MiB on both sides.
    pub const MAX_LEVEL: i32 = 19;

    /// [`Compression::On`] at `level`, if zstd has that level.
    pub fn on(level: i64) -> Result<Compression, MachineError> {
        match i32::try_from(level) {
            Ok(l) if (Self::MIN_LEVEL..=Self::MAX_LEVEL).contains(&l) => {
                Ok(Compression::On { level: l })
            }
            _ => Err(MachineError::BadCompressionLevel { level }),
        }
    }

    /// The zstd level between sandoff peers, `None` when off.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::Off => None,
            Compression::On { level } => Some(level),
            Compression::Unset => Some(Self::DEFAULT_LEVEL),
        }
    }

    /// Whether a stock Nix serve program is reached over SSH compression:
    /// only when asked for explicitly (Nix's default is off).
    pub fn ssh_zlib(self) -> bool {
        matches!(self, Compression::On { .. })
    }

    /// Guix's `compression` and `compression-level` fields: libssh's list
    /// of methods (`"none"` alone, or empty, or `"no"`, is off) and a level
    /// if one was given (Guix's own default, zlib level 3, is a zlib
    /// level for libssh: without one, zstd gets [`Compression::DEFAULT_LEVEL`]).
    pub fn from_guix(methods: &str, level: Option<i64>) -> Result<Compression, MachineError> {
        let off = methods
            .split(',')
            .map(str::trim)
            .all(|m| m.is_empty() || m == "none" || m == "no");
        match (off, level) {
            (true, _) => Ok(Compression::Off),
            (false, Some(level)) => Compression::on(level),
            (false, None) => Ok(Compression::On {
                level: Self::DEFAULT_LEVEL,
            }),
        }
    }
}

impl fmt::Display for Compression {
    /// `off`, `on:LEVEL`, or `default:LEVEL` (zstd at that level with
    /// sandoff, none with stock Nix).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::On { level } => write!(f, "on:{level}"),
            Compression::Unset => write!(f, "default:{}", Self::DEFAULT_LEVEL),
        }
    }
}

/// Fields only Guix's `build-machine` record has, with Guix's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GuixExtras {
    /// Normalized remote load (0.0 to 1.0) at or above which the machine is
    /// skipped; `None` (`#f`) disables the check. Guix's default is 0.8.
    pub overload_threshold: Option<f64>,
    /// libssh compression methods, default `"zlib@openssh.com,zlib"`, as
    /// written (what sandoff does with it is [`Machine::compression`]).
    pub compression: String,
    /// libssh compression level, default 3, as written.
    pub compression_level: i64,
    /// The remote guix-daemon socket, default `/var/guix/daemon-socket/socket`.
    pub daemon_socket: String,
}

impl Default for GuixExtras {
    fn default() -> GuixExtras {
        GuixExtras {
            overload_threshold: Some(0.8),
            compression: "zlib@openssh.com,zlib".to_owned(),
            compression_level: 3,
            daemon_socket: "/var/guix/daemon-socket/socket".to_owned(),
        }
    }
}

/// A build machine, as a machines file describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// Identity in decisions and lock files (see [`MachineName`]).
    pub name: MachineName,
    /// The format it came from.
    pub format: MachineFormat,
    /// The store URI to connect to, with its query parameters
    /// (`ssh://nix@host:2222?remote-program=/bin/nix-store`). For Guix
    /// machines it is made up from user, name and port.
    pub store_uri: String,
    /// The host to connect to (no user, port or brackets), if the URI has one.
    pub host: Option<String>,
    /// System types it builds, such as `x86_64-linux`.
    pub systems: BTreeSet<String>,
    /// SSH user; `None` leaves it to ssh.
    pub user: Option<String>,
    /// SSH port; `None` leaves it to ssh (22 or `~/.ssh/config`).
    pub port: Option<u16>,
    /// SSH identity file.
    pub private_key: Option<String>,
    /// Concurrent builds it takes (Nix `maxJobs`, Guix `parallel-builds`).
    /// Zero means it never has a free slot.
    pub max_jobs: u32,
    /// Relative speed, finite and > 0; higher is preferred.
    pub speed_factor: f64,
    /// Features it offers to derivations that require them.
    pub supported_features: BTreeSet<String>,
    /// Features a derivation must require to be built here (Nix only).
    pub mandatory_features: BTreeSet<String>,
    /// The expected SSH host key as an OpenSSH public-key line
    /// (`ssh-ed25519 AAAA... comment`); `None` trusts `known_hosts`.
    pub host_key: Option<String>,
    /// Whether and how hard the streams to it are compressed (Nix's
    /// `?compress=`, Guix's `compression` and `compression-level`).
    pub compression: Compression,
    /// Guix-only fields; `None` for Nix machines.
    pub guix: Option<GuixExtras>,
}

impl Machine {
    /// Checks the invariants that the decision relies on (a positive, finite
    /// speed factor, so that `load / speed` is always a number).
    pub fn check(&self) -> Result<(), MachineError> {
        if !(self.speed_factor.is_finite() && self.speed_factor > 0.0) {
            return Err(MachineError::BadSpeed {
                machine: self.name.to_string(),
                speed: self.speed_factor,
            });
        }
        Ok(())
    }

    /// `supported ∪ mandatory`: every feature a derivation may require here.
    pub fn all_features(&self) -> impl Iterator<Item = &String> {
        self.supported_features
            .iter()
            .chain(self.mandatory_features.iter())
    }

    /// The overload threshold, if the machine's format has one.
    pub fn overload_threshold(&self) -> Option<f64> {
        self.guix.as_ref().and_then(|g| g.overload_threshold)
    }
}

/// The JSON form of `sandoff machines list --json`, one object per machine.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineJson<'a> {
    name: &'a MachineName,
    systems: &'a BTreeSet<String>,
    user: &'a Option<String>,
    port: Option<u16>,
    private_key: &'a Option<String>,
    max_jobs: u32,
    speed_factor: f64,
    supported_features: &'a BTreeSet<String>,
    mandatory_features: &'a BTreeSet<String>,
    host_key: &'a Option<String>,
    compression: CompressionJson,
}

/// `compression` in `sandoff machines list --json`: `{"mode": "off"}`,
/// `{"mode": "on", "level": 3}` or `{"mode": "default", "level": 1}`.
#[derive(Serialize)]
struct CompressionJson {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    level: Option<i32>,
}

impl From<Compression> for CompressionJson {
    fn from(c: Compression) -> CompressionJson {
        let mode = match c {
            Compression::Off => "off",
            Compression::On { .. } => "on",
            Compression::Unset => "default",
        };
        CompressionJson {
            mode,
            level: c.zstd_level(),
        }
    }
}

/// The machines as the JSON array of `sandoff machines list --json`, with the
/// keys `name`, `systems`, `user`, `port`, `privateKey`, `maxJobs`,
/// `speedFactor`, `supportedFeatures`, `mandatoryFeatures`, `hostKey`,
/// `compression` (`{"mode": "off"|"on"|"default", "level": N}`).
pub fn to_json(machines: &[Machine]) -> serde_json::Value {
    let list: Vec<MachineJson<'_>> = machines
        .iter()
        .map(|m| MachineJson {
            name: &m.name,
            systems: &m.systems,
            user: &m.user,
            port: m.port,
            private_key: &m.private_key,
            max_jobs: m.max_jobs,
            speed_factor: m.speed_factor,
            supported_features: &m.supported_features,
            mandatory_features: &m.mandatory_features,
            host_key: &m.host_key,
            compression: m.compression.into(),
        })
        .collect();
    serde_json::to_value(list).expect("machine JSON has only string keys and finite numbers")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_names_and_ip_addresses() {
        for host in [
            "h",
            "b.example.org",
            "build-1.example.org",
            "under_score",
            "127.0.0.1",
            "::1",
            "2001:db8::1",
            "fe80::1%eth0",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(check_host(host), Ok(()), "{host}");
        }
    }

    #[test]
    fn rejects_hosts_that_are_not_host_names() {
        for host in [
            "",
            "-oProxyCommand=x",
            ".hidden",
            "a b",
            "a/b",
            "/etc/shadow",
            "a\x1b]0;t\x07",
            "root:$6$salt$hash:19000:0:99999:7:::",
            "::1%",
            "::g",
            "h\n",
            "ü.example",
        ] {
            assert_eq!(check_host(host), Err(MachineError::BadHost), "{host:?}");
        }
        assert!(!MachineError::BadHost.to_string().contains("shadow"));
    }

    #[test]
    fn checks_user_names() {
        for user in ["nix", "root", "first.last", "builder$", "a@b"] {
            assert_eq!(check_user(user), Ok(()), "{user}");
        }
        for user in ["", "-oX", "a/b", "a:b", "a b", "a\x07"] {
            assert_eq!(check_user(user), Err(MachineError::BadUser), "{user:?}");
        }
    }

    #[test]
    fn guix_compression_fields_map_to_compression() {
        let d = GuixExtras::default();
        // No level given: sandoff's default, not Guix's zlib level.
        assert_eq!(
            Compression::from_guix(&d.compression, None),
            Ok(Compression::On {
                level: Compression::DEFAULT_LEVEL
            })
        );
        for off in ["none", "", "no", "none,none"] {
            assert_eq!(
                Compression::from_guix(off, Some(3)),
                Ok(Compression::Off),
                "{off:?}"
            );
        }
        assert_eq!(
            Compression::from_guix("zlib", Some(9)),
            Ok(Compression::On { level: 9 })
        );
        // A level zstd has not is refused, unless compression is off.
        for level in [0, -1, 20, i64::MAX] {
            assert_eq!(
                Compression::from_guix("zlib", Some(level)),
                Err(MachineError::BadCompressionLevel { level })
            );
        }
        assert_eq!(
            Compression::from_guix("none", Some(0)),
            Ok(Compression::Off)
        );
    }

    #[test]
    fn compression_levels_per_peer() {
        assert_eq!(Compression::Off.zstd_level(), None);
        assert!(!Compression::Off.ssh_zlib());
        assert_eq!(
            Compression::Unset.zstd_level(),
            Some(Compression::DEFAULT_LEVEL)
        );
        assert!(!Compression::Unset.ssh_zlib());
        assert_eq!(Compression::On { level: 7 }.zstd_level(), Some(7));
        assert!(Compression::On { level: 7 }.ssh_zlib());
    }

    #[test]
    fn rejects_empty_and_spaced_names() {
        assert_eq!(MachineName::new(""), Err(MachineError::EmptyName));
        assert!(MachineName::new("a b").is_err());
        assert!(MachineName::new("a\nb").is_err());
        assert_eq!(
            MachineName::new("ssh://nix@host").map(|n| n.to_string()),
            Ok("ssh://nix@host".to_owned())
        );
    }
}
