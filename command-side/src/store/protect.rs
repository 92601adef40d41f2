//! `pcf events protect`: the one sanctioned rewrite of history. Events written before personal
//! data was sealed (version "1") get their personal fields sealed in place with their user's
//! key (a user without one gets one), or, for a deleted account, erased. Each event is
//! rewritten at most once (only while it is still version "1"), so the work is idempotent,
//! resumable and safe beside live traffic, from any number of processes.

use async_trait::async_trait;
use pcf_adapters::personal::{self, DataKey};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

use super::sql::{Arg, SqlBackend, SqlDb, SqlStore};
use super::StoreError;

/// What one step of protection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protected {
    /// Events whose personal fields were sealed.
    pub sealed: u64,
    /// Events of deleted accounts whose personal fields were erased.
    pub erased: u64,
    /// Events without personal fields (`AccountDeleted`), moved to version "2" as they are.
    pub restamped: u64,
}

impl Protected {
    pub fn total(&self) -> u64 {
        self.sealed + self.erased + self.restamped
    }
}

/// The rewrite of older plain events (`pcf events protect`).
#[async_trait]
pub trait ProtectHistory: Send + Sync {
    /// How many events still hold personal data in plain text (version "1").
    async fn count_plain(&self) -> Result<u64, StoreError>;

    /// Protects up to `limit` of the oldest plain events; nothing left when it protects none.
    async fn protect_some(&self, limit: u32) -> Result<Protected, StoreError>;

    /// Destroys any key left to a deleted account (one a protection raced with the
    /// deletion to give it). Returns how many.
    async fn destroy_keys_of_deleted(&self) -> Result<u64, StoreError>;
}

/// One plain event to protect.
struct PlainEvent {
    user: Uuid,
    sequence: u64,
    event_type: String,
    payload: Value,
}

#[async_trait]
impl<B: SqlBackend> ProtectHistory for SqlStore<B> {
    async fn count_plain(&self) -> Result<u64, StoreError> {
        let rows = B::Db::fetch_all(
            &self.reader,
            "SELECT count(*) FROM events WHERE event_version = '1'",
            &[],
        )
        .await?;
        let n = rows.first().map(|r| B::Db::int(r, 0)).transpose()?;
        Ok(n.unwrap_or(0) as u64)
    }

    async fn protect_some(&self, limit: u32) -> Result<Protected, StoreError> {
        let sql = self.sql;
        let rows =
            B::Db::fetch_all(&self.writer, sql.select_plain, &[Arg::Int(limit.into())]).await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let user = B::Db::text(row, 0)?;
            events.push(PlainEvent {
                user: user
                    .parse()
                    .map_err(|_| StoreError::Internal(format!("aggregate id {user:?}")))?,
                sequence: B::Db::int(row, 1)? as u64,
                event_type: B::Db::text(row, 2)?,
                payload: B::Db::json(row, 3)?,
            });
        }
        let users: Vec<Uuid> = events
            .iter()
            .map(|e| e.user)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let keys = self.keys_for_protection(&users).await?;
        let mut done = Protected::default();
        for mut event in events {
            let key = keys.get(&event.user);
            let Some(inner) = event.payload.get_mut(&event.event_type) else {
                continue;
            };
            let personal = personal::has_plain_personal_data(inner);
            match key {
                _ if !personal => {}
                Some(key) => {
                    let aad = personal::event_aad(event.user, event.sequence, &event.event_type);
                    personal::seal_payload(inner, key, &aad);
                }
                None => personal::erase_payload(inner),
            }
            let args = [
                Arg::text(event.payload.to_string()),
                Arg::text(event.user.to_string()),
                Arg::Int(event.sequence as i64),
            ];
            if B::Db::execute(&self.writer, sql.rewrite_plain, &args).await? == 1 {
                match key {
                    _ if !personal => done.restamped += 1,
                    Some(_) => done.sealed += 1,
                    None => done.erased += 1,
                }
            }
        }
        Ok(done)
    }

    async fn destroy_keys_of_deleted(&self) -> Result<u64, StoreError> {
        let destroyed = B::Db::execute(
            &self.writer,
            "DELETE FROM user_keys WHERE user_id IN ( \
                 SELECT aggregate_id FROM events WHERE event_type = 'AccountDeleted')",
            &[],
        )
        .await?;
        Ok(destroyed)
    }
}

impl<B: SqlBackend> SqlStore<B> {
    /// The keys to seal these users' events with: their own, or a new one for a live user
    /// without; none for a deleted account, whose events are erased.
    async fn keys_for_protection(
        &self,
        users: &[Uuid],
    ) -> Result<HashMap<Uuid, DataKey>, StoreError> {
        let keys = self.keys()?;
        let mut found = keys.fetch(users).await?;
        let keyless: Vec<Uuid> = users
            .iter()
            .filter(|u| !found.contains_key(u))
            .copied()
            .collect();
        let deleted = keys.deleted_among(&keyless).await?;
        let mut created = Vec::new();
        for user in keyless.into_iter().filter(|u| !deleted.contains(u)) {
            let wrapped = keys.keyring().wrap(&user.to_string(), &DataKey::generate());
            keys.insert_if_absent(user, &wrapped).await?;
            created.push(user);
        }
        // Whichever key was stored first (a command may have given one meanwhile).
        found.extend(keys.fetch(&created).await?);
        Ok(found)
    }
}
