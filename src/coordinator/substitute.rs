//! Fetching a closure from a binary cache over HTTP into a local store,
//! as agents fetch their inputs from the coordinator's cache.
//!
//! Nothing from the network is trusted: a narinfo is read with a size
//! limit and parsed strictly, must name the path asked for and carry a
//! signature by a trusted key; its references are followed the same way.
//! Each NAR is checked on the compressed bytes (`FileSize`, `FileHash`),
//! decompressed as it streams into a staging directory of the store (never
//! held whole in memory), and checked again on the NAR (`NarHash`,
//! `NarSize`, content address); only then is the whole closure committed,
//! references first, in one batch. A failure anywhere commits nothing.
//!
//! Blocking code (ureq); the caller gives the `ureq::Agent`, and with it
//! the TLS roots and timeouts.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufReader, Read};
use std::time::Duration;

use thiserror::Error;

use super::cache::narinfo::{Compression, NarInfo, NarInfoError, MAX_NARINFO_SIZE};
use crate::store::hash::HashingReader;
use crate::store::local::{LocalStore, StagedPath, StoreError};
use crate::store::signature::TrustedKeys;
use crate::store::{HashAlgo, StoreDir, StorePath, ValidPathInfo};

/// Why a closure could not be fetched.
#[derive(Debug, Error)]
pub enum SubstituteError {
    #[error("cache {base}: '{path}' is not in the cache (404)")]
    NotFound { base: String, path: String },
    #[error("cache {base}: GET {url} answered {status}")]
    Status {
        base: String,
        url: String,
        status: u16,
    },
    #[error("cache {base}: GET {url} failed")]
    Transport {
        base: String,
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("cache {base}: reading {url} failed")]
    Read {
        base: String,
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cache {base}: {url} is larger than {MAX_NARINFO_SIZE} bytes")]
    NarInfoTooLarge { base: String, url: String },
    #[error("cache {base}: {url}")]
    NarInfo {
        base: String,
        url: String,
        #[source]
        source: NarInfoError,
    },
    #[error("cache {base}: {url} describes '{got}', not '{expected}'")]
    WrongPath {
        base: String,
        url: String,
        expected: String,
        got: String,
    },
    #[error("cache {base}: signature of '{path}' is not by a trusted key")]
    Untrusted { base: String, path: String },
    #[error("cache {base}: the narinfo of '{path}' has no {field}, which sandoff needs to check the download")]
    MissingField {
        base: String,
        path: String,
        field: &'static str,
    },
    #[error("cache {base}: file size mismatch for '{path}': the narinfo says {expected}, got {got} (or more)")]
    FileSizeMismatch {
        base: String,
        path: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "cache {base}: file hash mismatch for '{path}': the narinfo says {expected}, got {got}"
    )]
    FileHashMismatch {
        base: String,
        path: String,
        expected: String,
        got: String,
    },
    #[error(
        "cache {base}: NAR hash mismatch for '{path}': the narinfo says {expected}, got {got}"
    )]
    NarHashMismatch {
        base: String,
        path: String,
        expected: String,
        got: String,
    },
    #[error(
        "cache {base}: NAR size mismatch for '{path}': the narinfo says {expected}, got {got}"
    )]
    NarSizeMismatch {
        base: String,
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("cache {base}: data after the NAR of '{path}'")]
    TrailingData { base: String, path: String },
    #[error("cache {base}: the references of '{path}' form a cycle through '{through}'")]
    Cycle {
        base: String,
        path: String,
        through: String,
    },
    #[error("cache {base}: cannot add '{path}' to the store")]
    Store {
        base: String,
        path: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot query the local store")]
    Local(#[source] Box<StoreError>),
}

/// A binary cache served over HTTP(S): the coordinator's (`<url>/cache`)
/// or any Nix binary cache whose NARs are zstd-compressed or plain.
pub struct HttpCache {
    /// Without a trailing slash: `http://127.0.0.1:8745/cache`.
    base: String,
    agent: ureq::Agent,
    /// An `Authorization` header value (`Bearer <token>`).
    auth: Option<String>,
    trusted: TrustedKeys,
}

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("base", &self.base)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("trusted", &self.trusted.len())
            .finish()
    }
}

/// An agent with the timeouts a cache client wants: connecting and each
/// read may stall for a minute, never for ever; no overall limit, since a
/// large NAR takes as long as it takes.
pub fn default_agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .timeout_write(Duration::from_secs(60))
        .build()
}

impl HttpCache {
    /// The cache at `base` (`http://host:port/cache`), asked through
    /// `agent` (see [`default_agent`]), sending `auth` as the
    /// `Authorization` header, trusting signatures by `trusted`.
    pub fn new(
        base: &str,
        agent: ureq::Agent,
        auth: Option<String>,
        trusted: TrustedKeys,
    ) -> HttpCache {
        HttpCache {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            auth,
            trusted,
        }
    }

    /// The cache's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn get(&self, rel: &str, missing: Option<&str>) -> Result<ureq::Response, SubstituteError> {
        let url = format!("{}/{rel}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, _)) => match missing {
                Some(path) if status == 404 => Err(SubstituteError::NotFound {
                    base: self.base.clone(),
                    path: path.to_owned(),
                }),
                _ => Err(SubstituteError::Status {
                    base: self.base.clone(),
                    url,
                    status,
                }),
            },
            Err(ureq::Error::Transport(t)) => Err(SubstituteError::Transport {
                base: self.base.clone(),
                url,
                source: Box::new(t),
            }),
        }
    }

    /// The narinfo of `path`, checked: it parses, names `path`, and is
    /// signed by a trusted key.
    pub fn query(&self, dir: &StoreDir, path: &StorePath) -> Result<NarInfo, SubstituteError> {
        let full = dir.display(path);
        let rel = format!("{}.narinfo", path.hash_part());
        let url = format!("{}/{rel}", self.base);
        let resp = self.get(&rel, Some(&full))?;
        let mut text = Vec::new();
        resp.into_reader()
            .take(MAX_NARINFO_SIZE as u64 + 1)
            .read_to_end(&mut text)
            .map_err(|source| SubstituteError::Read {
                base: self.base.clone(),
                url: url.clone(),
                source,
            })?;
        if text.len() > MAX_NARINFO_SIZE {
            return Err(SubstituteError::NarInfoTooLarge {
                base: self.base.clone(),
                url,
            });
        }
        let info = NarInfo::parse(&text, dir).map_err(|source| SubstituteError::NarInfo {
            base: self.base.clone(),
            url: url.clone(),
            source,
        })?;
        if info.path != *path {
            return Err(SubstituteError::WrongPath {
                base: self.base.clone(),
                url,
                expected: full,
                got: dir.display(&info.path),
            });
        }
        if self.trusted.count_valid(&info.to_path_info(), dir) == 0 {
            return Err(SubstituteError::Untrusted {
                base: self.base.clone(),
                path: full,
            });
        }
        Ok(info)
    }

    /// Makes `paths` and their closure valid in `store`, fetching what is
    /// missing from this cache; returns how many paths were added. Nothing
    /// is committed unless every missing path was fetched and checked.
    pub fn fetch_closure(
        &self,
        store: &LocalStore,
        paths: &BTreeSet<StorePath>,
    ) -> Result<usize, SubstituteError> {
        let dir = store.location().dir.clone();
        // The narinfos of every missing path of the closure. A valid path's
        // references are valid (the store keeps that true): not followed.
        let mut infos: BTreeMap<StorePath, NarInfo> = BTreeMap::new();
        let mut todo: Vec<StorePath> = paths.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if infos.contains_key(&p)
                || store
                    .is_valid(&p)
                    .map_err(|e| SubstituteError::Local(Box::new(e)))?
            {
                continue;
            }
            let info = self.query(&dir, &p)?;
            todo.extend(
                info.references
                    .iter()
                    .filter(|r| **r != p && !infos.contains_key(*r))
                    .cloned(),
            );
            infos.insert(p, info);
        }
        if infos.is_empty() {
            return Ok(0);
        }
        let order = self.references_first(&dir, &infos)?;
        let mut batch: Vec<(StagedPath, ValidPathInfo)> = Vec::with_capacity(order.len());
        for p in &order {
            let info = &infos[p];
            let staged = self.fetch_nar(store, info)?;
            batch.push((staged, info.to_path_info()));
        }
        let n = batch.len();
        store
            .commit_staged_batch(batch)
            .map_err(|source| SubstituteError::Store {
                base: self.base.clone(),
                path: order
                    .iter()
                    .map(|p| dir.display(p))
                    .collect::<Vec<_>>()
                    .join(", "),
                source: Box::new(source),
            })?;
        tracing::info!(cache = %self.base, paths = n, "substituted");
        Ok(n)
    }

    /// The paths of `infos` ordered so that each comes after its
    /// references among them (self-references aside).
    fn references_first(
        &self,
        dir: &StoreDir,
        infos: &BTreeMap<StorePath, NarInfo>,
    ) -> Result<Vec<StorePath>, SubstituteError> {
        #[derive(PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        let mut marks: BTreeMap<&StorePath, Mark> = BTreeMap::new();
        let mut sorted = Vec::with_capacity(infos.len());
        let refs_of = |p: &StorePath| -> Vec<&StorePath> {
            infos[p]
                .references
                .iter()
                .filter(|r| *r != p && infos.contains_key(*r))
                .collect()
        };
        for start in infos.keys() {
            if marks.contains_key(start) {
                continue;
            }
            marks.insert(start, Mark::Visiting);
            let mut stack: Vec<(&StorePath, Vec<&StorePath>)> = vec![(start, refs_of(start))];
            while let Some((node, pending)) = stack.last_mut() {
                match pending.pop() {
                    Some(next) => match marks.get(next) {
                        Some(Mark::Done) => {}
                        Some(Mark::Visiting) => {
                            return Err(SubstituteError::Cycle {
                                base: self.base.clone(),
                                path: dir.display(node),
                                through: dir.display(next),
                            })
                        }
                        None => {
                            marks.insert(next, Mark::Visiting);
                            stack.push((next, refs_of(next)));
                        }
                    },
                    None => {
                        let node: &StorePath = node;
                        marks.insert(node, Mark::Done);
                        sorted.push(node.clone());
                        stack.pop();
                    }
                }
            }
        }
        Ok(sorted)
    }

    /// Downloads the NAR of `info` into a staging directory of `store`,
    /// checking the compressed file and the NAR against the narinfo.
    fn fetch_nar(&self, store: &LocalStore, info: &NarInfo) -> Result<StagedPath, SubstituteError> {
        let dir = &store.location().dir;
        let full = dir.display(&info.path);
        let missing = |field| SubstituteError::MissingField {
            base: self.base.clone(),
            path: full.clone(),
            field,
        };
        let file_size = info.file_size.ok_or_else(|| missing("FileSize"))?;
        let file_hash = info.file_hash.as_ref().ok_or_else(|| missing("FileHash"))?;
        let url = format!("{}/{}", self.base, info.url);
        let read_err = |source| SubstituteError::Read {
            base: self.base.clone(),
            url: url.clone(),
            source,
        };
        let store_err = |source| SubstituteError::Store {
            base: self.base.clone(),
            path: full.clone(),
            source: Box::new(source),
        };
        let resp = self.get(&info.url, Some(&full))?;
        // One byte more than announced is enough to know it is too long.
        let mut file = HashingReader::new(
            resp.into_reader().take(file_size.saturating_add(1)),
            HashAlgo::Sha256,
        );
        let (staged, trailing) = match info.compression {
            Compression::Zstd => {
                let mut decoder =
                    zstd::stream::read::Decoder::with_buffer(BufReader::new(&mut file))
                        .map_err(read_err)?;
                let mut nar = BufReader::new(&mut decoder);
                let staged = store.stage_nar(&mut nar).map_err(store_err)?;
                let trailing = has_more(&mut nar).map_err(read_err)?;
                drop(nar);
                // What follows the zstd stream still counts for FileHash.
                let mut rest = decoder.into_inner();
                io::copy(&mut rest, &mut io::sink()).map_err(read_err)?;
                (staged, trailing)
            }
            Compression::None => {
                let mut nar = BufReader::new(&mut file);
                let staged = store.stage_nar(&mut nar).map_err(store_err)?;
                let trailing = has_more(&mut nar).map_err(read_err)?;
                (staged, trailing)
            }
        };
        let (got_hash, got_size, _) = file.finish();
        if got_size != file_size {
            return Err(SubstituteError::FileSizeMismatch {
                base: self.base.clone(),
                path: full,
                expected: file_size,
                got: got_size,
            });
        }
        if got_hash != *file_hash {
            return Err(SubstituteError::FileHashMismatch {
                base: self.base.clone(),
                path: full,
                expected: file_hash.to_nix32_prefixed(),
                got: got_hash.to_nix32_prefixed(),
            });
        }
        if trailing {
            return Err(SubstituteError::TrailingData {
                base: self.base.clone(),
                path: full,
            });
        }
        if staged.nar_hash != info.nar_hash {
            return Err(SubstituteError::NarHashMismatch {
                base: self.base.clone(),
                path: full,
                expected: info.nar_hash.to_nix32_prefixed(),
                got: staged.nar_hash.to_nix32_prefixed(),
            });
        }
        if staged.nar_size != info.nar_size {
            return Err(SubstituteError::NarSizeMismatch {
                base: self.base.clone(),
                path: full,
                expected: info.nar_size,
                got: staged.nar_size,
            });
        }
        // The content address too, now rather than at commit, to say which path.
        store
            .check_staged(&staged, &info.to_path_info(), true)
            .map_err(store_err)?;
        Ok(staged)
    }
}

/// Whether `r` has another byte (consumes it).
fn has_more(r: &mut dyn Read) -> io::Result<bool> {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::coordinator::cache::{Cache, Claim, ClaimKind, UploadId};
    use crate::derivation::check::open_store;
    use crate::derivation::{Derivation, DerivationOutput, DrvHasher, OutputName};
    use crate::store::nar;
    use crate::store::signature::SecretKey;
    use crate::store::StoreLocation;

    /// A minimal HTTP/1.1 file server for a cache directory under
    /// `/cache/`, answering one request a connection, requiring `token`
    /// as a bearer token. Stopped when dropped.
    struct Server {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(dir: PathBuf, token: &str) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let stop = Arc::new(AtomicBool::new(false));
            let stopped = stop.clone();
            let auth = format!("authorization: bearer {}", token.to_ascii_lowercase());
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = answer(conn, &dir, &auth);
                    }
                }
            });
            Server {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        fn base(&self) -> String {
            format!("http://{}/cache", self.addr)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so that it sees the flag.
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn answer(mut conn: TcpStream, dir: &Path, auth: &str) -> io::Result<()> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
            if conn.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        let reply = |conn: &mut TcpStream, status: &str, body: &[u8]| {
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            conn.write_all(body)
        };
        if !head.lines().any(|l| l.trim() == auth) {
            return reply(&mut conn, "401 Unauthorized", b"");
        }
        let file = path
            .strip_prefix("/cache/")
            .filter(|rel| !rel.split('/').any(|c| c == ".." || c.is_empty()));
        match file.map(|rel| std::fs::read(dir.join(rel))) {
            Some(Ok(body)) => reply(&mut conn, "200 OK", &body),
            _ => reply(&mut conn, "404 Not Found", b""),
        }
    }

    fn nar_of_file(data: &[u8]) -> Vec<u8> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        std::fs::write(&p, data).expect("write");
        let mut out = Vec::new();
        nar::dump(&p, &mut out).expect("dump");
        out
    }

    fn put(cache: &Cache, id: &str, nar: &[u8], claim: &Claim) {
        let id = UploadId::new(id).expect("id");
        let bytes = zstd::encode_all(nar, 3).expect("zstd");
        cache
            .append(&id, 0, &mut &bytes[..], u64::MAX)
            .expect("append");
        cache.finish(&id, claim).expect("finish");
    }

    fn claim(path: &StorePath, kind: ClaimKind, candidates: &[&StorePath]) -> Claim {
        Claim {
            path: path.clone(),
            kind,
            candidates: candidates.iter().map(|p| (*p).clone()).collect(),
            nar_hash: None,
            nar_size: None,
            deriver: None,
        }
    }

    /// A cache holding a closure of four paths: `out`, an output of `drv`,
    /// refers to `baz`, which refers to `foo`; `drv` has `baz` as input source.
    struct Closure {
        tmp: tempfile::TempDir,
        cache: Cache,
        foo: StorePath,
        baz: StorePath,
        drv: StorePath,
        out: StorePath,
    }

    fn closure() -> Closure {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StoreDir::default();
        let key = SecretKey::generate("coordinator-test-1").expect("key");
        let cache = Cache::open(&tmp.path().join("cache"), dir.clone(), key).expect("cache");
        let foo = dir
            .make_text_path("foo", &HashAlgo::Sha256.digest(b"bar"), [])
            .expect("foo");
        let baz_text = dir.display(&foo);
        let baz = dir
            .make_text_path("baz", &HashAlgo::Sha256.digest(baz_text.as_bytes()), [&foo])
            .expect("baz");
        put(
            &cache,
            "src-foo",
            &nar_of_file(b"bar"),
            &claim(&foo, ClaimKind::Source, &[]),
        );
        put(
            &cache,
            "src-baz",
            &nar_of_file(baz_text.as_bytes()),
            &claim(&baz, ClaimKind::Source, &[&foo]),
        );
        let mut d = Derivation {
            outputs: [(OutputName::out(), DerivationOutput::Deferred)]
                .into_iter()
                .collect(),
            input_sources: [baz.clone()].into_iter().collect(),
            system: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), b"echo $baz > $out".to_vec()],
            ..Derivation::default()
        };
        for (k, v) in [
            ("name", "uses-baz".to_owned()),
            ("out", String::new()),
            ("baz", dir.display(&baz)),
        ] {
            d.env.insert(k.as_bytes().to_vec(), v.into_bytes());
        }
        let mut hasher = DrvHasher::new(dir.clone(), |_: &StorePath| {
            Err::<Derivation, _>(io::Error::other("no input derivations"))
        });
        d.fill_output_paths(&mut hasher).expect("outputs");
        let drv = d.drv_path(&dir).expect("drv path");
        let out = d.output_paths()["out"].clone();
        put(
            &cache,
            "drv",
            &nar_of_file(&d.to_aterm(&dir)),
            &claim(&drv, ClaimKind::Derivation, &[&baz]),
        );
        let mut out_claim = claim(&out, ClaimKind::Output { fixed: None }, &[&baz, &foo, &out]);
        out_claim.deriver = Some(drv.clone());
        put(
            &cache,
            "b1-out",
            &nar_of_file(format!("{}\n", dir.display(&baz)).as_bytes()),
            &out_claim,
        );
        Closure {
            tmp,
            cache,
            foo,
            baz,
            drv,
            out,
        }
    }

    fn fresh_store(tmp: &Path, name: &str) -> LocalStore {
        open_store(StoreLocation::new(StoreDir::default(), tmp.join(name))).expect("store")
    }

    fn client(server: &Server, token: &str, key: &crate::store::signature::PublicKey) -> HttpCache {
        let mut trusted = TrustedKeys::new();
        trusted.insert(key.clone(), "test").expect("trust");
        HttpCache::new(
            &server.base(),
            default_agent(),
            Some(format!("Bearer {token}")),
            trusted,
        )
    }

    #[test]
    fn fetches_a_closure_references_first_and_only_once() {
        fn shared<T: Send + Sync>() {}
        shared::<HttpCache>();
        let c = closure();
        let server = Server::start(c.cache.dir().to_owned(), "s3cret");
        let http = client(&server, "s3cret", &c.cache.public_key());
        let store = fresh_store(c.tmp.path(), "store");
        let want: BTreeSet<StorePath> = [c.out.clone(), c.drv.clone()].into_iter().collect();
        assert_eq!(http.fetch_closure(&store, &want).unwrap(), 4);
        for p in [&c.foo, &c.baz, &c.drv, &c.out] {
            assert!(store.is_valid(p).unwrap(), "{p}");
        }
        let info = store.query_path_info(&c.out).unwrap().unwrap();
        assert_eq!(info.references, [c.baz.clone()].into_iter().collect());
        assert_eq!(info.deriver, Some(c.drv.clone()));
        assert_eq!(info.signatures.len(), 1);
        let real = store.location().real_path(&c.baz);
        assert_eq!(
            std::fs::read_to_string(real).unwrap(),
            StoreDir::default().display(&c.foo)
        );
        // Everything is there now: nothing is asked again.
        assert_eq!(http.fetch_closure(&store, &want).unwrap(), 0);
    }

    #[test]
    fn refuses_untrusted_or_tampered_narinfos_and_missing_paths() {
        let c = closure();
        let server = Server::start(c.cache.dir().to_owned(), "s3cret");
        let want: BTreeSet<StorePath> = [c.out.clone()].into_iter().collect();
        let store = fresh_store(c.tmp.path(), "store");
        let nobody = SecretKey::generate("coordinator-test-1")
            .unwrap()
            .to_public();
        // A key of the same name that did not sign.
        let err = client(&server, "s3cret", &nobody)
            .fetch_closure(&store, &want)
            .unwrap_err();
        assert!(matches!(err, SubstituteError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("is not by a trusted key"), "{err}");
        let http = client(&server, "s3cret", &c.cache.public_key());
        // A wrong token.
        let err = client(&server, "wrong", &c.cache.public_key())
            .fetch_closure(&store, &want)
            .unwrap_err();
        assert!(
            matches!(err, SubstituteError::Status { status: 401, .. }),
            "{err}"
        );
        // A narinfo whose NAR size was changed: the signature no longer
        // covers it (and `foo`, deep in the closure, fails the
        // whole fetch).
        let narinfo = c.cache.dir().join(format!("{}.narinfo", c.foo.hash_part()));
        let text = std::fs::read_to_string(&narinfo).unwrap();
        let tampered = text.replace("NarSize: ", "NarSize: 1");
        std::fs::write(&narinfo, tampered).unwrap();
        let err = http.fetch_closure(&store, &want).unwrap_err();
        assert!(
            matches!(&err, SubstituteError::Untrusted { path, .. } if path.ends_with(c.foo.base_name())),
            "{err}"
        );
        // Gone from the cache.
        std::fs::remove_file(&narinfo).unwrap();
        let err = http.fetch_closure(&store, &want).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg == format!(
                "cache {}: '{}' is not in the cache (404)",
                server.base(),
                StoreDir::default().display(&c.foo)
            ),
            "{msg}"
        );
        // Nothing of the closure was committed.
        assert!(store.query_valid_paths().unwrap().is_empty());
    }

    #[test]
    fn refuses_a_nar_that_is_not_the_one_signed() {
        let c = closure();
        let server = Server::start(c.cache.dir().to_owned(), "t");
        let http = client(&server, "t", &c.cache.public_key());
        let store = fresh_store(c.tmp.path(), "store");
        let cached = c.cache.lookup(&c.foo).unwrap().unwrap();
        let file = c.cache.dir().join(&cached.url);
        // Same size, other bytes: the file hash says so.
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let want: BTreeSet<StorePath> = [c.baz.clone()].into_iter().collect();
        let err = http.fetch_closure(&store, &want).unwrap_err();
        assert!(
            matches!(
                err,
                SubstituteError::FileHashMismatch { .. } | SubstituteError::Store { .. }
            ),
            "{err}"
        );
        // Another NAR altogether.
        let other = zstd::encode_all(&nar_of_file(b"baR")[..], 3).unwrap();
        std::fs::write(&file, &other).unwrap();
        let err = http.fetch_closure(&store, &want).unwrap_err();
        assert!(
            matches!(
                err,
                SubstituteError::FileSizeMismatch { .. } | SubstituteError::FileHashMismatch { .. }
            ),
            "{err}"
        );
        assert!(store.query_valid_paths().unwrap().is_empty());
        let stage_left = std::fs::read_dir(store.location().real_store_dir())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".sandoff-stage-")
            });
        assert!(!stage_left, "a staged copy was left behind");
    }
}
