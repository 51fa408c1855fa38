//! Tokens, stored by the SHA-256 of their secret (the secret itself is
//! never stored), with a short public id for listing and revoking.

use super::agents;
use super::rows;
use crate::coordinator::datastore::sql::{args, Sql};
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
    conn: &dyn Sql,
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
        args![&hash[..], &id, kind, agent, role, now, expires_at],
    )?;
    Ok(id)
}

pub(super) fn lookup(
    conn: &dyn Sql,
    hash: &[u8; 32],
    now: i64,
) -> Result<Option<Principal>, DatastoreError> {
    // An agent token counts only while its agent exists and is enabled.
    conn.query_opt(
        "select t.kind, t.agent, t.role from tokens t left join agents a on a.id = t.agent \
         where t.hash = ?1 and not t.revoked and (t.expires_at is null or t.expires_at > ?2) \
         and (t.kind <> 'agent' or a.enabled)",
        args![&hash[..], now],
    )?
    .map(|r| principal_from(&r.get::<String>(0)?, r.get(1)?, r.get(2)?))
    .transpose()
}

pub(super) fn revoke(conn: &dyn Sql, id: &str) -> Result<(), DatastoreError> {
    if conn.execute("update tokens set revoked = true where id = ?1", args![id])? == 0 {
        return Err(DatastoreError::NoToken(id.to_owned()));
    }
    Ok(())
}

pub(super) fn list(conn: &dyn Sql) -> Result<Vec<TokenRecord>, DatastoreError> {
    conn.query(
        "select id, kind, agent, role, created_at, expires_at, revoked from tokens \
         order by created_at, id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(TokenRecord {
            id: r.get(0)?,
            principal: principal_from(&r.get::<String>(1)?, r.get(2)?, r.get(3)?)?,
            created_at: r.get(4)?,
            expires_at: r.get(5)?,
            revoked: r.get(6)?,
        })
    })
    .collect()
}
