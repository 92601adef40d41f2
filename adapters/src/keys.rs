//! The key table (`user_keys`, `kek_checks`) in PostgreSQL or SQLite: the one place its SQL is
//! written, but for PostgreSQL's append, which inserts and deletes a key inside its one
//! statement (SQLite's uses `insert_sqlite` and `delete_sqlite`); every reader of events opens their personal fields through
//! `Keys`, which unwraps data keys with the configured `Keyring` and keeps the unwrapped ones
//! in a bounded cache.

use crate::personal::{self, DataKey, KeyError, Keyring, Opening, Tampered, WrappedKey};
use pcf_domain::events::PersonalFields;
use pcf_domain::ports::{Change, PortError};
use pcf_domain::EventEnvelope;
use sqlx::{PgPool, Row, SqliteConnection, SqlitePool};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The database holding the key table.
#[derive(Clone, Debug)]
pub enum KeyDb {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Unwrapped keys kept at most, about 100 bytes each; when full, the cache starts afresh.
pub const DEFAULT_CACHE_CAPACITY: usize = 100_000;

/// An event whose personal fields could not be opened: altered, moved, or its live user's key
/// is missing. Its payload stays sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unopened {
    /// Its index in the slice given to `Keys::open`.
    pub index: usize,
    pub event_id: Uuid,
    pub reason: String,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct KeyStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Events whose sealed fields did not open (integrity errors).
    pub integrity_errors: AtomicU64,
}

/// What opens the personal fields of events for readers allowed to see them: `Keys`, or
/// `PlainOnly` where no sealed event can occur.
#[async_trait::async_trait]
pub trait Opener: Send + Sync {
    /// Opens the sealed personal fields of `events` in place (plain events pass through): with
    /// the user's key they read as plain fields; for a deleted user, as erased. The events
    /// that do not open come back, their payloads still sealed.
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError>;

    /// `open` for events read as a fold needs them (`EventLog::read_changes`), opened into
    /// the decoded event. By default through `open`, each sealed change made an envelope
    /// and read back (`Keys` opens changes in place).
    async fn open_changes(&self, changes: &mut [Change]) -> Result<Vec<Unopened>, PortError> {
        let sealed: Vec<usize> = (0..changes.len())
            .filter(|&i| changes[i].sealed.is_some() && changes[i].event.is_ok())
            .collect();
        let mut envelopes: Vec<EventEnvelope> = sealed
            .iter()
            .map(|&i| sealed_envelope(&changes[i]))
            .collect();
        let unopened = self.open(&mut envelopes).await?;
        for (&i, envelope) in sealed.iter().zip(&envelopes) {
            changes[i] = Change::of(envelope);
        }
        Ok(unopened
            .into_iter()
            .map(|u| Unopened {
                index: sealed[u.index],
                ..u
            })
            .collect())
    }
}

/// A sealed change as the envelope it was read from (what `open` needs of it).
fn sealed_envelope(change: &Change) -> EventEnvelope {
    let (event_type, recorded_at, mut payload) = match &change.event {
        Ok(event) => (event.type_name(), event.occurred_at(), event.payload()),
        Err(_) => ("", Default::default(), serde_json::json!({})),
    };
    if let (Some(fields), Some(sealed)) = (payload.as_object_mut(), &change.sealed) {
        for name in pcf_domain::auth::PERSONAL_FIELDS {
            fields.remove(name);
        }
        fields.insert(personal::SEALED.to_owned(), sealed.clone().into());
    }
    EventEnvelope {
        event_id: change.event_id,
        aggregate_type: "User".into(),
        aggregate_id: change.aggregate_id,
        sequence: change.sequence,
        position: change.position,
        event_type: event_type.into(),
        event_version: personal::SEALED_VERSION.into(),
        recorded_at,
        metadata: Default::default(),
        payload,
    }
}

/// An opener without keys, for logs of plain events only (tests, tools): every sealed event
/// comes back unopened.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainOnly;

#[async_trait::async_trait]
impl Opener for PlainOnly {
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError> {
        Ok(events
            .iter()
            .enumerate()
            .filter(|(_, e)| personal::is_sealed(&e.payload))
            .map(|(index, e)| Unopened {
                index,
                event_id: e.event_id,
                reason: "no keys to open sealed personal data".into(),
            })
            .collect())
    }

    async fn open_changes(&self, changes: &mut [Change]) -> Result<Vec<Unopened>, PortError> {
        Ok(changes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.sealed.is_some())
            .map(|(index, c)| Unopened {
                index,
                event_id: c.event_id,
                reason: "no keys to open sealed personal data".into(),
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl Opener for Keys {
    async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError> {
        Keys::open(self, events).await
    }

    async fn open_changes(&self, changes: &mut [Change]) -> Result<Vec<Unopened>, PortError> {
        self.open_all(changes).await
    }
}

/// Opens personal data for readers allowed to see it, and checks the configured KEKs.
pub struct Keys {
    db: KeyDb,
    keyring: Arc<Keyring>,
    cache: Mutex<HashMap<Uuid, (WrappedKey, DataKey)>>,
    capacity: usize,
    stats: Arc<KeyStats>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keyring", &self.keyring)
            .finish()
    }
}

/// Runs the same sqlx code on whichever pool the key table lives in, `$pool` bound to it: the
/// statements are written in SQL both databases read (`$n` parameters included), and sqlx's
/// types for the two drivers differ, so each arm is compiled on its own.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            KeyDb::Postgres($pool) => $body,
            KeyDb::Sqlite($pool) => $body,
        }
    };
}

/// What personal data a payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Personal {
    Sealed,
    /// In plain text: an older, version-1 event.
    Plain,
    None,
}

/// An event whose personal fields `Keys` opens in place: a whole envelope (its payload) or
/// a `Change` (its decoded event).
trait Openable {
    fn user(&self) -> Uuid;
    fn event_id(&self) -> Uuid;
    /// What personal data it holds (each event looked at once: a rebuild opens the log).
    fn personal(&self) -> Personal;
    /// Opens its sealed fields with its user's key.
    fn open_with(&mut self, key: &Opening) -> Result<(), Tampered>;
    /// Marks its personal fields erased, removing them.
    fn erase(&mut self);
}

impl Openable for EventEnvelope {
    fn user(&self) -> Uuid {
        self.aggregate_id
    }
    fn event_id(&self) -> Uuid {
        self.event_id
    }
    fn personal(&self) -> Personal {
        if personal::is_sealed(&self.payload) {
            Personal::Sealed
        } else if personal::has_plain_personal_data(&self.payload) {
            Personal::Plain
        } else {
            Personal::None
        }
    }
    fn open_with(&mut self, key: &Opening) -> Result<(), Tampered> {
        let aad = personal::event_aad(self.aggregate_id, self.sequence, &self.event_type);
        personal::open_payload_with(&mut self.payload, key, &aad)
    }
    fn erase(&mut self) {
        personal::erase_payload(&mut self.payload);
    }
}

impl Openable for Change {
    fn user(&self) -> Uuid {
        self.aggregate_id
    }
    fn event_id(&self) -> Uuid {
        self.event_id
    }
    fn personal(&self) -> Personal {
        match (&self.sealed, &self.event) {
            (Some(_), _) => Personal::Sealed,
            (None, Ok(event)) if !self.erased && event.has_personal_fields() => Personal::Plain,
            _ => Personal::None,
        }
    }
    fn open_with(&mut self, key: &Opening) -> Result<(), Tampered> {
        let Some(sealed) = &self.sealed else {
            return Ok(());
        };
        let Ok(event) = &mut self.event else {
            return Err(Tampered("the event does not decode"));
        };
        let aad = personal::event_aad(self.aggregate_id, self.sequence, event.type_name());
        let plain = key.open_text(&aad, sealed)?;
        let fields: PersonalFields =
            serde_json::from_slice(&plain).map_err(|_| Tampered("not a JSON object"))?;
        event.fill_personal(fields);
        self.sealed = None;
        Ok(())
    }
    fn erase(&mut self) {
        self.sealed = None;
        self.erased = true;
        if let Ok(event) = &mut self.event {
            event.fill_personal(PersonalFields::default());
        }
    }
}

/// The users of `items` whose personal data is of `kind`, each once.
fn distinct_users<T: Openable>(items: &[T], kinds: &[Personal], kind: Personal) -> Vec<Uuid> {
    let users: HashSet<Uuid> = items
        .iter()
        .zip(kinds)
        .filter(|(_, k)| **k == kind)
        .map(|(e, _)| e.user())
        .collect();
    users.into_iter().collect()
}

/// A list of user ids as the JSON array text the statements read it from.
fn id_list(users: &[Uuid]) -> String {
    serde_json::to_string(&users.iter().map(Uuid::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

fn db_error(e: sqlx::Error) -> PortError {
    crate::sql::port_error("key table", e)
}

impl Keys {
    pub fn new(db: KeyDb, keyring: Arc<Keyring>) -> Self {
        Self {
            db,
            keyring,
            cache: Mutex::new(HashMap::new()),
            capacity: DEFAULT_CACHE_CAPACITY,
            stats: Arc::new(KeyStats::default()),
        }
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    pub fn stats(&self) -> Arc<KeyStats> {
        self.stats.clone()
    }

    /// Counts (in `KeyStats::integrity_errors`) and logs sealed personal data that does not
    /// open: `what` names where it is (an event's id, a user's event, a command's result).
    pub fn integrity_error(&self, what: std::fmt::Arguments<'_>, reason: &str) {
        self.stats.integrity_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%what, %reason, "personal data does not open");
    }

    /// The data key of `user` for a writer: from the cache without asking the database when
    /// it is there, else from the key table. A writer may trust a cached key: no event is
    /// appended after a user's `AccountDeleted` (the appends of one user are serialised by
    /// their sequence), so a key destroyed meanwhile never seals anything.
    pub async fn key_for_writing(&self, user: Uuid) -> Result<Option<DataKey>, PortError> {
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(&user).map(|(_, key)| key.clone())
        };
        if let Some(key) = cached {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(key));
        }
        Ok(self.fetch(&[user]).await?.remove(&user))
    }

    /// Drops `user`'s key from this process's cache (its account was deleted here).
    pub fn forget(&self, user: Uuid) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(&user);
    }

    /// The data keys of those of `users` that have one (live users), unwrapped.
    #[tracing::instrument(level = "debug", name = "keys.fetch", skip_all, fields(users = users.len()))]
    pub async fn fetch(&self, users: &[Uuid]) -> Result<HashMap<Uuid, DataKey>, PortError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let wrapped = self.fetch_wrapped(users).await?;
        let mut keys = HashMap::with_capacity(wrapped.len());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for (user, wrapped) in wrapped {
            if let Some((cached_wrap, key)) = cache.get(&user) {
                if *cached_wrap == wrapped {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    keys.insert(user, key.clone());
                    continue;
                }
            }
            self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
            let key = self
                .keyring
                .unwrap(&user.to_string(), &wrapped)
                .map_err(|e| PortError::Internal(e.to_string()))?;
            if cache.len() >= self.capacity {
                cache.clear();
            }
            cache.insert(user, (wrapped, key.clone()));
            keys.insert(user, key);
        }
        Ok(keys)
    }

    async fn fetch_wrapped(&self, users: &[Uuid]) -> Result<Vec<(Uuid, WrappedKey)>, PortError> {
        let sql = match &self.db {
            KeyDb::Postgres(_) => {
                "SELECT user_id, kek_id, wrapped FROM user_keys \
                 WHERE user_id IN (SELECT jsonb_array_elements_text($1::jsonb))"
            }
            KeyDb::Sqlite(_) => {
                "SELECT user_id, kek_id, wrapped FROM user_keys \
                 WHERE user_id IN (SELECT value FROM json_each($1))"
            }
        };
        let ids = id_list(users);
        on_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).bind(&ids).fetch_all(pool).await.map_err(db_error)?;
            rows.iter().map(wrapped_key).collect()
        })
    }

    /// Stores `user`'s key unless it has one already (`pcf events protect` giving one to a
    /// user created before keys existed, maybe beside a command doing the same).
    pub async fn insert_if_absent(
        &self,
        user: Uuid,
        wrapped: &WrappedKey,
    ) -> Result<(), PortError> {
        let sql = "INSERT INTO user_keys (user_id, kek_id, wrapped) VALUES ($1, $2, $3) \
                   ON CONFLICT (user_id) DO NOTHING";
        on_pool!(&self.db, pool => sqlx::query(sql)
            .bind(user.to_string())
            .bind(&wrapped.kek_id)
            .bind(&wrapped.bytes)
            .execute(pool)
            .await
            .map(drop))
        .map_err(db_error)
    }

    /// Those of `users` whose account is deleted (an `AccountDeleted` event in the log).
    pub async fn deleted_among(&self, users: &[Uuid]) -> Result<HashSet<Uuid>, PortError> {
        if users.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = match &self.db {
            KeyDb::Postgres(_) => {
                "SELECT aggregate_id FROM events WHERE aggregate_type = 'User' \
                 AND event_type = 'AccountDeleted' \
                 AND aggregate_id IN (SELECT jsonb_array_elements_text($1::jsonb))"
            }
            KeyDb::Sqlite(_) => {
                "SELECT aggregate_id FROM events WHERE aggregate_type = 'User' \
                 AND event_type = 'AccountDeleted' \
                 AND aggregate_id IN (SELECT value FROM json_each($1))"
            }
        };
        let ids = id_list(users);
        let deleted: Vec<String> =
            on_pool!(&self.db, pool => sqlx::query_scalar(sql).bind(&ids).fetch_all(pool).await)
                .map_err(db_error)?;
        Ok(deleted.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Opens the sealed personal fields of `events` in place (plain events pass through):
    /// with the user's key they read as plain fields; for a deleted user, as erased. The
    /// events that do not open come back (and are counted): a sealed value that was altered
    /// or moved, or a live user whose key is missing.
    pub async fn open(&self, events: &mut [EventEnvelope]) -> Result<Vec<Unopened>, PortError> {
        self.open_all(events).await
    }

    async fn open_all<T: Openable>(&self, items: &mut [T]) -> Result<Vec<Unopened>, PortError> {
        let kinds: Vec<Personal> = items.iter().map(Openable::personal).collect();
        let sealed_for = distinct_users(items, &kinds, Personal::Sealed);
        // Older events hold personal fields in plain text: a deleted account's read as
        // erased too (until `pcf events protect` erases them in place).
        let plain_for = distinct_users(items, &kinds, Personal::Plain);
        if sealed_for.is_empty() && plain_for.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.fetch(&sealed_for).await?;
        let keyless: Vec<Uuid> = sealed_for
            .iter()
            .filter(|u| !keys.contains_key(u))
            .chain(&plain_for)
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let deleted = if keyless.is_empty() {
            HashSet::new()
        } else {
            self.deleted_among(&keyless).await?
        };
        let mut unopened = Vec::new();
        // Each user's key made ready once for the batch.
        let mut openings: HashMap<Uuid, Opening> = HashMap::new();
        for (index, (item, kind)) in items.iter_mut().zip(kinds).enumerate() {
            let user = item.user();
            match kind {
                Personal::Plain if deleted.contains(&user) => {
                    item.erase();
                    continue;
                }
                Personal::Plain | Personal::None => continue,
                Personal::Sealed => {}
            }
            let outcome = match keys.get(&user) {
                Some(key) => item
                    .open_with(openings.entry(user).or_insert_with(|| Opening::new(key)))
                    .map_err(|Tampered(why)| format!("sealed personal data: {why}")),
                None if deleted.contains(&user) => {
                    item.erase();
                    Ok(())
                }
                None => Err(format!("no data key for the live user {user}")),
            };
            if let Err(reason) = outcome {
                let event_id = item.event_id();
                self.integrity_error(format_args!("event {event_id}"), &reason);
                unopened.push(Unopened {
                    index,
                    event_id,
                    reason,
                });
            }
        }
        Ok(unopened)
    }

    /// Checks the configured KEKs against the key table: every KEK that wrapped a stored key
    /// must be configured, and be the same key (its check value opens). Records the check
    /// value of the current KEK if it has none yet. Errors say which KEK is missing or wrong.
    pub async fn check_keks(&self) -> Result<(), KeyCheckError> {
        let stored: Vec<(String, Vec<u8>)> = on_pool!(&self.db, pool => {
            sqlx::query_as("SELECT kek_id, check_value FROM kek_checks")
                .fetch_all(pool)
                .await
        })
        .map_err(|e| KeyCheckError::Port(db_error(e)))?;
        // Every KEK that ever wrapped a key has its check value here (recorded below before
        // a process wraps with it), so the KEKs in use are found among these few rows, one
        // index look-up each, not by reading the whole key table at every start.
        let in_use =
            "SELECT count(*) FROM (SELECT 1 FROM user_keys WHERE kek_id = $1 LIMIT 1) AS k";
        for (id, value) in &stored {
            if self.keyring.ids().any(|k| k == id) {
                self.keyring.verify(id, value).map_err(KeyCheckError::Key)?;
                continue;
            }
            let used: i64 = on_pool!(&self.db, pool => {
                sqlx::query_scalar(in_use).bind(id).fetch_one(pool).await
            })
            .map_err(|e| KeyCheckError::Port(db_error(e)))?;
            if used > 0 {
                return Err(KeyCheckError::Key(KeyError::UnknownKek(id.clone())));
            }
        }
        // Recorded only once the configuration is known to be right: a refused start leaves
        // nothing behind.
        let current = self.keyring.current_id().to_owned();
        let check = self
            .keyring
            .check_value(&current)
            .map_err(KeyCheckError::Key)?;
        let insert = "INSERT INTO kek_checks (kek_id, check_value) VALUES ($1, $2) \
                      ON CONFLICT (kek_id) DO NOTHING";
        on_pool!(&self.db, pool => sqlx::query(insert)
            .bind(&current)
            .bind(&check)
            .execute(pool)
            .await
            .map(drop))
        .map_err(|e| KeyCheckError::Port(db_error(e)))?;
        Ok(())
    }

    /// The KEK ids that wrap at least one stored key.
    pub async fn kek_ids_in_use(&self) -> Result<Vec<String>, PortError> {
        let sql = "SELECT DISTINCT kek_id FROM user_keys";
        on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await).map_err(db_error)
    }

    /// How many keys are wrapped by another KEK than the current one.
    pub async fn count_to_rotate(&self) -> Result<u64, PortError> {
        let current = self.keyring.current_id();
        let sql = "SELECT count(*) FROM user_keys WHERE kek_id <> $1";
        let n: i64 = on_pool!(&self.db, pool => {
            sqlx::query_scalar(sql).bind(current).fetch_one(pool).await
        })
        .map_err(db_error)?;
        Ok(n as u64)
    }

    /// Re-wraps up to `limit` keys wrapped by an older KEK under the current one; returns
    /// how many. Each key is replaced only if its row is unchanged (a key deleted meanwhile
    /// stays deleted), so it is safe while traffic runs and from several processes.
    pub async fn rotate_some(&self, limit: u32) -> Result<u64, PortError> {
        let current = self.keyring.current_id().to_owned();
        let sql = "SELECT user_id, kek_id, wrapped FROM user_keys WHERE kek_id <> $1 LIMIT $2";
        let old: Vec<(Uuid, WrappedKey)> = on_pool!(&self.db, pool => {
            let rows = sqlx::query(sql)
                .bind(&current)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(db_error)?;
            rows.iter().map(wrapped_key).collect::<Result<_, _>>()
        })?;
        let update = "UPDATE user_keys SET kek_id = $1, wrapped = $2 \
                      WHERE user_id = $3 AND kek_id = $4 AND wrapped = $5";
        let mut done = 0;
        for (user, old) in old {
            let key = self
                .keyring
                .unwrap(&user.to_string(), &old)
                .map_err(|e| PortError::Internal(e.to_string()))?;
            let new = self.keyring.wrap(&user.to_string(), &key);
            done += on_pool!(&self.db, pool => sqlx::query(update)
                .bind(&new.kek_id)
                .bind(&new.bytes)
                .bind(user.to_string())
                .bind(&old.kek_id)
                .bind(&old.bytes)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()))
            .map_err(db_error)?;
        }
        Ok(done)
    }
}

/// Why the configured KEKs cannot serve the key table.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(transparent)]
    Key(KeyError),
    #[error("could not check the key-encryption keys: {0}")]
    Port(PortError),
}

fn wrapped_key<R: Row>(row: &R) -> Result<(Uuid, WrappedKey), PortError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let user: String = row.try_get("user_id").map_err(db_error)?;
    let user = user
        .parse()
        .map_err(|_| PortError::Internal(format!("key table: {user:?} is not a user id")))?;
    Ok((
        user,
        WrappedKey {
            kek_id: row.try_get("kek_id").map_err(db_error)?,
            bytes: row.try_get("wrapped").map_err(db_error)?,
        },
    ))
}

/// A new user's key, wrapped, inserted in an SQLite append's transaction (PostgreSQL's
/// append does it in its one statement).
pub async fn insert_sqlite(
    conn: &mut SqliteConnection,
    user: Uuid,
    wrapped: &WrappedKey,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO user_keys (user_id, kek_id, wrapped) VALUES (?, ?, ?)")
        .bind(user.to_string())
        .bind(&wrapped.kek_id)
        .bind(&wrapped.bytes)
        .execute(conn)
        .await
        .map(drop)
}

/// Destroys a user's key in an SQLite append's transaction; false if it was gone.
pub async fn delete_sqlite(conn: &mut SqliteConnection, user: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query("DELETE FROM user_keys WHERE user_id = ?")
        .bind(user.to_string())
        .execute(conn)
        .await
        .map(|r| r.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::personal::Kek;

    /// The key table of SQLite migration 0003, in memory.
    async fn sqlite_keys(keks: Vec<Kek>) -> (SqlitePool, Keys) {
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        for sql in [
            "CREATE TABLE user_keys (user_id TEXT PRIMARY KEY, kek_id TEXT NOT NULL, \
             wrapped BLOB NOT NULL, created_at TEXT)",
            "CREATE TABLE kek_checks (kek_id TEXT PRIMARY KEY, check_value BLOB NOT NULL, \
             created_at TEXT)",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        let keys = Keys::new(
            KeyDb::Sqlite(pool.clone()),
            Arc::new(Keyring::new(keks).unwrap()),
        );
        (pool, keys)
    }

    #[tokio::test]
    async fn a_start_names_the_kek_in_use_it_lacks_or_has_wrong_and_records_nothing_then() {
        let old = Kek::generate("old");
        let (pool, keys) = sqlite_keys(vec![old.clone()]).await;
        keys.check_keks().await.unwrap();
        let user = Uuid::now_v7();
        let wrapped = keys.keyring().wrap(&user.to_string(), &DataKey::generate());
        keys.insert_if_absent(user, &wrapped).await.unwrap();

        let lacking = Keys::new(
            KeyDb::Sqlite(pool.clone()),
            Arc::new(Keyring::new(vec![Kek::generate("new")]).unwrap()),
        );
        assert!(matches!(
            lacking.check_keks().await,
            Err(KeyCheckError::Key(KeyError::UnknownKek(id))) if id == "old"
        ));
        let wrong = Keys::new(
            KeyDb::Sqlite(pool.clone()),
            Arc::new(Keyring::new(vec![Kek::generate("old")]).unwrap()),
        );
        assert!(matches!(
            wrong.check_keks().await,
            Err(KeyCheckError::Key(KeyError::WrongKek(id))) if id == "old"
        ));
        let ids: Vec<String> = sqlx::query_scalar("SELECT kek_id FROM kek_checks")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, ["old"], "the refused starts recorded nothing");

        // Both KEKs, the new one first: accepted; once no key uses the old one any more,
        // the new one alone is.
        let new = Kek::generate("new");
        let both = Keys::new(
            KeyDb::Sqlite(pool.clone()),
            Arc::new(Keyring::new(vec![new.clone(), old]).unwrap()),
        );
        both.check_keks().await.unwrap();
        assert_eq!(both.rotate_some(10).await.unwrap(), 1);
        let new_only = Keys::new(
            KeyDb::Sqlite(pool),
            Arc::new(Keyring::new(vec![new]).unwrap()),
        );
        new_only.check_keks().await.unwrap();
        assert_eq!(new_only.fetch(&[user]).await.unwrap().len(), 1);
    }
}
