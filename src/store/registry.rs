//! The registry of valid paths: a SQLite database in Nix's own schema.
//!
//! The database is `<state>/db/db.sqlite`, next to a `schema` file holding
//! `10`, exactly as Nix 2.8 keeps `/nix/var/nix/db` (Guix's daemon uses the same
//! schema). A store whose state directory is `<root>/nix/var/nix` can
//! therefore be read and written by both sandoff and Nix.
//!
//! How values are stored (as Nix 2.8's `local-store.cc` does):
//! - `path`, `deriver`, `DerivationOutputs.path`: full logical paths.
//! - `hash`: `sha256:<base16>`; other encodings are accepted when reading.
//! - `narSize`, `deriver`, `ultimate`, `sigs`, `ca`: NULL when zero, absent,
//!   false or empty; `sigs` is the space-separated, sorted signature strings.
//! - `Refs` and `DerivationOutputs.drv` point at `ValidPaths.id`.
//!
//! Like Nix, a fresh database gets no `Realisations` table: Nix 2.8 adds it
//! only when the `ca-derivations` feature is enabled.
//!
//! Concurrency: writes run in `BEGIN IMMEDIATE` transactions, so two
//! processes never interleave a read-check-write; every connection waits for
//! the lock (busy timeout) instead of failing, and WAL mode lets readers
//! proceed during a write.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use thiserror::Error;

use super::path_info::ValidPathInfo;
use super::signature::Signature;
use super::{ContentAddress, Hash, HashAlgo, StoreDir, StorePath};

/// The schema version Nix 2.8 writes to `<db dir>/schema`.
pub const SCHEMA_VERSION: u32 = 10;

/// Nix 2.8's `src/libstore/schema.sql`, byte for byte, so that
/// `sqlite_master` of a database sandoff creates equals one Nix creates.
pub const SCHEMA_SQL: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// The schema version guix-daemon (and Nix 1.x up to 1.11) writes: no
/// `ultimate`, `sigs` or `ca` columns.
pub const GUIX_SCHEMA_VERSION: u32 = 7;

/// Which of the optional `ValidPaths` columns a database has: Nix 2.8's
/// schema 10 has all three, guix-daemon's schema 7 none. Told from the
/// database itself (`pragma table_info`), never assumed from its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    /// `ultimate`: built here rather than substituted.
    pub ultimate: bool,
    /// `sigs`: the path's signatures.
    pub sigs: bool,
    /// `ca`: the path's content address.
    pub ca: bool,
}

impl Columns {
    /// Every column (Nix 2.8).
    pub const ALL: Columns = Columns {
        ultimate: true,
        sigs: true,
        ca: true,
    };
}

/// The SQL of a registry for its columns: what a missing column would
/// hold is NULL when reading and is not written.
#[derive(Debug)]
struct Statements {
    query_info: String,
    insert: String,
}

impl Statements {
    fn for_columns(c: Columns) -> Statements {
        let col = |present: bool, name: &'static str| if present { name } else { "null" };
        let query_info = format!(
            "select id, hash, registrationTime, deriver, narSize, {}, {}, {} from ValidPaths where path = ?",
            col(c.ultimate, "ultimate"),
            col(c.sigs, "sigs"),
            col(c.ca, "ca")
        );
        let mut names = vec!["path", "hash", "registrationTime", "deriver", "narSize"];
        for (present, name) in [(c.ultimate, "ultimate"), (c.sigs, "sigs"), (c.ca, "ca")] {
            if present {
                names.push(name);
            }
        }
        let marks = vec!["?"; names.len()].join(", ");
        let insert = format!(
            "insert into ValidPaths ({}) values ({marks})",
            names.join(", ")
        );
        Statements { query_info, insert }
    }
}

/// How long a connection waits for another process's write lock (Nix: one hour).
const BUSY_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Why the registry could not be opened, read or written.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("database {db}: {what}: {source}")]
    Sqlite {
        db: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: invalid schema version '{content}' (expected a number)")]
    CorruptSchemaFile { path: PathBuf, content: String },
    #[error("{path}: schema version {found} is not supported (sandoff reads and writes version {SCHEMA_VERSION}, as Nix 2.8)")]
    UnsupportedSchema { path: PathBuf, found: u32 },
    #[error("{path}: schema version {found} is not one sandoff reads and writes in a daemon's database ({GUIX_SCHEMA_VERSION}, guix-daemon; {SCHEMA_VERSION}, Nix 2.8); it is never migrated")]
    UnsupportedForeignSchema { path: PathBuf, found: u32 },
    #[error("{path} is not a store database (no schema file next to it): a daemon's database is never created")]
    NoForeignDatabase { path: PathBuf },
    #[error("database {db}: table ValidPaths has columns ({columns}), not Nix's or Guix's")]
    UnknownColumns { db: PathBuf, columns: String },
    #[error("database {db}: corrupt {field} '{value}' in the entry of '{path}'")]
    Corrupt {
        db: PathBuf,
        path: String,
        field: &'static str,
        value: String,
    },
    #[error("cannot register '{path}' as valid, because its reference '{reference}' isn't valid")]
    InvalidReference { path: String, reference: String },
    #[error("path '{path}' is not valid")]
    NotValid { path: String },
}

/// An open registry. One connection, shared by the threads of a process
/// behind a mutex; other processes synchronise through SQLite's locks.
pub struct Registry {
    conn: Mutex<Connection>,
    db: PathBuf,
    dir: StoreDir,
    columns: Columns,
    statements: Statements,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("db", &self.db)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Registry {
    /// Opens `<db_dir>/db.sqlite`, creating the directory, the database and
    /// the `schema` file when the store is new, as Nix does.
    pub fn open(db_dir: &Path, dir: StoreDir) -> Result<Registry, RegistryError> {
        fs::create_dir_all(db_dir).map_err(|source| RegistryError::Io {
            path: db_dir.to_owned(),
            source,
        })?;
        let schema_path = db_dir.join("schema");
        let db = db_dir.join("db.sqlite");
        let current = read_schema_version(&schema_path)?;
        if let Some(found) = current {
            if found != SCHEMA_VERSION {
                return Err(RegistryError::UnsupportedSchema {
                    path: schema_path,
                    found,
                });
            }
        }
        let db_ref = &db;
        let sql = |what| {
            move |source| RegistryError::Sqlite {
                db: db_ref.clone(),
                what,
                source,
            }
        };
        let mut conn = connect(&db, true)?;
        let is_wal = |conn: &Connection| -> Result<bool, RegistryError> {
            let mode: String = conn
                .query_row("pragma main.journal_mode", [], |r| r.get(0))
                .map_err(sql("querying journal mode"))?;
            Ok(mode.eq_ignore_ascii_case("wal"))
        };
        if current.is_none() || !is_wal(&conn)? {
            // First open of a fresh database. Switching to WAL needs an
            // exclusive lock, and SQLite may answer SQLITE_BUSY at once
            // (without its busy handler) when several processes try together,
            // so the one-time setup is serialised on a lock file of its own.
            // Not `big-lock`: every open store holds that one shared for its
            // life (as Nix does), so taking it exclusively here would wait on
            // ourselves and on every other open store.
            let _init = init_lock(db_dir)?;
            if !is_wal(&conn)? {
                let _: String = conn
                    .query_row("pragma main.journal_mode = wal", [], |r| r.get(0))
                    .map_err(sql("setting journal mode"))?;
            }
            if read_schema_version(&schema_path)?.is_none() {
                // `if not exists` keeps a half-done earlier attempt harmless;
                // the schema file is written last, so a crash before it just
                // repeats this.
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(sql("starting transaction"))?;
                tx.execute_batch(SCHEMA_SQL)
                    .map_err(sql("initialising database schema"))?;
                tx.commit().map_err(sql("committing schema"))?;
                // Nix writes it 0666 minus the umask.
                super::replace_file_atomically(&schema_path, SCHEMA_VERSION.to_string().as_bytes())
                    .map_err(|source| RegistryError::Io {
                        path: schema_path.clone(),
                        source,
                    })?;
            }
        }
        conn.execute_batch("pragma wal_autocheckpoint = 40000;")
            .map_err(sql("setting autocheckpoint interval"))?;
        Registry::over(conn, db, dir)
    }

    /// Opens a daemon's existing database, `<db_dir>/db.sqlite` (guix-daemon's
    /// schema 7 or Nix 2.8's schema 10), as the daemon's other clients do:
    /// never created, migrated or upgraded, its journal mode left as the
    /// daemon set it (WAL by default), with the same busy timeout, so the
    /// daemon keeps working while sandoff reads and registers paths.
    pub fn open_existing(db_dir: &Path, dir: StoreDir) -> Result<Registry, RegistryError> {
        let schema_path = db_dir.join("schema");
        let db = db_dir.join("db.sqlite");
        let Some(found) = read_schema_version(&schema_path)? else {
            return Err(RegistryError::NoForeignDatabase { path: db });
        };
        if found != SCHEMA_VERSION && found != GUIX_SCHEMA_VERSION {
            return Err(RegistryError::UnsupportedForeignSchema {
                path: schema_path,
                found,
            });
        }
        // No CREATE: a missing file is an error, not a new database.
        let conn = connect(&db, false)?;
        Registry::over(conn, db, dir)
    }

    /// The registry over an open connection to `db`, with the statements
    /// for the columns it has.
    fn over(conn: Connection, db: PathBuf, dir: StoreDir) -> Result<Registry, RegistryError> {
        let columns = read_columns(&conn, &db)?;
        Ok(Registry {
            conn: Mutex::new(conn),
            db,
            dir,
            columns,
            statements: Statements::for_columns(columns),
        })
    }

    /// Which optional columns this database has.
    pub fn columns(&self) -> Columns {
        self.columns
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction
        // behind (rusqlite rolls back on drop), so the connection is usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> RegistryError + '_ {
        move |source| RegistryError::Sqlite {
            db: self.db.clone(),
            what,
            source,
        }
    }

    fn corrupt(&self, path: &str, field: &'static str, value: &str) -> RegistryError {
        RegistryError::Corrupt {
            db: self.db.clone(),
            path: path.to_owned(),
            field,
            value: value.to_owned(),
        }
    }

    fn parse(
        &self,
        owner: &str,
        field: &'static str,
        full: &str,
    ) -> Result<StorePath, RegistryError> {
        self.dir
            .parse_path(full)
            .map_err(|_| self.corrupt(owner, field, full))
    }

    /// Whether `path` is registered.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, RegistryError> {
        let conn = self.lock();
        Ok(path_id(&conn, &self.dir.display(path))
            .map_err(self.sql("querying path"))?
            .is_some())
    }

    /// Which of `paths` are registered, read in one transaction: a serve
    /// client asks about a whole closure at once (2,000 paths), and a
    /// statement outside a transaction takes and drops the database's read
    /// lock each time.
    pub fn valid_among<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<BTreeSet<StorePath>, RegistryError> {
        self.in_one_read(|conn| {
            let mut valid = BTreeSet::new();
            for p in paths {
                if path_id(conn, &self.dir.display(p))
                    .map_err(self.sql("querying path"))?
                    .is_some()
                {
                    valid.insert(p.clone());
                }
            }
            Ok(valid)
        })
    }

    /// Runs `f` in one read transaction.
    fn in_one_read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(self.sql("starting a read"))?;
        let value = f(&tx)?;
        // Nothing was written: ending it either way only drops the lock.
        tx.commit().map_err(self.sql("ending a read"))?;
        Ok(value)
    }

    /// The record of `path`, or `None` when it is not valid.
    pub fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, RegistryError> {
        let conn = self.lock();
        self.info_on(&conn, path)
    }

    /// The records of those of `paths` that are valid, read in one
    /// transaction (a closure sent to a build machine: 2,000 paths).
    pub fn query_path_infos<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, RegistryError> {
        self.in_one_read(|conn| {
            let mut infos = BTreeMap::new();
            for p in paths {
                if let Some(info) = self.info_on(conn, p)? {
                    infos.insert(p.clone(), info);
                }
            }
            Ok(infos)
        })
    }

    fn info_on(
        &self,
        conn: &Connection,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, RegistryError> {
        let full = self.dir.display(path);
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = conn
            .prepare_cached(&self.statements.query_info)
            .and_then(|mut s| {
                s.query_row([&full], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })
                .optional()
            })
            .map_err(self.sql("querying path info"))?;
        let Some((id, hash, registration_time, deriver, nar_size, ultimate, sigs, ca)) = row else {
            return Ok(None);
        };
        let nar_hash = Hash::parse_any_prefixed(&hash)
            .ok()
            .filter(|h| h.algo() == HashAlgo::Sha256)
            .ok_or_else(|| self.corrupt(&full, "hash", &hash))?;
        let deriver = match deriver.as_deref() {
            None | Some("") => None,
            Some(d) => Some(self.parse(&full, "deriver", d)?),
        };
        let nar_size = match nar_size {
            None => 0,
            Some(n) => {
                u64::try_from(n).map_err(|_| self.corrupt(&full, "narSize", &n.to_string()))?
            }
        };
        let mut signatures = BTreeSet::new();
        for s in sigs
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
        {
            // Nix keeps signatures as opaque strings; one we cannot parse
            // must not make the whole path unreadable.
            match s.parse::<Signature>() {
                Ok(sig) => {
                    signatures.insert(sig);
                }
                Err(e) => tracing::warn!(path = %full, "ignoring signature: {e}"),
            }
        }
        let ca = match ca.as_deref() {
            None | Some("") => None,
            Some(c) => Some(
                c.parse::<ContentAddress>()
                    .map_err(|_| self.corrupt(&full, "ca", c))?,
            ),
        };
        let references = query_references_by_id(conn, id)
            .map_err(self.sql("querying references"))?
            .iter()
            .map(|r| self.parse(&full, "reference", r))
            .collect::<Result<BTreeSet<_>, _>>()?;
        Ok(Some(ValidPathInfo {
            path: path.clone(),
            deriver,
            nar_hash,
            nar_size,
            references,
            registration_time,
            ultimate: ultimate.unwrap_or(0) != 0,
            signatures,
            ca,
        }))
    }

    /// The paths `path` references (empty when it is not valid).
    pub fn query_references(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, RegistryError> {
        let full = self.dir.display(path);
        let conn = self.lock();
        let Some(id) = path_id(&conn, &full).map_err(self.sql("querying path"))? else {
            return Err(RegistryError::NotValid { path: full });
        };
        let refs = query_references_by_id(&conn, id).map_err(self.sql("querying references"))?;
        refs.iter()
            .map(|r| self.parse(&full, "reference", r))
            .collect()
    }

    /// The valid paths that reference `path`.
    pub fn query_referrers(&self, path: &StorePath) -> Result<BTreeSet<StorePath>, RegistryError> {
        let full = self.dir.display(path);
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "select path from Refs join ValidPaths on referrer = id \
                 where reference = (select id from ValidPaths where path = ?)",
            )
            .map_err(self.sql("querying referrers"))?;
        let rows = stmt
            .query_map([&full], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql("querying referrers"))?;
        rows.iter()
            .map(|r| self.parse(&full, "referrer", r))
            .collect()
    }

    /// Every valid path.
    pub fn query_valid_paths(&self) -> Result<BTreeSet<StorePath>, RegistryError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("select path from ValidPaths")
            .map_err(self.sql("listing paths"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql("listing paths"))?;
        rows.iter().map(|p| self.parse(p, "path", p)).collect()
    }

    /// Registers `info` (and, for a derivation, its outputs) in one
    /// transaction. Every reference other than the path itself must already
    /// be valid; otherwise nothing is written. When the path is already valid
    /// only the new signatures are merged in, and `false` is returned.
    pub fn register(
        &self,
        info: &ValidPathInfo,
        derivation_outputs: &BTreeMap<String, StorePath>,
    ) -> Result<bool, RegistryError> {
        let full = self.dir.display(&info.path);
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("starting transaction"))?;
        if let Some(id) = path_id(&tx, &full).map_err(self.sql("querying path"))? {
            self.merge_signatures(&tx, id, &full, &info.signatures)?;
            tx.commit().map_err(self.sql("committing transaction"))?;
            return Ok(false);
        }
        let mut ref_ids = Vec::new();
        for r in info.references.iter().filter(|r| **r != info.path) {
            let rfull = self.dir.display(r);
            match path_id(&tx, &rfull).map_err(self.sql("querying reference"))? {
                Some(id) => ref_ids.push(id),
                None => {
                    return Err(RegistryError::InvalidReference {
                        path: full,
                        reference: rfull,
                    })
                }
            }
        }
        let id = self.insert_row(&tx, &full, info)?;
        if info.references.contains(&info.path) {
            ref_ids.push(id);
        }
        for r in ref_ids {
            tx.prepare_cached("insert or replace into Refs (referrer, reference) values (?, ?)")
                .and_then(|mut s| s.execute(params![id, r]))
                .map_err(self.sql("adding reference"))?;
        }
        insert_outputs(&tx, id, &self.dir, derivation_outputs)
            .map_err(self.sql("adding derivation output"))?;
        tx.commit().map_err(self.sql("committing transaction"))?;
        Ok(true)
    }

    /// Inserts the `ValidPaths` row of `info` (whose full path is `full`) in
    /// Nix's column formats; returns its id.
    fn insert_row(
        &self,
        tx: &rusqlite::Transaction<'_>,
        full: &str,
        info: &ValidPathInfo,
    ) -> Result<i64, RegistryError> {
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![
            Box::new(full.to_owned()),
            Box::new(info.nar_hash.to_base16_prefixed()),
            Box::new(info.registration_time),
            Box::new(info.deriver.as_ref().map(|d| self.dir.display(d))),
            Box::new(i64::try_from(info.nar_size).ok().filter(|&n| n != 0)),
        ];
        // A column the database lacks is not written: guix-daemon keeps no
        // signatures or content addresses in its database.
        if self.columns.ultimate {
            values.push(Box::new(info.ultimate.then_some(1i64)));
        }
        if self.columns.sigs {
            values.push(Box::new(sigs_column(&info.signatures)));
        }
        if self.columns.ca {
            values.push(Box::new(info.ca.as_ref().map(|c| c.to_string())));
        }
        tx.prepare_cached(&self.statements.insert)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(values.iter())))
            .map_err(self.sql("registering path"))?;
        Ok(tx.last_insert_rowid())
    }

    /// Registers several paths in one transaction (a build's outputs, which
    /// may refer to each other): every reference must be valid already or
    /// be one of `infos`. Paths that are already valid only get their new
    /// signatures merged. All or nothing: on any error nothing is written.
    /// Returns, for each info, whether it was newly registered.
    pub fn register_many(&self, infos: &[ValidPathInfo]) -> Result<Vec<bool>, RegistryError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("starting transaction"))?;
        let mut new_ids = Vec::new();
        let mut added = Vec::new();
        // First every row, so that references within the batch resolve.
        for info in infos {
            let full = self.dir.display(&info.path);
            if let Some(id) = path_id(&tx, &full).map_err(self.sql("querying path"))? {
                self.merge_signatures(&tx, id, &full, &info.signatures)?;
                added.push(false);
                continue;
            }
            new_ids.push((self.insert_row(&tx, &full, info)?, info));
            added.push(true);
        }
        for (id, info) in new_ids {
            for r in &info.references {
                let rfull = self.dir.display(r);
                let Some(rid) = path_id(&tx, &rfull).map_err(self.sql("querying reference"))?
                else {
                    return Err(RegistryError::InvalidReference {
                        path: self.dir.display(&info.path),
                        reference: rfull,
                    });
                };
                tx.prepare_cached(
                    "insert or replace into Refs (referrer, reference) values (?, ?)",
                )
                .and_then(|mut s| s.execute(params![id, rid]))
                .map_err(self.sql("adding reference"))?;
            }
        }
        tx.commit().map_err(self.sql("committing transaction"))?;
        Ok(added)
    }

    /// The row id of the valid path `full`, or [`RegistryError::NotValid`].
    fn valid_id(&self, tx: &rusqlite::Transaction<'_>, full: &str) -> Result<i64, RegistryError> {
        path_id(tx, full)
            .map_err(self.sql("querying path"))?
            .ok_or_else(|| RegistryError::NotValid {
                path: full.to_owned(),
            })
    }

    /// Adds signatures to a valid path.
    pub fn add_signatures(
        &self,
        path: &StorePath,
        sigs: &BTreeSet<Signature>,
    ) -> Result<(), RegistryError> {
        self.update_valid(path, |tx, id, full| {
            self.merge_signatures(tx, id, full, sigs)
        })
    }

    /// Runs `update` on the valid `path` (its id and full path) in one write
    /// transaction, committed when it succeeds.
    fn update_valid(
        &self,
        path: &StorePath,
        update: impl FnOnce(&Transaction<'_>, i64, &str) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let full = self.dir.display(path);
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("starting transaction"))?;
        let id = self.valid_id(&tx, &full)?;
        update(&tx, id, &full)?;
        tx.commit().map_err(self.sql("committing transaction"))
    }

    fn merge_signatures(
        &self,
        tx: &Transaction<'_>,
        id: i64,
        full: &str,
        sigs: &BTreeSet<Signature>,
    ) -> Result<(), RegistryError> {
        if sigs.is_empty() {
            return Ok(());
        }
        if !self.columns.sigs {
            tracing::debug!(path = full, "this database keeps no signatures");
            return Ok(());
        }
        let old: Option<String> = tx
            .query_row("select sigs from ValidPaths where id = ?", [id], |r| {
                r.get(0)
            })
            .map_err(self.sql("querying signatures"))?;
        // Keep the stored strings as they are (even ones we cannot parse).
        let mut all: BTreeSet<String> = old
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        all.extend(sigs.iter().map(|s| s.to_string()));
        let joined = all.into_iter().collect::<Vec<_>>().join(" ");
        tx.execute(
            "update ValidPaths set sigs = ? where id = ?",
            params![joined, id],
        )
        .map_err(self.sql("updating signatures"))?;
        tracing::debug!(path = full, "merged signatures");
        Ok(())
    }

    /// The outputs recorded for the derivation `drv` (`DerivationOutputs`).
    pub fn derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, RegistryError> {
        let full = self.dir.display(drv);
        let conn = self.lock();
        let Some(id) = path_id(&conn, &full).map_err(self.sql("querying path"))? else {
            return Err(RegistryError::NotValid { path: full });
        };
        let mut stmt = conn
            .prepare_cached("select id, path from DerivationOutputs where drv = ?")
            .map_err(self.sql("querying derivation outputs"))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql("querying derivation outputs"))?;
        rows.into_iter()
            .map(|(name, p)| Ok((name, self.parse(&full, "derivation output", &p)?)))
            .collect()
    }

    /// Records the outputs of a valid derivation (as Nix does when it
    /// registers a `.drv`); existing entries for the same output are replaced.
    pub fn set_derivation_outputs(
        &self,
        drv: &StorePath,
        outputs: &BTreeMap<String, StorePath>,
    ) -> Result<(), RegistryError> {
        self.update_valid(drv, |tx, id, _| {
            insert_outputs(tx, id, &self.dir, outputs).map_err(self.sql("adding derivation output"))
        })
    }

    /// Removes `path` from the registry (its files are left alone). Fails
    /// while a valid path still references it.
    pub fn invalidate(&self, path: &StorePath) -> Result<(), RegistryError> {
        let full = self.dir.display(path);
        let conn = self.lock();
        conn.execute("delete from ValidPaths where path = ?", [&full])
            .map_err(self.sql("invalidating path"))?;
        Ok(())
    }
}

fn path_id(conn: &Connection, full: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("select id from ValidPaths where path = ?")?
        .query_row([full], |r| r.get(0))
        .optional()
}

fn query_references_by_id(conn: &Connection, id: i64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "select path from Refs join ValidPaths on reference = id where referrer = ?",
    )?;
    let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
    rows.collect()
}

fn insert_outputs(
    tx: &Transaction<'_>,
    drv_id: i64,
    dir: &StoreDir,
    outputs: &BTreeMap<String, StorePath>,
) -> rusqlite::Result<()> {
    for (name, out) in outputs {
        tx.prepare_cached(
            "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
        )?
        .execute(params![drv_id, name, dir.display(out)])?;
    }
    Ok(())
}

/// A connection to the database at `db` (created when `create`) with the
/// busy timeout and pragmas of Nix 2.8's `openDB` (fsync-metadata and
/// use-sqlite-wal at their defaults), which guix-daemon's are too.
fn connect(db: &Path, create: bool) -> Result<Connection, RegistryError> {
    let sql = |what| {
        move |source| RegistryError::Sqlite {
            db: db.to_owned(),
            what,
            source,
        }
    };
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(db, flags).map_err(sql("opening"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sql("setting busy timeout"))?;
    conn.execute_batch("pragma foreign_keys = 1; pragma synchronous = normal;")
        .map_err(sql("setting pragmas"))?;
    Ok(conn)
}

/// The optional columns of `ValidPaths` in the database at `db`: all three
/// (Nix 2.8) or none (guix-daemon); anything else is refused.
fn read_columns(conn: &Connection, db: &Path) -> Result<Columns, RegistryError> {
    let names: Vec<String> = conn
        .prepare("select name from pragma_table_info('ValidPaths')")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|source| RegistryError::Sqlite {
            db: db.to_owned(),
            what: "reading the columns of ValidPaths",
            source,
        })?;
    let has = |n: &str| names.iter().any(|c| c == n);
    let base = [
        "id",
        "path",
        "hash",
        "registrationTime",
        "deriver",
        "narSize",
    ];
    let columns = Columns {
        ultimate: has("ultimate"),
        sigs: has("sigs"),
        ca: has("ca"),
    };
    let known = columns == Columns::ALL
        || columns
            == (Columns {
                ultimate: false,
                sigs: false,
                ca: false,
            });
    if !base.iter().all(|b| has(b)) || !known {
        return Err(RegistryError::UnknownColumns {
            db: db.to_owned(),
            columns: names.join(", "),
        });
    }
    Ok(columns)
}

/// `sigs` as Nix writes it: the signature strings, sorted, space-separated;
/// NULL when there are none.
fn sigs_column(sigs: &BTreeSet<Signature>) -> Option<String> {
    let strings: BTreeSet<String> = sigs.iter().map(|s| s.to_string()).collect();
    (!strings.is_empty()).then(|| strings.into_iter().collect::<Vec<_>>().join(" "))
}

fn read_schema_version(path: &Path) -> Result<Option<u32>, RegistryError> {
    match fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| RegistryError::CorruptSchemaFile {
                path: path.to_owned(),
                content: s,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RegistryError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// An exclusive lock on `<db dir>/sandoff-init.lock`, held while a fresh
/// database is set up.
fn init_lock(db_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, RegistryError> {
    let path = db_dir.join("sandoff-init.lock");
    let io = |source| RegistryError::Io {
        path: path.clone(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(io::Error::from(errno)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    fn info(path: &str, refs: &[&str]) -> ValidPathInfo {
        ValidPathInfo {
            path: sp(path),
            deriver: None,
            nar_hash: HashAlgo::Sha256.digest(path.as_bytes()),
            nar_size: 120,
            references: refs.iter().map(|r| sp(r)).collect(),
            registration_time: 1_700_000_000,
            ultimate: false,
            signatures: BTreeSet::new(),
            ca: None,
        }
    }

    const A: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-a";
    const B: &str = "q6dq4cjk6aw4cz1whdksas0153xcyk1b-b";
    const DRV: &str = "4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv";
    const OUT: &str = "2qgfy89v28340cr9d9z471zfi5iczv5l-hello";

    /// A guix-daemon database (schema 7) at `<dir>/db`, made from Guix
    /// 1.4.0's own schema, as the daemon creates it.
    fn guix_db(dir: &Path) -> PathBuf {
        let db_dir = dir.join("db");
        fs::create_dir_all(&db_dir).unwrap();
        let sql = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/db/guix-1.4.0-schema.sql"),
        )
        .unwrap();
        let conn = Connection::open(db_dir.join("db.sqlite")).unwrap();
        conn.execute_batch("pragma journal_mode = wal;").unwrap();
        conn.execute_batch(&sql).unwrap();
        fs::write(db_dir.join("schema"), "7").unwrap();
        db_dir
    }

    #[test]
    fn guix_database_is_read_and_written_without_the_columns_it_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let db_dir = guix_db(tmp.path());
        let gnu = StoreDir::new("/gnu/store").unwrap();
        let reg = Registry::open_existing(&db_dir, gnu.clone()).unwrap();
        assert_eq!(
            reg.columns(),
            Columns {
                ultimate: false,
                sigs: false,
                ca: false
            }
        );
        let key = crate::store::signature::SecretKey::generate("k").unwrap();
        let mut a = info(A, &[]);
        a.ultimate = true;
        a.ca = Some(ContentAddress::Text(HashAlgo::Sha256.digest(b"x")));
        a.signatures.insert(key.sign_path(&a, &gnu).unwrap());
        assert!(reg.register(&a, &BTreeMap::new()).unwrap());
        let mut b = info(B, &[A, B]);
        b.deriver = Some(sp(DRV));
        reg.register_many(&[b.clone()]).unwrap();
        let outs = BTreeMap::from([("out".to_owned(), sp(OUT))]);
        reg.register(&info(DRV, &[A]), &outs).unwrap();
        // What the database can hold comes back; the rest is not invented.
        let got = reg.query_path_info(&sp(A)).unwrap().unwrap();
        assert_eq!(
            (got.nar_hash, got.nar_size),
            (a.nar_hash.clone(), a.nar_size)
        );
        assert!(!got.ultimate && got.signatures.is_empty() && got.ca.is_none());
        assert_eq!(reg.query_path_info(&sp(B)).unwrap().unwrap(), b);
        assert_eq!(reg.derivation_outputs(&sp(DRV)).unwrap(), outs);
        reg.add_signatures(&sp(A), &a.signatures).unwrap();
        // The rows are the daemon's own format: `sha256:<base16>` and full paths.
        let conn = Connection::open(db_dir.join("db.sqlite")).unwrap();
        let (path, hash): (String, String) = conn
            .query_row("select path, hash from ValidPaths where id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(path, gnu.display(&sp(A)));
        assert_eq!(hash, a.nar_hash.to_base16_prefixed());
        // Never migrated: the schema file and the columns are the daemon's.
        assert_eq!(fs::read(db_dir.join("schema")).unwrap(), b"7");
        let cols: i64 = conn
            .query_row(
                "select count(*) from pragma_table_info('ValidPaths')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cols, 6);
    }

    #[test]
    fn valid_among_answers_for_each_path_in_one_read() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(&tmp.path().join("db"), StoreDir::default()).unwrap();
        reg.register(&info(A, &[]), &BTreeMap::new()).unwrap();
        let asked = [sp(A), sp(B), sp(OUT)];
        assert_eq!(reg.valid_among(&asked).unwrap(), BTreeSet::from([sp(A)]));
        assert!(reg.valid_among(&[]).unwrap().is_empty());
        // The read ended: a write goes through afterwards.
        reg.register(&info(B, &[A]), &BTreeMap::new()).unwrap();
        assert_eq!(
            reg.valid_among(&asked).unwrap(),
            BTreeSet::from([sp(A), sp(B)])
        );
    }

    #[test]
    fn a_daemon_database_is_never_created_or_upgraded() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("none");
        let err = Registry::open_existing(&missing, StoreDir::default()).unwrap_err();
        assert!(
            matches!(err, RegistryError::NoForeignDatabase { .. }),
            "{err}"
        );
        assert!(!missing.exists(), "nothing created");
        let db_dir = guix_db(tmp.path());
        // Our own opener does not take a Guix database for its own.
        let err = Registry::open(&db_dir, StoreDir::default()).unwrap_err();
        assert!(
            matches!(err, RegistryError::UnsupportedSchema { found: 7, .. }),
            "{err}"
        );
        fs::write(db_dir.join("schema"), "9").unwrap();
        let err = Registry::open_existing(&db_dir, StoreDir::default()).unwrap_err();
        assert!(
            matches!(
                err,
                RegistryError::UnsupportedForeignSchema { found: 9, .. }
            ),
            "{err}"
        );
        assert_eq!(fs::read(db_dir.join("schema")).unwrap(), b"9");
    }

    #[test]
    fn a_nix_database_opened_as_a_daemon_s_has_every_column() {
        let tmp = tempfile::tempdir().unwrap();
        let db_dir = tmp.path().join("db");
        drop(Registry::open(&db_dir, StoreDir::default()).unwrap());
        let reg = Registry::open_existing(&db_dir, StoreDir::default()).unwrap();
        assert_eq!(reg.columns(), Columns::ALL);
        let mut a = info(A, &[]);
        a.ultimate = true;
        reg.register(&a, &BTreeMap::new()).unwrap();
        assert_eq!(reg.query_path_info(&sp(A)).unwrap().unwrap(), a);
    }

    #[test]
    fn creates_nix_schema_and_version_file() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(&tmp.path().join("db"), StoreDir::default()).unwrap();
        assert_eq!(fs::read(tmp.path().join("db/schema")).unwrap(), b"10");
        let conn = reg.lock();
        let mode: String = conn
            .query_row("pragma journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let mut names: Vec<String> = conn
            .prepare("select name from sqlite_master where type = 'table' order by name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        names.sort();
        assert_eq!(
            names,
            ["DerivationOutputs", "Refs", "ValidPaths", "sqlite_sequence"]
        );
        drop(conn);
        drop(reg);
        // Reopening an existing store does not recreate anything.
        Registry::open(&tmp.path().join("db"), StoreDir::default()).unwrap();
    }

    #[test]
    fn refuses_other_schema_versions() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("schema"), "11").unwrap();
        let err = Registry::open(tmp.path(), StoreDir::default()).unwrap_err();
        assert!(
            matches!(err, RegistryError::UnsupportedSchema { found: 11, .. }),
            "{err}"
        );
        fs::write(tmp.path().join("schema"), "x").unwrap();
        assert!(matches!(
            Registry::open(tmp.path(), StoreDir::default()),
            Err(RegistryError::CorruptSchemaFile { .. })
        ));
    }

    #[test]
    fn register_and_query_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path(), StoreDir::default()).unwrap();
        let a = info(A, &[]);
        assert!(reg.register(&a, &BTreeMap::new()).unwrap());
        let sig: Signature = format!("k:{}", "A".repeat(86) + "==").parse().unwrap();
        let mut b = info(B, &[A, B]);
        b.deriver = Some(sp(DRV));
        b.ultimate = true;
        b.signatures.insert(sig.clone());
        b.ca = Some(ContentAddress::Text(HashAlgo::Sha256.digest(b"x")));
        assert!(reg.register(&b, &BTreeMap::new()).unwrap());
        assert_eq!(reg.query_path_info(&sp(A)).unwrap().unwrap(), a);
        assert_eq!(reg.query_path_info(&sp(B)).unwrap().unwrap(), b);
        assert_eq!(reg.query_referrers(&sp(A)).unwrap(), [sp(B)].into());
        assert_eq!(reg.query_valid_paths().unwrap(), [sp(A), sp(B)].into());
        assert!(reg.query_path_info(&sp(OUT)).unwrap().is_none());
        // Stored exactly as Nix stores it.
        let conn = reg.lock();
        let row: (String, Option<i64>, Option<String>, Option<String>) = conn
            .query_row(
                "select hash, ultimate, sigs, deriver from ValidPaths where path = ?",
                [format!("/nix/store/{A}")],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(row, (a.nar_hash.to_base16_prefixed(), None, None, None));
    }

    #[test]
    fn refuses_invalid_reference_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path(), StoreDir::default()).unwrap();
        let err = reg.register(&info(B, &[A]), &BTreeMap::new()).unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidReference { .. }),
            "{err}"
        );
        assert!(!reg.is_valid(&sp(B)).unwrap());
        assert!(reg.query_valid_paths().unwrap().is_empty());
    }

    #[test]
    fn register_many_accepts_references_within_the_batch_or_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path(), StoreDir::default()).unwrap();
        let a = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
        let b = "ffffffffffffffffffffffffffffffff-b";
        let missing = "00000000000000000000000000000000-c";
        let bad = [info(a, &[b]), info(b, &[a, missing])];
        assert!(matches!(
            reg.register_many(&bad),
            Err(RegistryError::InvalidReference { .. })
        ));
        assert!(!reg.is_valid(&sp(a)).unwrap());
        let good = [info(a, &[b, a]), info(b, &[a])];
        assert_eq!(reg.register_many(&good).unwrap(), vec![true, true]);
        assert_eq!(
            reg.query_references(&sp(a)).unwrap(),
            [sp(a), sp(b)].into_iter().collect()
        );
        assert_eq!(reg.register_many(&good).unwrap(), vec![false, false]);
    }

    #[test]
    fn merges_signatures_and_records_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path(), StoreDir::default()).unwrap();
        let outputs: BTreeMap<String, StorePath> = [("out".to_owned(), sp(OUT))].into();
        assert!(reg.register(&info(DRV, &[]), &outputs).unwrap());
        assert_eq!(reg.derivation_outputs(&sp(DRV)).unwrap(), outputs);
        let s1 = Signature::new("k1".to_owned(), [1; 64]);
        let s2 = Signature::new("k2".to_owned(), [2; 64]);
        reg.add_signatures(&sp(DRV), &[s2.clone()].into()).unwrap();
        let mut again = info(DRV, &[]);
        again.signatures.insert(s1.clone());
        assert!(!reg.register(&again, &BTreeMap::new()).unwrap());
        assert_eq!(
            reg.query_path_info(&sp(DRV)).unwrap().unwrap().signatures,
            [s1, s2].into()
        );
        // The closure invariant holds on deletion too.
        reg.register(&info(A, &[]), &BTreeMap::new()).unwrap();
        reg.register(&info(B, &[A]), &BTreeMap::new()).unwrap();
        assert!(reg.invalidate(&sp(A)).is_err());
        reg.invalidate(&sp(B)).unwrap();
        reg.invalidate(&sp(A)).unwrap();
        assert!(matches!(
            reg.add_signatures(&sp(A), &BTreeSet::new()),
            Err(RegistryError::NotValid { .. })
        ));
    }
}
