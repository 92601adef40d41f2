//! The embedded event store on SQLite: sqlite-es for loading, one transaction of our own per
//! append. SQLite has one writer at a time, so appends go through a single connection (no
//! lock upgrades, no `SQLITE_BUSY`) and `global_position` order is commit order.

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::DomainEvent;
use cqrs_es::EventStore as _;
use pcf_domain::ports::{EmailDirectory, EventLog, LogQuery, PortError};
use pcf_domain::{Email, EventEnvelope, Position, User};
use sqlite_es::SqliteEventRepository;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

use super::CommitSignal;
use uuid::Uuid;

use super::{
    email_changes, is_unique_violation, metadata_value, retention_seconds, stored_command,
    stored_payload, AppendError, AppendRequest, CommandResult, CommandStore, CommitFeed,
    EmailChange, Lease, RelayStore, SoleLease, StoreError, StoreHealth, StoredCommand, StoredEvent,
    PRUNE_BATCH,
};

const EVENT_COLUMNS: &str = "event_id, aggregate_id, sequence, event_type, event_version, \
     payload, metadata, global_position, recorded_at";

/// The time `COMMAND_ID_RETENTION` ago, in the format of `processed_commands.recorded_at`
/// (which compares as text in time order), with the retention as its argument
/// (`retention_modifier`).
const RETENTION_CUTOFF: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2)";

/// The retention as an SQLite date modifier.
fn retention_modifier() -> String {
    format!("-{} seconds", retention_seconds())
}

/// The event store in one SQLite file.
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    loader: PersistedEventStore<SqliteEventRepository, User>,
    committed: CommitSignal,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Events are the source of truth: every commit reaches the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(false))
            .await?;
        Ok(Self::from_pools(reader, writer))
    }

    fn from_pools(reader: SqlitePool, writer: SqlitePool) -> Self {
        let loader =
            PersistedEventStore::new_event_store(SqliteEventRepository::new(reader.clone()));
        Self {
            reader,
            writer,
            loader,
            committed: CommitSignal::new(),
        }
    }

    /// The pool that may write (migrations use it).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Internal(format!("recorded_at {s:?}: {e}")))
}

fn row_to_event(row: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let event_id: String = row.try_get("event_id")?;
    let global: i64 = row.try_get("global_position")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    Ok(StoredEvent {
        event_id: Uuid::parse_str(&event_id)
            .map_err(|e| StoreError::Internal(format!("event id {event_id:?}: {e}")))?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        position: Position::new(global as u64, global as u64),
        recorded_at: parse_time(&recorded_at)?,
    })
}

fn rows_to_envelopes(rows: &[SqliteRow]) -> Result<Vec<EventEnvelope>, StoreError> {
    rows.iter()
        .map(|r| row_to_event(r).and_then(StoredEvent::into_envelope))
        .collect()
}

fn classify(e: sqlx::Error, on_unique: AppendError) -> AppendError {
    if is_unique_violation(&e) {
        on_unique
    } else {
        AppendError::Store(e.into())
    }
}

#[async_trait]
impl CommandStore for SqliteStore {
    async fn load(&self, user_id: Uuid) -> Result<(User, u64), StoreError> {
        let context = self
            .loader
            .load_aggregate(&user_id.to_string())
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok((context.aggregate, context.current_sequence as u64))
    }

    async fn append(&self, req: AppendRequest<'_>) -> Result<CommandResult, AppendError> {
        let aggregate_id = req.user_id.to_string();
        let mut tx = self.writer.begin().await.map_err(StoreError::from)?;
        if let Some(command_id) = &req.metadata.command_id {
            sqlx::query(
                "INSERT INTO processed_commands (command_id, aggregate_id, fingerprint) \
                 VALUES ($1, $2, $3)",
            )
            .bind(command_id)
            .bind(&aggregate_id)
            .bind(req.fingerprint)
            .execute(&mut *tx)
            .await
            .map_err(|e| classify(e, AppendError::DuplicateCommand))?;
        }
        let metadata = metadata_value(req.metadata);
        let recorded_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut last = Position::START;
        for (i, event) in req.events.iter().enumerate() {
            let (global,): (i64,) = sqlx::query_as(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata, event_id, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING global_position",
            )
            .bind(pcf_domain::AGGREGATE_TYPE)
            .bind(&aggregate_id)
            .bind((req.expected_sequence + 1 + i as u64) as i64)
            .bind(event.event_type())
            .bind(event.event_version())
            .bind(stored_payload(event)?)
            .bind(&metadata)
            .bind(Uuid::now_v7().to_string())
            .bind(&recorded_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| classify(e, AppendError::Conflict))?;
            last = Position::new(global as u64, global as u64);
        }
        for change in email_changes(req.events) {
            let result = match change {
                EmailChange::Claim(email) => {
                    sqlx::query("INSERT INTO user_emails (email, user_id) VALUES ($1, $2)")
                        .bind(email)
                        .bind(&aggregate_id)
                        .execute(&mut *tx)
                        .await
                }
                EmailChange::Release(email) => {
                    sqlx::query("DELETE FROM user_emails WHERE email = $1 AND user_id = $2")
                        .bind(email)
                        .bind(&aggregate_id)
                        .execute(&mut *tx)
                        .await
                }
                EmailChange::ReleaseAll => {
                    sqlx::query("DELETE FROM user_emails WHERE user_id = $1")
                        .bind(&aggregate_id)
                        .execute(&mut *tx)
                        .await
                }
            };
            result.map_err(|e| classify(e, AppendError::EmailTaken))?;
        }
        let result = CommandResult {
            user_id: req.user_id,
            user: req.user_after.cloned(),
            version: req.expected_sequence + req.events.len() as u64,
            position: last,
        };
        if let Some(command_id) = &req.metadata.command_id {
            let stored =
                serde_json::to_value(&result).map_err(|e| StoreError::Internal(e.to_string()))?;
            sqlx::query("UPDATE processed_commands SET result = $2 WHERE command_id = $1")
                .bind(command_id)
                .bind(stored)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.committed.signal();
        Ok(result)
    }

    async fn find_command(&self, command_id: &str) -> Result<Option<StoredCommand>, StoreError> {
        let sql = format!(
            "SELECT result, fingerprint, recorded_at < {RETENTION_CUTOFF} AS expired \
             FROM processed_commands WHERE command_id = $1"
        );
        let row: Option<(Option<serde_json::Value>, Option<String>, bool)> = sqlx::query_as(&sql)
            .bind(command_id)
            .bind(retention_modifier())
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some((result, fingerprint, expired)) => stored_command(result, fingerprint, expired),
            None => Ok(None),
        }
    }

    async fn forget_expired_command(&self, command_id: &str) -> Result<(), StoreError> {
        let sql = format!(
            "DELETE FROM processed_commands \
             WHERE command_id = $1 AND recorded_at < {RETENTION_CUTOFF}"
        );
        sqlx::query(&sql)
            .bind(command_id)
            .bind(retention_modifier())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn prune_expired_commands(&self) -> Result<u64, StoreError> {
        // In batches, each a short write: appends wait for the single writer meanwhile.
        let sql = format!(
            "DELETE FROM processed_commands WHERE rowid IN ( \
                 SELECT rowid FROM processed_commands \
                 WHERE recorded_at < {RETENTION_CUTOFF} LIMIT $1)"
        );
        let mut pruned = 0;
        loop {
            let done = sqlx::query(&sql)
                .bind(PRUNE_BATCH)
                .bind(retention_modifier())
                .execute(&self.writer)
                .await?
                .rows_affected();
            pruned += done;
            if done < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn position_of(&self, user_id: Uuid, sequence: u64) -> Result<Position, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT global_position FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(pcf_domain::AGGREGATE_TYPE)
        .bind(user_id.to_string())
        .bind(sequence as i64)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row
            .map(|(g,)| Position::new(g as u64, g as u64))
            .unwrap_or(Position::START))
    }
}

#[async_trait]
impl RelayStore for SqliteStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id, global_position FROM relay_checkpoints WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row
            .map(|(c, g)| Position::new(c as u64, g as u64))
            .unwrap_or(Position::START))
    }

    async fn count_after(&self, position: Position) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE global_position > $1")
            .bind(position.global as i64)
            .fetch_one(&self.reader)
            .await?;
        Ok(n as u64)
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO relay_checkpoints (name, transaction_id, global_position, updated_at) \
             VALUES ($1, $2, $3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
             ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id, \
             global_position = excluded.global_position, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(position.commit as i64)
        .bind(position.global as i64)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    fn committed(&self) -> Arc<Notify> {
        self.committed.relay()
    }

    async fn try_lead(&self, _name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        Ok(Some(Box::new(SoleLease)))
    }
}

#[async_trait]
impl CommitFeed for SqliteStore {
    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.watch()
    }

    async fn watch_commits(&self) -> Result<(), StoreError> {
        // Only this process writes the file: `append` signals directly.
        Ok(())
    }
}

#[async_trait]
impl StoreHealth for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

#[async_trait]
impl EventLog for SqliteStore {
    async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        let after = q.after.unwrap_or(Position::START);
        let types = serde_json::to_string(&q.types).unwrap_or_else(|_| "[]".into());
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND global_position > $2 \
               AND ($3 IS NULL OR aggregate_id = $3) \
               AND (json_array_length($4) = 0 OR event_type IN (SELECT value FROM json_each($4))) \
             ORDER BY global_position LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(pcf_domain::AGGREGATE_TYPE)
            .bind(after.global as i64)
            .bind(q.aggregate_id.map(|id| id.to_string()))
            .bind(types)
            .bind(q.limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::from)?;
        Ok(rows_to_envelopes(&rows)?)
    }

    async fn last_position(&self) -> Result<Option<Position>, PortError> {
        let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(global_position) FROM events")
            .fetch_one(&self.reader)
            .await
            .map_err(StoreError::from)?;
        Ok(max.map(|g| Position::new(g as u64, g as u64)))
    }

    async fn event_count(&self) -> Result<Option<u64>, PortError> {
        Ok(Some(self.count_after(Position::START).await?))
    }

    async fn user_events(
        &self,
        user: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, PortError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
             ORDER BY sequence"
        );
        let rows = sqlx::query(&sql)
            .bind(pcf_domain::AGGREGATE_TYPE)
            .bind(user.to_string())
            .bind(after_sequence as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::from)?;
        Ok(rows_to_envelopes(&rows)?)
    }
}

#[async_trait]
impl EmailDirectory for SqliteStore {
    async fn owner_of(&self, email: &Email) -> Result<Option<Uuid>, PortError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT user_id FROM user_emails WHERE email = $1")
                .bind(email.as_str())
                .fetch_optional(&self.reader)
                .await
                .map_err(StoreError::from)?;
        Ok(row.and_then(|(id,)| Uuid::parse_str(&id).ok()))
    }
}
