//! The SQLite schema, as an ordered list of migrations (applied by
//! [`logic::schema`](super::super::logic::schema); PostgreSQL's list has the
//! same versions in its own SQL).
//!
//! JSON kept as text, times as integer seconds, booleans as 0 or 1.
//! `autoincrement` keeps ids of deleted rows from being reused
//! (PostgreSQL: a sequence).

/// Version 1: derivations, the cache index, builds and their dependencies,
/// agents and tokens.
const V1: &str = r#"
create table derivations (
    drv               text primary key not null,
    system            text not null,
    required_features text not null, -- JSON array
    outputs           text not null, -- JSON object: output name -> path
    input_drvs        text not null, -- JSON object: drv -> [output names]
    input_srcs        text not null  -- JSON array
);

-- The outputs again, one row each, so "are all outputs of this derivation
-- in the cache" is one indexed query.
create table derivation_outputs (
    drv    text not null references derivations(drv) on delete cascade,
    output text not null,
    path   text not null,
    primary key (drv, output)
);
create index derivation_outputs_path on derivation_outputs(path);

create table cache_paths (
    path       text primary key not null,
    nar_hash   text not null,
    nar_size   integer not null,
    refs       text not null, -- JSON array of full store paths
    deriver    text,
    url        text not null,
    file_size  integer not null
);

create table builds (
    id                 integer primary key autoincrement not null,
    drv                text not null references derivations(drv),
    system             text not null, -- the derivation's, kept here for the allocation index
    required_features  text not null, -- the derivation's (JSON, sorted), for the same reason
    state              text not null,
    priority           integer not null,
    effective_priority integer not null,
    critical_path      integer not null,
    tags               text not null, -- JSON object
    created_at         integer not null,
    defer_until        integer,
    waiting_on         integer not null default 0, -- rows of build_deps with build = id
    agent              text,
    lease_deadline     integer,
    attempts           integer not null default 0,
    next_attempt_at    integer,
    -- defer_until or next_attempt_at while it is in the future, else null:
    -- allocation clears it once passed, so the ready index holds only
    -- builds that can go now and is never walked past held ones.
    held_until         integer,
    avoid_agent        text,
    started_at         integer,
    finished_at        integer,
    message            text,
    -- For a build failed because a dependency failed: that derivation. Not
    -- the derivation's own failure, so a later submission looks again
    -- rather than answer with this build.
    failed_dependency  text
);
-- Allocation walks this index once per (system, feature set) the agent can
-- do, best first, and stops after the agent's free slots: it never sorts
-- the queue nor reads builds the agent cannot take.
create index builds_ready on builds(system, required_features, effective_priority desc,
    critical_path desc, id)
    where state = 'queued' and waiting_on = 0 and held_until is null;
create index builds_held on builds(held_until) where held_until is not null;
create index builds_drv on builds(drv, id);
create index builds_allocated on builds(agent, lease_deadline) where state = 'allocated';
create index builds_state on builds(state, id);

-- `build` waits for `dependency`; rows exist only while both are active.
create table build_deps (
    build      integer not null references builds(id),
    dependency integer not null references builds(id),
    primary key (build, dependency)
);
create index build_deps_dependency on build_deps(dependency, build);

create table agents (
    id                  text primary key not null,
    enabled             integer not null,
    systems             text not null, -- JSON array
    features            text not null, -- JSON array
    max_parallel_builds integer not null,
    created_at          integer not null,
    last_seen           integer
);

create table tokens (
    hash       blob primary key not null, -- SHA-256 of the secret
    id         text unique not null,      -- first 12 hex digits of the hash
    kind       text not null,             -- 'agent' or 'client'
    agent      text references agents(id) on delete cascade,
    role       text,
    created_at integer not null,
    expires_at integer,
    revoked    integer not null default 0
);
"#;

/// Version 2: the event outbox, each hook's delivery progress, and the
/// durable counters behind `/metrics`.
const V2: &str = r#"
-- Written in the transaction of the state change that causes it.
create table events (
    id      integer primary key autoincrement not null,
    kind    text not null,
    time    integer not null,
    payload text not null -- JSON object: the event's fields but id, event and time
);

-- Every event with id <= after has been delivered to (or skipped by) the hook.
create table hook_cursors (
    hook  text primary key not null,
    after integer not null
);

-- Events past a hook's cursor that were tried or delivered out of order.
create table hook_deliveries (
    hook      text not null,
    event     integer not null,
    attempts  integer not null,
    next_try  integer not null,
    delivered integer not null,
    primary key (hook, event)
);

-- Monotonic counters (lease expiries, bytes uploaded, builds by final
-- state, histogram buckets), bumped in the transactions that count.
create table counters (
    name  text primary key not null,
    value integer not null
);
"#;

/// Every migration, in order; a database at version `n` has had the first
/// `n` applied. Append only: never edit one that has shipped.
pub const MIGRATIONS: &[&str] = &[V1, V2];
