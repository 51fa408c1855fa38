//! An import's signature checks, on a thread of their own when there is a
//! second CPU.
//!
//! # Why a thread
//! Each path of an import needs a signature by a trusted key, checked
//! strictly (as libsodium's `crypto_sign_verify_detached`, which Nix uses):
//! about 50 us of ed25519 a path. Importing a small path (a directory and a
//! file) takes about 200 us, so on 2,000 small paths the checks were a fifth
//! of the import (`perf`: 21% of the samples, all of it curve arithmetic).
//! They need no file system and no store, so [`SignatureChecks`] sends each
//! path's record to a checking thread as soon as the path is staged, and
//! the importer waits for the verdicts only before it commits a batch.
//!
//! # What stays the same
//! Nothing unchecked becomes valid: a batch is committed only after
//! [`SignatureChecks::settle`] has the verdict on every path of it, and only
//! up to the first refused path. The error reported is the first one in
//! stream order, as when each path was checked on the spot: a refusal comes
//! before anything the importer met later in the stream (a truncated
//! archive, a missing reference). Checking on the spot remains where there
//! is one CPU, or the thread cannot be started.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::Scope;

use super::{untrusted_detail, ExportError};
use crate::store::signature::TrustedKeys;
use crate::store::{StoreDir, ValidPathInfo};

/// How many records go to the checking thread in one message: a message
/// costs the importer a wake-up of the thread, a record ~50 us of its time.
const CHUNK: usize = 8;

/// The first path of an import whose signatures were refused.
#[derive(Debug)]
pub(super) struct Refusal {
    /// Its position in the archive (0 for the first entry).
    pub index: usize,
    pub error: ExportError,
}

/// The signature checks of one import (see the module docs).
pub(super) struct SignatureChecks<'scope, 'k> {
    keys: &'k TrustedKeys,
    dir: StoreDir,
    thread: Option<Checker<'scope>>,
    refusal: Option<Refusal>,
}

/// The checking thread, and what it has not answered yet.
struct Checker<'scope> {
    to: Option<Sender<Vec<(usize, ValidPathInfo)>>>,
    from: Receiver<Verdicts>,
    /// Records not sent yet.
    pending: Vec<(usize, ValidPathInfo)>,
    /// Entries sent and not yet answered, in order.
    unanswered: VecDeque<usize>,
    /// Joined by the scope; dropping `to` ends its loop.
    _thread: std::thread::ScopedJoinHandle<'scope, ()>,
}

/// The thread's answer to one message: the entries it checked, and the
/// first of them refused.
struct Verdicts {
    checked: usize,
    refused: Option<Refusal>,
}

impl<'scope, 'k: 'scope> SignatureChecks<'scope, 'k> {
    /// Checks against `keys`, on a thread of `scope` when this machine has
    /// more than one CPU.
    pub fn new<'env>(
        scope: &'scope Scope<'scope, 'env>,
        keys: &'k TrustedKeys,
        dir: StoreDir,
    ) -> SignatureChecks<'scope, 'k> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let thread = (cpus > 1)
            .then(|| Checker::spawn(scope, keys, dir.clone()))
            .flatten();
        SignatureChecks {
            keys,
            dir,
            thread,
            refusal: None,
        }
    }

    /// Checks on the spot, on the caller's thread.
    #[cfg(test)]
    pub fn inline(keys: &'k TrustedKeys, dir: StoreDir) -> SignatureChecks<'scope, 'k> {
        SignatureChecks {
            keys,
            dir,
            thread: None,
            refusal: None,
        }
    }

    /// Has entry `index` (numbered from 0, in order) checked.
    pub fn submit(&mut self, index: usize, info: &ValidPathInfo) {
        if self.refusal.is_some() {
            return;
        }
        match &mut self.thread {
            Some(checker) => checker.submit(index, info),
            None => self.refusal = check(index, self.keys, info, &self.dir),
        }
    }

    /// The first refusal known so far, without waiting.
    pub fn refused(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    /// Waits for the verdicts on every entry submitted; the first refused.
    pub fn settle(&mut self) -> Option<&Refusal> {
        if self.refusal.is_none() {
            if let Some(checker) = &mut self.thread {
                self.refusal = checker.settle();
            }
        }
        self.refusal.as_ref()
    }

    /// The first refusal, once the caller is done.
    pub fn into_refusal(mut self) -> Option<Refusal> {
        self.settle();
        self.refusal
    }
}

/// The check itself, on either thread: entry `index` refused when no
/// trusted key has validly signed it.
fn check(
    index: usize,
    keys: &TrustedKeys,
    info: &ValidPathInfo,
    dir: &StoreDir,
) -> Option<Refusal> {
    (keys.count_valid(info, dir) == 0).then(|| Refusal {
        index,
        error: ExportError::Untrusted {
            path: dir.display(&info.path),
            detail: untrusted_detail(keys, info, dir),
        },
    })
}

impl<'scope> Checker<'scope> {
    /// `None` when the thread cannot be started: then the caller checks.
    fn spawn<'env, 'k: 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        keys: &'k TrustedKeys,
        dir: StoreDir,
    ) -> Option<Checker<'scope>> {
        let (to, inbox) = mpsc::channel::<Vec<(usize, ValidPathInfo)>>();
        let (outbox, from) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("check-signatures".into())
            .spawn_scoped(scope, move || {
                for records in inbox {
                    let checked = records.len();
                    let refused = records.iter().find_map(|(index, info)| {
                        // A panic here would be a bug; refusing is the side
                        // that loses nothing.
                        catch_unwind(AssertUnwindSafe(|| check(*index, keys, info, &dir)))
                            .unwrap_or_else(|_| {
                                Some(Refusal {
                                    index: *index,
                                    error: ExportError::Untrusted {
                                        path: dir.display(&info.path),
                                        detail: "its signatures could not be checked".into(),
                                    },
                                })
                            })
                    });
                    if outbox.send(Verdicts { checked, refused }).is_err() {
                        return;
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Checker {
                to: Some(to),
                from,
                pending: Vec::with_capacity(CHUNK),
                unanswered: VecDeque::new(),
                _thread: thread,
            }),
            Err(e) => {
                tracing::debug!("checking signatures on the importing thread: {e}");
                None
            }
        }
    }

    fn submit(&mut self, index: usize, info: &ValidPathInfo) {
        self.pending.push((index, info.clone()));
        if self.pending.len() >= CHUNK {
            self.send();
        }
    }

    fn send(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let records = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
        let indexes: Vec<usize> = records.iter().map(|(index, _)| *index).collect();
        let sent = match &self.to {
            Some(to) => to.send(records).is_ok(),
            None => false,
        };
        if sent {
            self.unanswered.extend(indexes);
        } else {
            // The thread is gone (it cannot be, short of a bug): nothing of
            // this message is checked, so its first entry is refused.
            self.unanswered.extend(indexes.first());
            self.to = None;
        }
    }

    fn settle(&mut self) -> Option<Refusal> {
        self.send();
        while let Some(&next) = self.unanswered.front() {
            let Ok(verdicts) = self.from.recv() else {
                return Some(Refusal {
                    index: next,
                    error: ExportError::SignatureChecker { entry: next },
                });
            };
            if verdicts.refused.is_some() {
                return verdicts.refused;
            }
            let answered = verdicts.checked.min(self.unanswered.len());
            self.unanswered.drain(..answered);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::signature::SecretKey;
    use crate::store::{HashAlgo, StorePath};

    fn infos(n: usize, key: &SecretKey, unsigned: &[usize]) -> Vec<ValidPathInfo> {
        let dir = StoreDir::default();
        (0..n)
            .map(|i| {
                let digits = i.to_string();
                let base = format!("{}{digits}-p{i}", "0".repeat(32 - digits.len()));
                let mut info = ValidPathInfo {
                    path: StorePath::from_base_name(&base).unwrap(),
                    deriver: None,
                    nar_hash: HashAlgo::Sha256.digest(base.as_bytes()),
                    nar_size: 8,
                    references: Default::default(),
                    registration_time: 0,
                    ultimate: false,
                    signatures: Default::default(),
                    ca: None,
                };
                if !unsigned.contains(&i) {
                    info.signatures.insert(key.sign_path(&info, &dir).unwrap());
                }
                info
            })
            .collect()
    }

    /// Submits `infos`, settling after each `every`; the first refusal's
    /// entry and message.
    fn run<'s, 'k: 's>(
        checks: &mut SignatureChecks<'s, 'k>,
        infos: &[ValidPathInfo],
        every: usize,
    ) -> Option<(usize, String)> {
        for (i, info) in infos.iter().enumerate() {
            checks.submit(i, info);
            if (i + 1) % every == 0 && checks.settle().is_some() {
                break;
            }
        }
        checks.settle().map(|r| (r.index, r.error.to_string()))
    }

    #[test]
    fn the_thread_and_the_caller_refuse_the_same_first_entry() {
        let key = SecretKey::generate("k").unwrap();
        let mut keys = TrustedKeys::new();
        keys.insert(key.to_public(), "test").unwrap();
        let dir = StoreDir::default();
        for (n, unsigned, every) in [
            (50, vec![], 7),
            (50, vec![13, 17], 7),
            (50, vec![0], 100),
            (50, vec![49], 100),
            (3, vec![1, 2], 1),
        ] {
            let infos = infos(n, &key, &unsigned);
            let inline = run(
                &mut SignatureChecks::inline(&keys, dir.clone()),
                &infos,
                every,
            );
            let threaded = std::thread::scope(|scope| {
                let mut checks = SignatureChecks::new(scope, &keys, dir.clone());
                assert!(
                    checks.thread.is_some()
                        || std::thread::available_parallelism().map_or(true, |n| n.get() == 1)
                );
                run(&mut checks, &infos, every)
            });
            assert_eq!(inline, threaded, "{n} paths, unsigned {unsigned:?}");
            match unsigned.first() {
                Some(&first) => {
                    let (index, msg) = threaded.unwrap();
                    assert_eq!(index, first);
                    assert!(
                        msg.contains(infos[first].path.base_name())
                            && msg.contains("no signatures"),
                        "{msg}"
                    );
                }
                None => assert_eq!(threaded, None),
            }
        }
    }

    #[test]
    fn nothing_is_valid_before_its_verdict_is_in() {
        // A refusal known only to the thread is not reported before
        // `settle`; `refused` never waits.
        let key = SecretKey::generate("k").unwrap();
        let keys = TrustedKeys::new();
        let infos = infos(2, &key, &[]);
        std::thread::scope(|scope| {
            let mut checks = SignatureChecks::new(scope, &keys, StoreDir::default());
            checks.submit(0, &infos[0]);
            checks.submit(1, &infos[1]);
            let settled = checks.settle().map(|r| r.index);
            assert_eq!(settled, Some(0));
            assert_eq!(checks.refused().map(|r| r.index), Some(0));
            assert!(checks.into_refusal().is_some());
        });
    }
}
