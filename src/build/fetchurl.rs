//! The built-in builder `builtin:fetchurl`, after Nix 2.8
//! (`libstore/builtins/fetchurl.cc`, `local-derivation-goal.cc`).
//!
//! Nix's `<nix/fetchurl.nix>` makes a fixed-output derivation whose builder
//! is `builtin:fetchurl`: no program runs, Nix itself downloads `url` to
//! `$out`, in its forked build child after that child dropped to the build
//! user (and, with `sandbox = true`, after it entered the fixed-output
//! chroot, which shares the host's network and holds nothing else of the
//! host). sandoff does the same in two halves:
//!
//! - [`run`] (the build, as root) execs sandoff's own binary as the hidden
//!   command `sandoff __builtin-fetchurl` under the build user (uid, gid, no
//!   supplementary groups: std's `Command` drops them when it changes the
//!   uid), with an empty environment but the `impureEnvVars` proxy
//!   variables the build may have, its output going to the build log,
//!   killed at the build's `--timeout`/`--max-silent-time` like any builder.
//!   The child's standard input is the build's scratch store directory,
//!   opened by root: the child `fchdir`s into it, so it can reach that one
//!   directory (group-writable for the build user) although the directories
//!   above it are root's alone, and writes the output there under its base
//!   name, exactly where [`super::local`] collects a builder's output.
//! - [`fetch`] (the child, as the build user) downloads and writes.
//!
//! The helper runs outside the chroot (as Nix with `sandbox = false`): it is
//! sandoff's own code, its only input the URLs, and it needs nothing but the
//! network, which a fixed-output build has anyway. For the same reason a
//! derivation's `file://` URL is refused: outside a chroot it would read
//! this machine's files (and a hash mismatch would tell their hash).
//!
//! What follows is the ordinary path of every build: the output must be
//! owned by the build user, it is copied into a staging path of the store
//! through its NAR, its hash is checked against the declared one (a wrong
//! hash fails naming both, and nothing is registered), and only then is it
//! registered. The download never writes into the store itself.
//!
//! # What is supported, as Nix 2.8
//!
//! - `url`: `http://` and `https://` (Nix's curl takes more; a `mirror://`
//!   URL is Nixpkgs' business and refused, saying so). TLS certificates are
//!   not verified, as Nix (`verifyTLS = false`): the trust is in the fixed
//!   hash, which is checked before anything is registered. Redirects are
//!   followed; `Content-Encoding` is not undone (Nix: `decompress = false`),
//!   the bytes are the server's.
//! - `unpack = "1"`: the download is a NAR, restored as the output (and
//!   first xz-decompressed when `url` ends in `.xz`, as Nix).
//! - `executable = "1"`: the output is made mode 0755.
//! - `impureEnvVars` proxies (`http_proxy`, `https_proxy`, `all_proxy`,
//!   upper or lower case), and `no_proxy` as curl reads it: a
//!   comma-separated list of host names, domains (a leading dot optional:
//!   `example.org` also covers `a.example.org`) and addresses, ports
//!   ignored, `*` for every host; a URL whose host is listed goes direct.
//!
//! # Where sandoff differs
//!
//! - `urls` (space separated): Nix 2.8 ignores it (only `nix-prefetch-url`
//!   reads it); sandoff tries its entries in order after `url` fails. The
//!   output is checked against the fixed hash either way, so a second URL
//!   can only turn a failure into the same success.
//! - No `hashed-mirrors` (empty by default in Nix) and no `netrc`.
//! - Timeouts: 30 s to connect and 300 s without a byte (Nix's default
//!   `stalled-download-timeout`), besides the build's own limits. There is no
//!   size limit (Nix has none either); the body is streamed to the file,
//!   never held in memory.
//! - Every other `builtin:NAME` is refused with a one-line error naming it.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::derivation::Derivation;
use crate::sandbox::plan::BuildUser;
use crate::sandbox::{BuildOutcome, TimeoutKind, Timeouts};
use crate::store::nar;

/// The hidden subcommand of the `sandoff` binary that [`run`] execs.
pub const SUBCOMMAND: &str = "__builtin-fetchurl";

/// How long connecting to a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a download may go without a byte (Nix's
/// `stalled-download-timeout` default).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a built-in builder could not run or a download failed.
#[derive(Debug, Error)]
pub enum FetchurlError {
    #[error("unsupported builtin builder '{0}' (sandoff implements only builtin:fetchurl)")]
    UnsupportedBuiltin(String),
    #[error("builtin:fetchurl needs a fixed-output derivation (outputHash): without a hash to check, a download is not reproducible")]
    NotFixedOutput,
    #[error("builtin:fetchurl: attribute '{0}' missing")]
    MissingAttr(&'static str),
    #[error("builtin:fetchurl: attribute '{attr}' is not UTF-8")]
    NotUtf8 { attr: &'static str },
    #[error("builtin:fetchurl: '{url}': mirror:// URLs are expanded by Nixpkgs' fetchurl, not by the built-in builder; give an http(s) URL")]
    Mirror { url: String },
    #[error("builtin:fetchurl: '{url}': unsupported URL scheme (only http:// and https://)")]
    Scheme { url: String },
    #[error("builtin:fetchurl: '{url}': file:// URLs are refused: the download runs outside the sandbox, where it would read this machine's files")]
    File { url: String },
    #[error("cannot download '{url}': {source}")]
    Download {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("cannot download '{url}': HTTP status {status} ({reason})")]
    Status {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("cannot read '{url}': {source}")]
    Read {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot unpack the NAR from '{url}': {source}")]
    Unpack {
        url: String,
        #[source]
        source: nar::NarError,
    },
    #[error("cannot xz-decompress '{url}': {reason}")]
    Xz { url: String, reason: String },
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the builtin:fetchurl helper '{}': {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[source] native_tls::Error),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> FetchurlError + 'a {
    move |source| FetchurlError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What to download and how to write it, from a derivation's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// `url`, then the other entries of `urls`, in order, without repeats.
    pub urls: Vec<String>,
    /// `unpack = "1"`: restore the download as a NAR.
    pub unpack: bool,
    /// `executable = "1"`: chmod 0755.
    pub executable: bool,
}

impl FetchRequest {
    /// The request of a `builtin:fetchurl` derivation; any other built-in
    /// builder, a derivation that is not fixed-output and unusable URLs are
    /// refused here, before a build user is taken.
    pub fn from_derivation(drv: &Derivation) -> Result<FetchRequest, FetchurlError> {
        if drv.builder != b"builtin:fetchurl" {
            let name = drv
                .builder
                .strip_prefix(b"builtin:")
                .unwrap_or(&drv.builder);
            return Err(FetchurlError::UnsupportedBuiltin(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        if !drv.is_fixed_output() {
            return Err(FetchurlError::NotFixedOutput);
        }
        let attr = |name: &'static str| -> Result<Option<&str>, FetchurlError> {
            drv.env
                .get(name.as_bytes())
                .map(|v| std::str::from_utf8(v).map_err(|_| FetchurlError::NotUtf8 { attr: name }))
                .transpose()
        };
        let main = attr("url")?.ok_or(FetchurlError::MissingAttr("url"))?;
        let mut urls = vec![main.to_owned()];
        for u in attr("urls")?.unwrap_or("").split_ascii_whitespace() {
            if !urls.iter().any(|have| have == u) {
                urls.push(u.to_owned());
            }
        }
        for u in &urls {
            if u.starts_with("file://") {
                return Err(FetchurlError::File { url: u.clone() });
            }
            check_url(u)?;
        }
        Ok(FetchRequest {
            urls,
            unpack: attr("unpack")? == Some("1"),
            executable: attr("executable")? == Some("1"),
        })
    }

    /// The arguments of [`SUBCOMMAND`] that carry this request.
    pub fn to_args(&self, output: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![SUBCOMMAND.into(), "--output".into(), output.into()];
        for u in &self.urls {
            args.push("--url".into());
            args.push(u.into());
        }
        if self.unpack {
            args.push("--unpack".into());
        }
        if self.executable {
            args.push("--executable".into());
        }
        args
    }
}

/// Checks a URL's scheme. [`fetch`] itself also reads `file://` URLs (for
/// tests, and for whoever runs the helper by hand, as themselves); a
/// derivation cannot ask for one ([`FetchRequest::from_derivation`]).
fn check_url(url: &str) -> Result<(), FetchurlError> {
    if url.starts_with("mirror://") {
        return Err(FetchurlError::Mirror {
            url: url.to_owned(),
        });
    }
    if ["http://", "https://", "file://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        Ok(())
    } else {
        Err(FetchurlError::Scheme {
            url: url.to_owned(),
        })
    }
}

/// The environment variables the helper honours (curl's proxy variables).
const PROXY_VARS: [&[u8]; 8] = [
    b"http_proxy",
    b"HTTP_PROXY",
    b"https_proxy",
    b"HTTPS_PROXY",
    b"all_proxy",
    b"ALL_PROXY",
    b"no_proxy",
    b"NO_PROXY",
];

/// One run of the helper: what [`run`] needs.
#[derive(Debug)]
pub struct FetchJob<'a> {
    /// sandoff's own binary, whose [`SUBCOMMAND`] is the helper.
    pub program: &'a Path,
    /// What to fetch.
    pub request: &'a FetchRequest,
    /// The build user to run as.
    pub user: &'a BuildUser,
    /// The build's scratch store directory.
    pub out_dir: &'a Path,
    /// The output's base name in `out_dir`.
    pub output: &'a str,
    /// The build's `impureEnvVars` values; only proxy variables pass.
    pub impure_env: &'a std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// The build's time limits.
    pub timeouts: Timeouts,
}

/// Runs [`fetch`] as the job's user through the job's program, the output
/// written in `out_dir`; the helper's messages go to `log`.
pub fn run(job: &FetchJob<'_>, log: &mut dyn Write) -> Result<BuildOutcome, FetchurlError> {
    let FetchJob {
        program,
        request,
        user,
        out_dir,
        output,
        impure_env,
        timeouts,
    } = *job;
    use std::os::unix::ffi::OsStrExt;
    // Opened by root; the child reaches the directory through this
    // descriptor only (see the module docs).
    let dir = File::open(out_dir).map_err(io_err("open", out_dir))?;
    let (read_end, write_end) = nix::unistd::pipe().map_err(|e| FetchurlError::Io {
        action: "create a pipe for",
        path: out_dir.to_owned(),
        source: e.into(),
    })?;
    let write_dup = write_end
        .try_clone()
        .map_err(io_err("duplicate a pipe for", out_dir))?;
    let mut cmd = Command::new(program);
    cmd.args(request.to_args(output))
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(dir)))
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_dup))
        .current_dir("/")
        .uid(user.uid())
        .gid(user.gid());
    for (k, v) in impure_env {
        if PROXY_VARS.contains(&k.as_slice()) {
            cmd.env(
                std::ffi::OsStr::from_bytes(k),
                std::ffi::OsStr::from_bytes(v),
            );
        }
    }
    let mut child = cmd.spawn().map_err(|source| FetchurlError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // The parent's copies of the pipe's write end go with `cmd`, so the
    // reader sees end-of-file when the child is gone.
    drop(cmd);
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut pipe = File::from(read_end);
        let mut buf = vec![0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    let start = Instant::now();
    let mut last_output = start;
    let mut timed_out = None;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => {
                last_output = Instant::now();
                let _ = log.write_all(&chunk);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The pipe is closed: the child is gone or closing.
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child
            .try_wait()
            .map_err(io_err("wait for the fetchurl helper of", out_dir))?
        {
            break status;
        }
        let now = Instant::now();
        let hit = match (timeouts.total, timeouts.max_silent) {
            (Some(t), _) if now.duration_since(start) >= t => Some((TimeoutKind::Total, t)),
            (_, Some(s)) if now.duration_since(last_output) >= s => Some((TimeoutKind::Silent, s)),
            _ => None,
        };
        if let Some(hit) = hit {
            let _ = child.kill();
            timed_out = Some(hit);
            break child
                .wait()
                .map_err(io_err("wait for the fetchurl helper of", out_dir))?;
        }
    };
    for chunk in rx.iter() {
        let _ = log.write_all(&chunk);
    }
    let _ = reader.join();
    Ok(match timed_out {
        Some((kind, after)) => BuildOutcome::TimedOut { kind, after },
        None => match (status.code(), status.signal()) {
            (Some(c), _) => BuildOutcome::Exited(c),
            (None, Some(s)) => BuildOutcome::Signaled(s),
            (None, None) => BuildOutcome::Exited(-1),
        },
    })
}

/// The helper's side: with the working directory given as standard input
/// (see [`run`]), downloads the request to `output` there, trying each URL
/// in turn; progress and failures of single URLs go to `log`.
pub fn fetch_in_stdin_dir(
    request: &FetchRequest,
    output: &str,
    log: &mut dyn Write,
) -> Result<(), FetchurlError> {
    nix::unistd::fchdir(io::stdin().as_raw_fd()).map_err(|e| FetchurlError::Io {
        action: "enter the output directory given as standard input",
        path: PathBuf::from("/dev/stdin"),
        source: e.into(),
    })?;
    fetch(request, Path::new(output), log)
}

/// Downloads the request to `out` (which must not exist), trying each URL
/// in turn; the last failure is returned when none works. A failed attempt
/// leaves nothing at `out`.
pub fn fetch(request: &FetchRequest, out: &Path, log: &mut dyn Write) -> Result<(), FetchurlError> {
    let tls = native_tls::TlsConnector::builder()
        // As Nix (verifyTLS = false): the fixed hash is checked afterwards.
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_hostnames(true)
        .build()
        .map_err(FetchurlError::Tls)?;
    let tls = std::sync::Arc::new(tls);
    let agent = |proxied: bool| {
        ureq::AgentBuilder::new()
            .tls_connector(std::sync::Arc::clone(&tls))
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(STALL_TIMEOUT)
            .try_proxy_from_env(proxied)
            .build()
    };
    let (proxied, direct) = (agent(true), agent(false));
    let no_proxy = std::env::var("no_proxy")
        .or_else(|_| std::env::var("NO_PROXY"))
        .unwrap_or_default();
    let mut last = None;
    for (i, url) in request.urls.iter().enumerate() {
        let _ = writeln!(log, "downloading '{url}'...");
        let agent = match url_host(url) {
            Some(host) if no_proxy_covers(&no_proxy, &host) => &direct,
            _ => &proxied,
        };
        match fetch_one(agent, request, url, out) {
            Ok(()) => return Ok(()),
            Err(e) => {
                remove_partial(out);
                // The last failure is the caller's to report.
                if i + 1 < request.urls.len() {
                    let _ = writeln!(log, "{e}; trying the next URL");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(FetchurlError::MissingAttr("url")))
}

/// The host of an `http(s)://[user@]host[:port]/...` URL, lower case,
/// without the brackets of an IPv6 address.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => host_port.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Whether curl's `no_proxy` list `list` covers `host` (see the module
/// docs).
fn no_proxy_covers(list: &str, host: &str) -> bool {
    list.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.trim_start_matches('.').to_ascii_lowercase();
        // A port in the entry ("host:8080") is ignored, as curl does; an
        // IPv6 address keeps its colons.
        let entry = match entry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or("").to_owned(),
            None if entry.matches(':').count() == 1 => {
                entry.split(':').next().unwrap_or("").to_owned()
            }
            None => entry,
        };
        !entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}")))
    })
}

fn remove_partial(out: &Path) {
    match fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(out);
        }
        Ok(_) => {
            let _ = fs::remove_file(out);
        }
        Err(_) => {}
    }
}

fn fetch_one(
    agent: &ureq::Agent,
    request: &FetchRequest,
    url: &str,
    out: &Path,
) -> Result<(), FetchurlError> {
    check_url(url)?;
    let body: Box<dyn Read + Send> = if let Some(path) = url.strip_prefix("file://") {
        Box::new(File::open(path).map_err(|source| FetchurlError::Read {
            url: url.to_owned(),
            source,
        })?)
    } else {
        match agent.get(url).call() {
            Ok(resp) => resp.into_reader(),
            Err(ureq::Error::Status(status, resp)) => {
                return Err(FetchurlError::Status {
                    url: url.to_owned(),
                    status,
                    reason: resp.status_text().to_owned(),
                })
            }
            Err(e) => {
                return Err(FetchurlError::Download {
                    url: url.to_owned(),
                    source: Box::new(e),
                })
            }
        }
    };
    if request.unpack {
        // Nix decides on the main URL's suffix, whichever URL is used.
        let xz = request.urls.first().is_some_and(|u| u.ends_with(".xz"));
        unpack(body, xz, url, out)?;
    } else {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(out)
            .map_err(io_err("create", out))?;
        let mut body = body;
        io::copy(&mut body, &mut file).map_err(|source| FetchurlError::Read {
            url: url.to_owned(),
            source,
        })?;
        file.sync_all().map_err(io_err("write", out))?;
    }
    if request.executable {
        fs::set_permissions(out, fs::Permissions::from_mode(0o755))
            .map_err(io_err("make executable", out))?;
    }
    Ok(())
}

/// Restores the NAR `body` (xz-compressed when `xz`) at `out`, streaming:
/// the decompressor runs on its own thread, writing into a pipe.
fn unpack(
    body: Box<dyn Read + Send>,
    xz: bool,
    url: &str,
    out: &Path,
) -> Result<(), FetchurlError> {
    let unpack_err = |source| FetchurlError::Unpack {
        url: url.to_owned(),
        source,
    };
    if !xz {
        let mut body = body;
        return nar::restore_whole(&mut body, out).map_err(unpack_err);
    }
    let (read_end, write_end) = nix::unistd::pipe().map_err(|e| FetchurlError::Io {
        action: "create a pipe for",
        path: out.to_owned(),
        source: e.into(),
    })?;
    let decompressor = std::thread::spawn(move || {
        let mut sink = File::from(write_end);
        lzma_rs::xz_decompress(&mut BufReader::new(body), &mut sink)
    });
    let restored = nar::restore_whole(&mut File::from(read_end), out);
    let decompressed = decompressor.join();
    match decompressed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            remove_partial(out);
            return Err(FetchurlError::Xz {
                url: url.to_owned(),
                reason: e.to_string(),
            });
        }
        Err(_) => {
            remove_partial(out);
            return Err(FetchurlError::Xz {
                url: url.to_owned(),
                reason: "the decompressor panicked".to_owned(),
            });
        }
    }
    restored.map_err(unpack_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_is_read_as_curl_reads_it() {
        assert_eq!(
            url_host("http://a.Example.org:8080/x").as_deref(),
            Some("a.example.org")
        );
        assert_eq!(url_host("https://u:p@h/x?q").as_deref(), Some("h"));
        assert_eq!(url_host("http://[::1]:80/").as_deref(), Some("::1"));
        assert_eq!(url_host("no scheme"), None);
        let covers = |list: &str, host: &str| no_proxy_covers(list, host);
        assert!(covers("example.org", "example.org"));
        assert!(covers("example.org", "a.example.org"));
        assert!(covers(".example.org", "a.example.org"));
        assert!(!covers("example.org", "badexample.org"));
        assert!(covers("localhost, 127.0.0.1:8080", "127.0.0.1"));
        assert!(covers("[::1]", "::1"));
        assert!(covers("*", "anything"));
        assert!(!covers("", "example.org"));
        assert!(!covers(" , ", "example.org"));
    }
    use crate::derivation::testdata::nix;

    /// Nix 2.8's `<nix/fetchurl.nix>` derivation (fixtures/drv, `hello.txt`).
    const HELLO_TXT: &[u8] = br#"Derive([("out","/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt","sha256","5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")],[],[],"builtin","builtin:fetchurl",[],[("builder","builtin:fetchurl"),("executable",""),("impureEnvVars","http_proxy https_proxy ftp_proxy all_proxy no_proxy"),("name","hello.txt"),("out","/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt"),("outputHash","5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("preferLocalBuild","1"),("system","builtin"),("unpack",""),("url","http://127.0.0.1:1/hello.txt"),("urls","http://127.0.0.1:1/hello.txt")])"#;

    fn hello() -> Derivation {
        Derivation::from_aterm(HELLO_TXT, &nix()).expect("parses")
    }

    #[test]
    fn reads_the_request_nix_writes() {
        let r = FetchRequest::from_derivation(&hello()).unwrap();
        assert_eq!(r.urls, ["http://127.0.0.1:1/hello.txt"]);
        assert!(!r.unpack && !r.executable);
        let args: Vec<String> = r
            .to_args("x")
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                SUBCOMMAND,
                "--output",
                "x",
                "--url",
                "http://127.0.0.1:1/hello.txt"
            ]
        );
    }

    #[test]
    fn urls_follow_url_without_repeats() {
        let mut d = hello();
        d.env.insert(
            b"urls".to_vec(),
            b"http://a/x  http://127.0.0.1:1/hello.txt\thttps://b/y".to_vec(),
        );
        d.env.insert(b"unpack".to_vec(), b"1".to_vec());
        d.env.insert(b"executable".to_vec(), b"1".to_vec());
        let r = FetchRequest::from_derivation(&d).unwrap();
        assert_eq!(
            r.urls,
            ["http://127.0.0.1:1/hello.txt", "http://a/x", "https://b/y"]
        );
        assert!(r.unpack && r.executable);
    }

    #[test]
    fn refuses_what_it_cannot_fetch() {
        let mut d = hello();
        d.builder = b"builtin:buildenv".to_vec();
        assert_eq!(
            FetchRequest::from_derivation(&d).unwrap_err().to_string(),
            "unsupported builtin builder 'buildenv' (sandoff implements only builtin:fetchurl)"
        );
        for (url, want) in [
            ("mirror://gnu/hello.tar.gz", "mirror:// URLs"),
            ("ftp://x/y", "unsupported URL scheme"),
            ("file:///etc/shadow", "file:// URLs are refused"),
        ] {
            let mut d = hello();
            d.env.insert(b"url".to_vec(), url.as_bytes().to_vec());
            let err = FetchRequest::from_derivation(&d).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let mut d = hello();
        d.env.remove(b"url".as_slice());
        assert!(matches!(
            FetchRequest::from_derivation(&d),
            Err(FetchurlError::MissingAttr("url"))
        ));
        let mut d = hello();
        let out = d.outputs.values().next().unwrap().path().unwrap().clone();
        d.outputs.insert(
            crate::derivation::OutputName::out(),
            crate::derivation::DerivationOutput::InputAddressed { path: out },
        );
        assert!(matches!(
            FetchRequest::from_derivation(&d),
            Err(FetchurlError::NotFixedOutput)
        ));
    }

    #[test]
    fn fetches_files_and_falls_back_to_the_next_url() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::write(&src, b"hello\n").unwrap();
        let out = tmp.path().join("out");
        let request = FetchRequest {
            urls: vec![
                format!("file://{}", tmp.path().join("missing").display()),
                format!("file://{}", src.display()),
            ],
            unpack: false,
            executable: true,
        };
        let mut log = Vec::new();
        fetch(&request, &out, &mut log).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"hello\n");
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("cannot read 'file://"), "{log}");
    }

    #[test]
    fn unpacks_nars_plain_and_xz() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("f"), b"content").unwrap();
        let mut nar_bytes = Vec::new();
        nar::dump(&tree, &mut nar_bytes).unwrap();
        fs::write(tmp.path().join("t.nar"), &nar_bytes).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &nar_bytes[..], &mut xz).unwrap();
        fs::write(tmp.path().join("t.nar.xz"), &xz).unwrap();
        for (name, out) in [("t.nar", "o1"), ("t.nar.xz", "o2")] {
            let request = FetchRequest {
                urls: vec![format!("file://{}", tmp.path().join(name).display())],
                unpack: true,
                executable: false,
            };
            let out = tmp.path().join(out);
            fetch(&request, &out, &mut io::sink()).unwrap();
            assert_eq!(fs::read(out.join("f")).unwrap(), b"content", "{name}");
        }
        // Not a NAR: nothing is left.
        let request = FetchRequest {
            urls: vec![format!("file://{}", tmp.path().join("tree/f").display())],
            unpack: true,
            executable: false,
        };
        let out = tmp.path().join("o3");
        let err = fetch(&request, &out, &mut io::sink()).unwrap_err();
        assert!(matches!(err, FetchurlError::Unpack { .. }), "{err}");
        assert!(!out.exists());
    }
}
