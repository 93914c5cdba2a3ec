//! Join tokens as the operator sees them: `ewii-hub token list` and `token revoke`. A token is
//! stored only as its SHA-256; it is named by the first 8 bytes of that hash (its id), which
//! says nothing about the token itself.

use rusqlite::params;

use super::{Db, StateError};

/// One unused join token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenRow {
    /// The first 8 bytes of its SHA-256, in hex: what `token revoke --id` takes.
    pub id: String,
    /// The Client it enrols.
    pub client: String,
    /// When it was made, seconds since the epoch.
    pub created_at: i64,
    /// When it stops working, seconds since the epoch.
    pub expires_at: i64,
    /// The customer's webhook URL it carries.
    pub webhook: Option<String>,
}

/// The id of a token, from its hash.
pub(super) fn token_id(hash: &[u8]) -> String {
    hex::encode(&hash[..hash.len().min(8)])
}

/// The id of `token` (what `token list` shows for it).
pub fn token_id_of(token: &str) -> String {
    token_id(&super::token_hash(token))
}

/// Which unused tokens `token revoke` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The one with this id.
    Id(String),
    /// Every one of this Client.
    Client(String),
}

impl Db {
    /// Every unused token, oldest first (expired ones included: they are deleted when used).
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StateError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT hash, client, created_at, expires_at, webhook FROM tokens ORDER BY created_at, client",
            )?;
            let rows = st.query_map([], |r| {
                Ok(TokenRow {
                    id: token_id(&r.get::<_, Vec<u8>>(0)?),
                    client: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    webhook: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Deletes the unused tokens `which` names; returns how many.
    pub fn delete_tokens(&self, which: &TokenSelector) -> Result<usize, StateError> {
        self.with(|c| match which {
            TokenSelector::Client(client) => {
                c.execute("DELETE FROM tokens WHERE client = ?1", params![client])
            }
            TokenSelector::Id(id) => {
                // Ids are short: match on the hash's prefix, in Rust, so no pattern syntax
                // from the argument reaches SQL.
                let mut st = c.prepare("SELECT hash FROM tokens")?;
                let hashes: Vec<Vec<u8>> = st
                    .query_map([], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<Result<_, _>>()?;
                let mut n = 0;
                for h in hashes.iter().filter(|h| token_id(h) == *id) {
                    n += c.execute("DELETE FROM tokens WHERE hash = ?1", params![h])?;
                }
                Ok(n)
            }
        })
    }
}
