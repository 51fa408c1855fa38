//! The client side of the serve protocol, over any [`Transport`]: a
//! sandoff server or a stock `nix-store --serve --write` (Nix 2.8).
//!
//! Every reply is awaited with [`Transport::wait_reply`], which drains the
//! server's stderr meanwhile: for builds into the caller's log, otherwise
//! into a small tail kept here. A Nix serve process that fails prints
//! `error: …` on stderr and exits, so when a reply does not come the tail is
//! the diagnosis ([`ClientError::Refused`]) rather than a bare end of stream.
//! A sandoff server that refuses the client's store directory before the
//! handshake says so in a line recognised here ([`ClientError::StoreDir`]).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::transport::Transport;
use crate::derivation::Derivation;
use crate::serve_protocol::{
    self, write_basic_derivation, BuildOptions, BuildResult, ProtocolError, StoreDirMismatch,
    WireContext, MAX_ERROR_MSG, MAX_ITEMS, MAX_STRING,
};
use crate::serve_protocol::{SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION};
use crate::store::signature::Signature;
use crate::store::wire::{self, WireError};
use crate::store::{ContentAddress, Hash, HashAlgo, StoreDir, StorePath, ValidPathInfo};

/// Why a serve session failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server did not answer the handshake with `SERVE_MAGIC_2`
    /// (a shell banner? not a serve server?); `got` holds what it sent.
    #[error("the remote program does not speak the serve protocol (got {got:?})")]
    Handshake { got: String },
    /// The server refused before the handshake because its store directory
    /// is not the client's (`sandoff serve --expect-store-dir`).
    #[error(transparent)]
    StoreDir(StoreDirMismatch),
    /// The server speaks a major version other than 2, or older than 2.4.
    #[error("unsupported serve protocol version {major}.{minor}")]
    Version { major: u64, minor: u64 },
    /// Reading or writing failed: the link or the server is gone.
    #[error("serve protocol: {what}")]
    Wire {
        what: &'static str,
        #[source]
        source: WireError,
    },
    /// A structured value was malformed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The server refused a request (e.g. ImportPaths did not answer 1).
    #[error("the server refused {what}: {reason}")]
    Refused { what: &'static str, reason: String },
    /// The reply did not come before the deadline.
    #[error("no reply to {what} before the deadline")]
    TimedOut { what: &'static str },
}

use crate::serve_protocol::cmd;

/// How much of the server's stderr is kept to explain a failure.
const TAIL_MAX: usize = 4096;
/// How long the handshake waits for the rest of a non-protocol greeting.
const BANNER_WAIT: Duration = Duration::from_millis(500);
/// How much of a non-protocol greeting is shown.
const BANNER_MAX: usize = 256;

/// An open serve session.
///
/// Each method writes one command, flushes, and reads the whole reply, so
/// the session stays in step. After any error the stream may be out of step
/// (e.g. half a NAR read): drop the session.
pub struct ServeClient<T: Transport> {
    transport: T,
    /// Negotiated minor version (major is 2).
    minor: u64,
    dir: StoreDir,
    /// The last bytes the server wrote to stderr while we waited, to explain
    /// a reply that never came (Nix's serve prints `error: …` and exits).
    tail: Vec<u8>,
}

/// A session whose client greeting is sent and whose server greeting is
/// not read yet ([`ServeClient::hello`]).
///
/// A request written here goes out right behind the greeting, so that the
/// server finds it waiting once it has greeted: one round trip less than
/// greeting, waiting, then asking (10 ms on a 1 Gbit/s, 10 ms link, 40 ms on
/// a 100 Mbit/s, 40 ms one). Only requests that read the same in every
/// protocol version the client accepts (2.4 on) may go before the version
/// is known. A stock `nix-store --serve` reads its stdin in order, so it
/// sees nothing different. The server's answer is read after its greeting
/// ([`Hello::greeted`]), with the method that reads that answer.
pub struct Hello<T: Transport> {
    client: ServeClient<T>,
    /// The first write that failed. A program that exits at once (not
    /// found, refused) makes the writes fail with a broken pipe; what it
    /// printed explains more, so the error waits until the greeting has
    /// been read.
    sent: Result<(), ClientError>,
}

impl<T: Transport> Hello<T> {
    /// The transport, e.g. to start compressing what is sent next.
    pub fn transport(&mut self) -> &mut T {
        &mut self.client.transport
    }

    /// Sends `QueryValidPaths` (the same in every version from 2.4); read
    /// its answer with [`ServeClient::valid_paths_answer`] once greeted.
    pub fn query_valid_paths(&mut self, paths: &BTreeSet<StorePath>, lock: bool, substitute: bool) {
        if self.sent.is_ok() {
            self.sent = self.client.send_query_valid_paths(paths, lock, substitute);
        }
    }

    /// Reads the server's greeting: the session, once it is the serve
    /// protocol in a version this client speaks.
    pub fn greeted(self, deadline: Option<Instant>) -> Result<ServeClient<T>, ClientError> {
        const WHAT: &str = "handshake";
        let Hello {
            client: mut c,
            sent,
        } = self;
        // Read the magic bytewise by hand: if it is not there, what came
        // instead (a shell banner, an error) is the diagnosis.
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        while got.len() < 8 {
            let waited = c.transport.wait_reply(
                &mut Tee {
                    log: &mut io::sink(),
                    tail: &mut c.tail,
                },
                deadline,
            );
            match waited {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(ClientError::TimedOut { what: WHAT });
                }
                Err(_) => break,
            }
            match c.transport.read(&mut buf[..8 - got.len()]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        if got.len() < 8 || got[..8] != SERVE_MAGIC_2.to_le_bytes() {
            return Err(c.handshake_failed(got));
        }
        sent?;
        let version = wire::read_u64(&mut c.transport).map_err(wire_err(WHAT))?;
        let (major, minor) = (
            serve_protocol::major(version),
            serve_protocol::minor(version),
        );
        if major != 2 || minor < 4 {
            return Err(ClientError::Version { major, minor });
        }
        c.minor = minor.min(serve_protocol::minor(SERVE_PROTOCOL_VERSION));
        tracing::debug!(
            server_version = version,
            minor = c.minor,
            "serve session opened"
        );
        Ok(c)
    }
}

/// Copies the server's stderr to the caller's log and keeps its tail.
struct Tee<'a> {
    log: &'a mut dyn Write,
    tail: &'a mut Vec<u8>,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.log.write(buf)?;
        self.tail.extend_from_slice(&buf[..n]);
        if self.tail.len() > TAIL_MAX {
            let excess = self.tail.len() - TAIL_MAX;
            self.tail.drain(..excess);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

impl WireContext for ClientError {
    fn wire(what: &'static str, source: WireError) -> ClientError {
        ClientError::Wire { what, source }
    }
}

/// [`serve_protocol::wire_err`] with the client's error, so that `?` knows it.
fn wire_err(what: &'static str) -> impl FnOnce(WireError) -> ClientError {
    serve_protocol::wire_err(what)
}

fn invalid(what: &'static str, reason: String) -> ClientError {
    ClientError::Protocol(ProtocolError::Invalid { what, reason })
}

impl<T: Transport> ServeClient<T> {
    /// Opens a session: handshake, offering protocol 2.7.
    pub fn open(transport: T, dir: StoreDir) -> Result<ServeClient<T>, ClientError> {
        ServeClient::open_until(transport, dir, None)
    }

    /// [`ServeClient::open`], giving up with [`ClientError::TimedOut`] if
    /// the server has not greeted by `deadline` (a remote program that
    /// waits for something else, e.g. a password prompt).
    pub fn open_until(
        transport: T,
        dir: StoreDir,
        deadline: Option<Instant>,
    ) -> Result<ServeClient<T>, ClientError> {
        ServeClient::hello(transport, dir).greeted(deadline)
    }

    /// Sends the client's greeting and returns without waiting for the
    /// server's: requests written now (see [`Hello`]) travel with it.
    pub fn hello(transport: T, dir: StoreDir) -> Hello<T> {
        let mut client = ServeClient {
            transport,
            minor: 0,
            dir,
            tail: Vec::new(),
        };
        let t = &mut client.transport;
        let sent = wire::write_u64(t, SERVE_MAGIC_1)
            .and_then(|()| wire::write_u64(t, SERVE_PROTOCOL_VERSION))
            .and_then(|()| t.flush().map_err(WireError::from))
            .map_err(wire_err("handshake"));
        Hello { client, sent }
    }

    /// The greeting was not `SERVE_MAGIC_2`: gather a little more of it
    /// (and the server's stderr) to say what the remote program is.
    fn handshake_failed(mut self, mut got: Vec<u8>) -> ClientError {
        let deadline = Instant::now() + BANNER_WAIT;
        let mut buf = [0u8; BANNER_MAX];
        while !got.is_empty() && got.len() < BANNER_MAX {
            let mut tee = Tee {
                log: &mut io::sink(),
                tail: &mut self.tail,
            };
            if self.transport.wait_reply(&mut tee, Some(deadline)).is_err() {
                break;
            }
            match self.transport.read(&mut buf[..BANNER_MAX - got.len()]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let mut tee = Tee {
            log: &mut io::sink(),
            tail: &mut self.tail,
        };
        let _ = self.transport.drain_log(&mut tee);
        let mut text = String::from_utf8_lossy(&got).trim().to_owned();
        let stderr = String::from_utf8_lossy(&self.tail).trim().to_owned();
        if let Some(mismatch) = StoreDirMismatch::find(&stderr, &self.dir) {
            return ClientError::StoreDir(mismatch);
        }
        if !stderr.is_empty() {
            if text.is_empty() {
                text = format!("nothing; stderr: {stderr}");
            } else {
                text = format!("{text}; stderr: {stderr}");
            }
        }
        ClientError::Handshake { got: text }
    }

    /// The negotiated minor version.
    pub fn minor(&self) -> u64 {
        self.minor
    }

    /// The store directory paths are named in.
    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    /// The transport, to drain its log or close it.
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    /// `QueryValidPaths`: which of `paths` are valid on the server. `lock`
    /// asks it to protect them from garbage collection for the session.
    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        self.send_query_valid_paths(paths, lock, substitute)?;
        self.valid_paths_answer()
    }

    /// The answer to a `QueryValidPaths` sent before (by
    /// [`Hello::query_valid_paths`]).
    pub fn valid_paths_answer(&mut self) -> Result<BTreeSet<StorePath>, ClientError> {
        const WHAT: &str = "QueryValidPaths";
        self.quick_reply(WHAT)?;
        self.get_paths(WHAT)
    }

    fn send_query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<(), ClientError> {
        const WHAT: &str = "QueryValidPaths";
        self.command(WHAT, cmd::QUERY_VALID_PATHS)?;
        self.put_bool(WHAT, lock)?;
        self.put_bool(WHAT, substitute)?;
        self.put_paths(WHAT, paths)?;
        self.send(WHAT)
    }

    /// `QueryPathInfos`: what the server knows of `paths` (unknown ones are
    /// left out). `registration_time` is 0 and `ultimate` false: the
    /// protocol does not carry them. Signatures that do not parse are
    /// dropped with a warning.
    pub fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ValidPathInfo>, ClientError> {
        const WHAT: &str = "QueryPathInfos";
        self.command(WHAT, cmd::QUERY_PATH_INFOS)?;
        self.put_paths(WHAT, paths)?;
        self.send(WHAT)?;
        self.quick_reply(WHAT)?;
        let mut infos = Vec::new();
        loop {
            let path = self.get_string(WHAT)?;
            if path.is_empty() {
                break;
            }
            if infos.len() >= paths.len() {
                return Err(invalid(
                    WHAT,
                    format!("more answers than the {} paths asked for", paths.len()),
                ));
            }
            let path = self.parse_path(WHAT, &path)?;
            let deriver = self.get_string(WHAT)?;
            let deriver = if deriver.is_empty() {
                None
            } else {
                Some(self.parse_path(WHAT, &deriver)?)
            };
            let references = self.get_paths(WHAT)?;
            let _download_size = self.get_u64(WHAT)?;
            let nar_size = self.get_u64(WHAT)?;
            // `open` refuses servers older than 2.4, so these are always there.
            let hash = self.get_string(WHAT)?;
            let nar_hash = Hash::parse_any_prefixed(&hash)
                .ok()
                .filter(|h| h.algo() == HashAlgo::Sha256)
                .ok_or_else(|| {
                    invalid(
                        WHAT,
                        format!("'{path}': NAR hash '{hash}' is not a sha256 hash"),
                    )
                })?;
            let ca = self.get_string(WHAT)?;
            let ca =
                if ca.is_empty() {
                    None
                } else {
                    Some(ca.parse::<ContentAddress>().map_err(|e| {
                        invalid(WHAT, format!("'{path}': content address '{ca}': {e}"))
                    })?)
                };
            let sigs = wire::read_string_set(&mut self.transport, MAX_ITEMS, MAX_STRING)
                .map_err(wire_err(WHAT))?;
            let mut signatures = BTreeSet::new();
            for s in sigs {
                match s.parse::<Signature>() {
                    Ok(sig) => {
                        signatures.insert(sig);
                    }
                    Err(e) => tracing::warn!(%path, "dropping a signature: {e}"),
                }
            }
            infos.push(ValidPathInfo {
                path,
                deriver,
                nar_hash,
                nar_size,
                references,
                registration_time: 0,
                ultimate: false,
                signatures,
                ca,
            });
        }
        Ok(infos)
    }

    /// `DumpStorePath`: the NAR of `path`, handed to `read_nar`, which must
    /// read exactly one NAR from the reader it gets (e.g.
    /// `LocalStore::stage_nar`).
    pub fn dump_store_path<R, E>(
        &mut self,
        path: &StorePath,
        read_nar: impl FnOnce(&mut dyn Read) -> Result<R, E>,
    ) -> Result<Result<R, E>, ClientError> {
        const WHAT: &str = "DumpStorePath";
        self.command(WHAT, cmd::DUMP_STORE_PATH)?;
        self.put_path(WHAT, path)?;
        self.send(WHAT)?;
        self.quick_reply(WHAT)?;
        match read_nar(&mut self.transport) {
            Ok(r) => Ok(Ok(r)),
            Err(e) => self.server_said(WHAT).map_or(Ok(Err(e)), Err),
        }
    }

    /// `ImportPaths`: `write_export` writes one export stream (paths in
    /// dependency order, then the end marker); the server must answer 1.
    pub fn import_paths<E>(
        &mut self,
        write_export: impl FnOnce(&mut dyn Write) -> Result<(), E>,
    ) -> Result<Result<(), E>, ClientError> {
        self.import_paths_to(|t| write_export(t))
    }

    /// [`ServeClient::import_paths`] with the transport itself to write
    /// the export stream to (e.g. compressed elsewhere, see
    /// [`crate::remote::compress::ZstdTransport::write_compressed`]).
    pub fn import_paths_to<E>(
        &mut self,
        write_export: impl FnOnce(&mut T) -> Result<(), E>,
    ) -> Result<Result<(), E>, ClientError> {
        const WHAT: &str = "ImportPaths";
        self.command(WHAT, cmd::IMPORT_PATHS)?;
        if let Err(e) = write_export(&mut self.transport) {
            // A server that stopped reading (and so broke the pipe) says why.
            return self.server_said(WHAT).map_or(Ok(Err(e)), Err);
        }
        self.send(WHAT)?;
        self.quick_reply(WHAT)?;
        match self.get_u64(WHAT)? {
            1 => Ok(Ok(())),
            n => Err(ClientError::Refused {
                what: WHAT,
                reason: format!("it answered {n}, not 1"),
            }),
        }
    }

    /// `QueryClosure`.
    pub fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        const WHAT: &str = "QueryClosure";
        self.command(WHAT, cmd::QUERY_CLOSURE)?;
        self.put_bool(WHAT, include_outputs)?;
        self.put_paths(WHAT, paths)?;
        self.send(WHAT)?;
        self.quick_reply(WHAT)?;
        self.get_paths(WHAT)
    }

    /// `BuildDerivation`: builds `drv` (at `drv_path`) with `input_srcs` as
    /// its whole input closure, copying the server's log into `log` as it
    /// comes, until the result or `deadline`.
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
        input_srcs: &BTreeSet<StorePath>,
        options: &BuildOptions,
        log: &mut dyn Write,
        deadline: Option<Instant>,
    ) -> Result<BuildResult, ClientError> {
        const WHAT: &str = "BuildDerivation";
        self.command(WHAT, cmd::BUILD_DERIVATION)?;
        self.put_path(WHAT, drv_path)?;
        write_basic_derivation(&mut self.transport, &self.dir, drv, input_srcs)?;
        options.write(&mut self.transport, self.minor)?;
        self.send(WHAT)?;
        self.long_reply(WHAT, log, deadline)?;
        BuildResult::read(&mut self.transport, self.minor, &self.dir).map_err(|e| match e {
            ProtocolError::Wire { source, .. } => self.failed(WHAT, source),
            e => ClientError::Protocol(e),
        })
    }

    /// `BuildPaths` of `.drv` paths valid on the server: `Ok(())`, or the
    /// status and message it answered.
    pub fn build_paths(
        &mut self,
        drvs: &[StorePath],
        options: &BuildOptions,
        log: &mut dyn Write,
        deadline: Option<Instant>,
    ) -> Result<Result<(), (u64, String)>, ClientError> {
        const WHAT: &str = "BuildPaths";
        self.command(WHAT, cmd::BUILD_PATHS)?;
        let dir = &self.dir;
        wire::write_strings(&mut self.transport, drvs.iter().map(|p| dir.display(p)))
            .map_err(wire_err(WHAT))?;
        options.write(&mut self.transport, self.minor)?;
        self.send(WHAT)?;
        self.long_reply(WHAT, log, deadline)?;
        let status = self.get_u64(WHAT)?;
        if status == 0 {
            return Ok(Ok(()));
        }
        let msg = wire::read_bytes(&mut self.transport, MAX_ERROR_MSG)
            .map_err(|e| self.failed(WHAT, e))?;
        Ok(Err((status, String::from_utf8_lossy(&msg).into_owned())))
    }

    /// Ends the session, giving the transport back.
    pub fn into_transport(self) -> T {
        self.transport
    }

    fn command(&mut self, what: &'static str, number: u64) -> Result<(), ClientError> {
        tracing::debug!(command = what, "serve request");
        self.tail.clear();
        wire::write_u64(&mut self.transport, number).map_err(wire_err(what))
    }

    fn put_bool(&mut self, what: &'static str, b: bool) -> Result<(), ClientError> {
        wire::write_bool(&mut self.transport, b).map_err(wire_err(what))
    }

    fn put_path(&mut self, what: &'static str, path: &StorePath) -> Result<(), ClientError> {
        wire::write_bytes(&mut self.transport, self.dir.display(path).as_bytes())
            .map_err(wire_err(what))
    }

    fn put_paths(
        &mut self,
        what: &'static str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ClientError> {
        let dir = &self.dir;
        wire::write_strings(&mut self.transport, paths.iter().map(|p| dir.display(p)))
            .map_err(wire_err(what))
    }

    fn send(&mut self, what: &'static str) -> Result<(), ClientError> {
        self.transport
            .flush()
            .map_err(|e| self.failed(what, e.into()))
    }

    /// Waits for the start of a reply that comes at once, keeping the
    /// server's stderr (usually nothing) for error messages.
    fn quick_reply(&mut self, what: &'static str) -> Result<(), ClientError> {
        self.long_reply(what, &mut io::sink(), None)
    }

    /// Waits for the start of a reply, copying the server's stderr to `log`.
    fn long_reply(
        &mut self,
        what: &'static str,
        log: &mut dyn Write,
        deadline: Option<Instant>,
    ) -> Result<(), ClientError> {
        let mut tee = Tee {
            log,
            tail: &mut self.tail,
        };
        match self.transport.wait_reply(&mut tee, deadline) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(ClientError::TimedOut { what }),
            Err(e) => Err(self.failed(what, e.into())),
        }
    }

    /// The error for a reply that failed: what the server said on stderr
    /// if anything (it prints `error: …` before it exits), else the cause.
    fn failed(&mut self, what: &'static str, source: WireError) -> ClientError {
        self.server_said(what)
            .unwrap_or(ClientError::Wire { what, source })
    }

    /// [`ClientError::Refused`] with what the server wrote to stderr since
    /// the command was sent, if it wrote anything.
    fn server_said(&mut self, what: &'static str) -> Option<ClientError> {
        let mut tee = Tee {
            log: &mut io::sink(),
            tail: &mut self.tail,
        };
        // Best effort: this only adds words to an error already at hand.
        let _ = self.transport.drain_log(&mut tee);
        let text = String::from_utf8_lossy(&self.tail);
        // The last lines: after a build these follow its log.
        let lines: Vec<&str> = text.trim().lines().collect();
        let said = lines[lines.len().saturating_sub(10)..].join("\n");
        (!said.is_empty()).then_some(ClientError::Refused { what, reason: said })
    }

    fn get_u64(&mut self, what: &'static str) -> Result<u64, ClientError> {
        wire::read_u64(&mut self.transport).map_err(|e| self.failed(what, e))
    }

    fn get_string(&mut self, what: &'static str) -> Result<String, ClientError> {
        wire::read_string(&mut self.transport, MAX_STRING).map_err(|e| self.failed(what, e))
    }

    fn parse_path(&self, what: &'static str, s: &str) -> Result<StorePath, ClientError> {
        self.dir
            .parse_path(s)
            .map_err(|e| invalid(what, format!("bad store path '{s}': {e}")))
    }

    fn get_paths(&mut self, what: &'static str) -> Result<BTreeSet<StorePath>, ClientError> {
        let n =
            wire::read_count(&mut self.transport, MAX_ITEMS).map_err(|e| self.failed(what, e))?;
        (0..n)
            .map(|_| {
                let s = self.get_string(what)?;
                self.parse_path(what, &s)
            })
            .collect()
    }
}
