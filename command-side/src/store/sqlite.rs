//! The embedded event store on SQLite: sqlite-es for loading, one transaction of our own per
//! append. SQLite has one writer at a time, so appends go through a single connection (no
//! lock upgrades, no `SQLITE_BUSY`) and `global_position` order is commit order: an event's
//! position is its global position twice.

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::DomainEvent;
use pcf_domain::ports::LogQuery;
use pcf_domain::{EventEnvelope, Position};
use sqlite_es::SqliteEventRepository;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool};
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

use super::sealing::Sealed;
use super::sql::{envelope, Arg, SqlBackend, SqlStore, Statements};
use super::{
    email_changes, is_unique_violation, metadata_value, AppendError, AppendRequest, CommandResult,
    EmailChange, Lease, SoleLease, StoreError,
};

/// The columns of an event row, in the order `stored_event` takes them.
const EVENT_COLUMNS: &str = "event_id, aggregate_id, sequence, event_type, event_version, \
     payload, metadata, global_position, global_position, recorded_at";

/// The statements of `SqlStore`, in SQLite's SQL. `recorded_at` is text in a format that
/// compares in time order, so a record has expired when it is below the time `$2` seconds
/// ago in that format. SQLite binds arguments by the number of the parameter, so an
/// argument that no parameter names is left unread.
const STATEMENTS: Statements = Statements {
    event_columns: EVENT_COLUMNS,
    find_command: "SELECT result, fingerprint, \
            recorded_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds') \
            AS expired \
        FROM processed_commands WHERE command_id = $1",
    forget_expired_command: "DELETE FROM processed_commands WHERE command_id = $1 \
        AND recorded_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds')",
    // In batches, each a short write: appends wait for the single writer meanwhile.
    prune_expired_commands: "DELETE FROM processed_commands WHERE rowid IN ( \
            SELECT rowid FROM processed_commands \
            WHERE recorded_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds') \
            LIMIT $1)",
    position_of: "SELECT global_position, global_position FROM events \
        WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
    load_checkpoint: "SELECT transaction_id, global_position \
        FROM relay_checkpoints WHERE name = $1",
    // The commit (`$1`) is the global position here, and left unread.
    count_after: "SELECT count(*) FROM events WHERE global_position > $2",
    backlog_after: "SELECT count(*), COALESCE(CAST( \
            (julianday('now') - julianday(min(recorded_at))) * 86400000 AS INTEGER), 0) \
        FROM events WHERE global_position > $2",
    save_checkpoint: "INSERT INTO relay_checkpoints \
            (name, transaction_id, global_position, updated_at) \
        VALUES ($1, $2, $3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
        ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id, \
            global_position = excluded.global_position, updated_at = excluded.updated_at",
    last_position: "SELECT global_position, global_position FROM events \
        ORDER BY global_position DESC LIMIT 1",
    select_plain: "SELECT aggregate_id, sequence, event_type, payload FROM events \
        WHERE event_version = '1' ORDER BY global_position LIMIT $1",
    rewrite_plain: "UPDATE events SET payload = $1, event_version = '2' \
        WHERE aggregate_type = 'User' AND aggregate_id = $2 AND sequence = $3 \
          AND event_version = '1'",
    load_republish: "SELECT transaction_id, global_position, published, state, \
            coalesce(error, '') FROM republish_checkpoints WHERE topic = $1 AND selection = $2",
    save_republish: "INSERT INTO republish_checkpoints \
            (topic, selection, transaction_id, global_position, published, state, error, \
             updated_at) \
        VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7, ''), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
        ON CONFLICT (topic, selection) DO UPDATE SET \
            transaction_id = excluded.transaction_id, \
            global_position = excluded.global_position, published = excluded.published, \
            state = excluded.state, error = excluded.error, updated_at = excluded.updated_at",
    // A position here is the global position twice.
    has_position: "SELECT count(*) FROM events WHERE global_position = $2 AND $1 = $2",
    // The commits (`$1`, `$3`) are the global positions here, and left unread.
    count_range: "SELECT count(*) FROM events \
        WHERE global_position > $2 AND global_position <= $4 \
          AND ($5 = '[]' OR event_type IN (SELECT value FROM json_each($5)))",
};

/// The event store in one SQLite file.
pub type SqliteStore = SqlStore<SqliteBackend>;

/// SQLite's part of the store, which keeps nothing of its own: the file has a single writer
/// process, which signals its commits itself and needs no leadership.
pub struct SqliteBackend;

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
            .foreign_keys(true)
            // What is deleted (a destroyed data key, a released email, a rewritten event's
            // plain text) is overwritten in the file, not left in its free pages.
            .pragma("secure_delete", "ON");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(false))
            .await?;
        let repository = SqliteEventRepository::new(reader.clone());
        Ok(SqlStore::assemble(
            reader,
            writer,
            &STATEMENTS,
            repository,
            SqliteBackend,
        ))
    }

    /// The pool that may write (migrations use it).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

fn classify(e: sqlx::Error, on_unique: AppendError) -> AppendError {
    if is_unique_violation(&e) {
        on_unique
    } else {
        AppendError::Store(e.into())
    }
}

/// The statement that makes an email change, and the email it binds as `$1` (the user is
/// `$2`). Releasing them all names no email, and leaves `$1` unread (SQLite binds arguments
/// by the number of the parameter).
fn email_statement(change: EmailChange<'_>) -> (&'static str, Option<&str>) {
    match change {
        EmailChange::Claim(email) => (
            "INSERT INTO user_emails (email, user_id) VALUES ($1, $2)",
            Some(email),
        ),
        EmailChange::Release(email) => (
            "DELETE FROM user_emails WHERE email = $1 AND user_id = $2",
            Some(email),
        ),
        EmailChange::ReleaseAll => ("DELETE FROM user_emails WHERE user_id = $2", None),
    }
}

#[async_trait]
impl SqlBackend for SqliteBackend {
    type Db = Sqlite;
    type Repo = SqliteEventRepository;

    fn position(row: &SqliteRow, at: usize) -> Result<Position, StoreError> {
        let commit: i64 = row.try_get(at)?;
        let global: i64 = row.try_get(at + 1)?;
        Ok(Position::new(commit as u64, global as u64))
    }

    fn commit_arg(commit: u64) -> Arg<'static> {
        Arg::Int(commit as i64)
    }

    fn event_id(row: &SqliteRow, at: usize) -> Result<Uuid, StoreError> {
        let event_id: String = row.try_get(at)?;
        Uuid::parse_str(&event_id)
            .map_err(|e| StoreError::Internal(format!("event id {event_id:?}: {e}")))
    }

    fn recorded_at(row: &SqliteRow, at: usize) -> Result<DateTime<Utc>, StoreError> {
        let recorded_at: String = row.try_get(at)?;
        DateTime::parse_from_rfc3339(&recorded_at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| StoreError::Internal(format!("recorded_at {recorded_at:?}: {e}")))
    }

    async fn append(
        store: &SqliteStore,
        req: AppendRequest<'_>,
        sealed: &Sealed,
    ) -> Result<CommandResult, AppendError> {
        let aggregate_id = req.user_id.to_string();
        let mut tx = store.writer.begin().await.map_err(StoreError::from)?;
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
            .bind(sealed.version)
            .bind(&sealed.payloads[i])
            .bind(&metadata)
            .bind(Uuid::now_v7().to_string())
            .bind(&recorded_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| classify(e, AppendError::Conflict))?;
            last = Position::new(global as u64, global as u64);
        }
        for change in email_changes(req.events) {
            let (sql, email) = email_statement(change);
            sqlx::query(sql)
                .bind(email)
                .bind(&aggregate_id)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(e, AppendError::EmailTaken))?;
        }
        if let Some(key) = &sealed.new_key {
            pcf_adapters::keys::insert_sqlite(&mut tx, req.user_id, key)
                .await
                .map_err(|e| classify(e, AppendError::Conflict))?;
        }
        if sealed.key_destroyed_at.is_some() {
            pcf_adapters::keys::delete_sqlite(&mut tx, req.user_id)
                .await
                .map_err(StoreError::from)?;
        }
        let result = req.result(last);
        if let Some(command_id) = &req.metadata.command_id {
            let stored = sealed.stored_result(&result)?;
            sqlx::query("UPDATE processed_commands SET result = $2 WHERE command_id = $1")
                .bind(command_id)
                .bind(stored)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        store.committed.signal();
        Ok(result)
    }

    async fn read(store: &SqliteStore, q: &LogQuery) -> Result<Vec<EventEnvelope>, StoreError> {
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
            .fetch_all(&store.reader)
            .await?;
        rows.iter().map(envelope::<Self>).collect()
    }

    async fn try_lead(
        _store: &SqliteStore,
        _name: &str,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        Ok(Some(Box::new(SoleLease)))
    }

    async fn watch_commits(_store: &SqliteStore) -> Result<(), StoreError> {
        // Only this process writes the file: `append` signals directly.
        Ok(())
    }
}
