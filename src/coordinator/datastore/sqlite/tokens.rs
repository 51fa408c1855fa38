//! Tokens, stored by the SHA-256 of their secret (the secret itself is
//! never stored), with a short public id for listing and revoking.

use rusqlite::{params, Connection, OptionalExtension};

use super::agents;
use super::rows;
use crate::coordinator::datastore::DatastoreError;
use crate::coordinator::model::{Expiry, Principal, Role, TokenRecord};

/// How many hex digits of the hash make the public id: 48 bits, enough
/// to tell an operator's tokens apart, far too few to guess the secret.
const ID_HEX_DIGITS: usize = 12;

fn public_id(hash: &[u8; 32]) -> String {
    hash.iter()
        .take(ID_HEX_DIGITS / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn principal_columns(p: &Principal) -> (&'static str, Option<&str>, Option<&'static str>) {
    match p {
        Principal::Agent { agent } => ("agent", Some(agent.as_str()), None),
        Principal::Client { role } => ("client", None, Some(role.as_str())),
    }
}

fn principal_from(
    kind: &str,
    agent: Option<String>,
    role: Option<String>,
) -> Result<Principal, DatastoreError> {
    match (kind, agent, role) {
        ("agent", Some(a), None) => Ok(Principal::Agent {
            agent: rows::agent_id(&a)?,
        }),
        ("client", None, Some(r)) => Ok(Principal::Client {
            role: r
                .parse::<Role>()
                .map_err(|_| DatastoreError::Corrupt(format!("token role '{r}'")))?,
        }),
        (kind, agent, role) => Err(DatastoreError::Corrupt(format!(
            "token of kind '{kind}' with agent {agent:?} and role {role:?}"
        ))),
    }
}

pub(super) fn add(
    conn: &Connection,
    hash: &[u8; 32],
    principal: &Principal,
    expires_at: Expiry,
    now: i64,
) -> Result<String, DatastoreError> {
    if let Principal::Agent { agent } = principal {
        agents::require(conn, agent)?;
    }
    let id = public_id(hash);
    let (kind, agent, role) = principal_columns(principal);
    conn.execute(
        "insert into tokens (hash, id, kind, agent, role, created_at, expires_at) \
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![&hash[..], id, kind, agent, role, now, expires_at],
    )?;
    Ok(id)
}

pub(super) fn lookup(
    conn: &Connection,
    hash: &[u8; 32],
    now: i64,
) -> Result<Option<Principal>, DatastoreError> {
    // An agent token counts only while its agent exists and is enabled.
    let row: Option<(String, Option<String>, Option<String>)> = conn
        .prepare_cached(
            "select t.kind, t.agent, t.role from tokens t left join agents a on a.id = t.agent \
             where t.hash = ?1 and t.revoked = 0 and (t.expires_at is null or t.expires_at > ?2) \
             and (t.kind <> 'agent' or a.enabled = 1)",
        )?
        .query_row(params![&hash[..], now], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    row.map(|(kind, agent, role)| principal_from(&kind, agent, role))
        .transpose()
}

pub(super) fn revoke(conn: &Connection, id: &str) -> Result<(), DatastoreError> {
    if conn.execute("update tokens set revoked = 1 where id = ?1", params![id])? == 0 {
        return Err(DatastoreError::NoToken(id.to_owned()));
    }
    Ok(())
}

pub(super) fn list(conn: &Connection) -> Result<Vec<TokenRecord>, DatastoreError> {
    type Raw = (
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
        Option<i64>,
        bool,
    );
    let raw: Vec<Raw> = conn
        .prepare_cached(
            "select id, kind, agent, role, created_at, expires_at, revoked from tokens \
             order by created_at, id",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    raw.into_iter()
        .map(|(id, kind, agent, role, created_at, expires_at, revoked)| {
            Ok(TokenRecord {
                id,
                principal: principal_from(&kind, agent, role)?,
                created_at,
                expires_at,
                revoked,
            })
        })
        .collect()
}
