//! The event store on an SQL database, written once for both adapters: `SqlStore` plays
//! every role over a `SqlBackend`, which names what differs between PostgreSQL and SQLite
//! (the driver, the text of the statements, how a position, an event id and a time are
//! stored) and does what each does its own way (appends, log reads, leadership, commit
//! notifications).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::PersistedEventRepository;
use cqrs_es::Aggregate as _;
use pcf_adapters::keys::Keys;
use pcf_domain::ports::{Change, EmailDirectory, EventLog, LogQuery, PortError};
use pcf_domain::{Email, EventEnvelope, Position, User};
use sqlx::query::Query;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};
use std::borrow::Cow;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

use super::sealing::{self, Sealed};
use super::{
    retention_seconds, stored_command, AppendError, AppendRequest, Backlog, CommandResult,
    CommandStore, CommitFeed, CommitSignal, Lease, RelayStore, StoreError, StoreHealth,
    StoredCommand, StoredEvent, PRUNE_BATCH,
};

/// A row of the backend's database.
pub type SqlRow<B> = <<B as SqlBackend>::Db as Database>::Row;

/// What one SQL database brings to `SqlStore`. Implemented by the PostgreSQL and the SQLite
/// adapter, each with whatever state its own parts need.
#[async_trait]
pub trait SqlBackend: Sized + Send + Sync + 'static {
    /// The sqlx database.
    type Db: SqlDb;
    /// The postgres-es / sqlite-es repository that aggregates are loaded through.
    type Repo: PersistedEventRepository;

    /// The position in a row's columns `at` (the commit) and `at + 1` (the global position).
    fn position(row: &SqlRow<Self>, at: usize) -> Result<Position, StoreError>;

    /// A position's commit, as `count_after` and `save_checkpoint` bind it.
    fn commit_arg(commit: u64) -> Arg<'static>;

    /// The event id in a row's column `at`.
    fn event_id(row: &SqlRow<Self>, at: usize) -> Result<Uuid, StoreError>;

    /// The time in a row's column `at`.
    fn recorded_at(row: &SqlRow<Self>, at: usize) -> Result<DateTime<Utc>, StoreError>;

    /// `CommandStore::append`: the events, the email claims and releases and the command id,
    /// in one transaction; signals the commit.
    async fn append(
        store: &SqlStore<Self>,
        request: AppendRequest<'_>,
        sealed: &Sealed,
    ) -> Result<CommandResult, AppendError>;

    /// `EventLog::read`.
    async fn read(store: &SqlStore<Self>, q: &LogQuery) -> Result<Vec<EventEnvelope>, StoreError>;

    /// `EventLog::read_changes`: by default what `read` returns, folded.
    async fn read_changes(store: &SqlStore<Self>, q: &LogQuery) -> Result<Vec<Change>, StoreError> {
        Ok(Self::read(store, q).await?.iter().map(Change::of).collect())
    }

    /// `RelayStore::try_lead`.
    async fn try_lead(
        store: &SqlStore<Self>,
        name: &str,
    ) -> Result<Option<Box<dyn Lease>>, StoreError>;

    /// `CommitFeed::watch_commits`.
    async fn watch_commits(store: &SqlStore<Self>) -> Result<(), StoreError>;
}

/// The text of the statements that `SqlStore` runs for every backend alike, each backend's
/// in its database's SQL. Each binds the same arguments on both databases, as said below.
/// Positions are read as two columns, the commit and then the global position (see
/// `SqlBackend::position`).
pub struct Statements {
    /// The columns of an event row, in the order `stored_event` reads them: event id,
    /// aggregate id, sequence, type, version, payload, metadata, position (two columns) and
    /// the time recorded.
    pub(super) event_columns: &'static str,
    /// `result, fingerprint, expired` of command `$1`: expired when recorded more than `$2`
    /// seconds ago.
    pub(super) find_command: &'static str,
    /// Removes the record of command `$1` if it was recorded more than `$2` seconds ago.
    pub(super) forget_expired_command: &'static str,
    /// Removes at most `$1` command records recorded more than `$2` seconds ago.
    pub(super) prune_expired_commands: &'static str,
    /// The position of the event of aggregate type `$1`, aggregate id `$2`, sequence `$3`.
    pub(super) position_of: &'static str,
    /// The position saved as relay checkpoint `$1`.
    pub(super) load_checkpoint: &'static str,
    /// How many events lie after the position (`$1` the commit, `$2` the global position).
    pub(super) count_after: &'static str,
    /// The same count, and the milliseconds since the oldest of those events was recorded
    /// (0 when there is none).
    pub(super) backlog_after: &'static str,
    /// Saves relay checkpoint `$1` at the position (`$2` the commit, `$3` the global
    /// position).
    pub(super) save_checkpoint: &'static str,
    /// The position of the last event of the safe prefix (what a log read can return); no
    /// row when there is none.
    pub(super) last_position: &'static str,
    /// `aggregate_id, sequence, event_type, payload` of at most `$1` version-1 events (plain
    /// personal data), oldest first.
    pub(super) select_plain: &'static str,
    /// Rewrites the payload of the event of aggregate id `$2`, sequence `$3` to `$1` (JSON
    /// text) at version "2", if it is still version "1".
    pub(super) rewrite_plain: &'static str,
    /// The republish checkpoint of topic `$1`, selection `$2`: its position (two columns),
    /// `published`, `state` and `error` (empty when none).
    pub(super) load_republish: &'static str,
    /// Saves the republish checkpoint of topic `$1`, selection `$2`: the position (`$3` the
    /// commit, `$4` the global position), `published` `$5`, `state` `$6`, `error` `$7`
    /// (empty for none).
    pub(super) save_republish: &'static str,
    /// How many events are at the position (`$1` the commit, `$2` the global position).
    pub(super) has_position: &'static str,
    /// How many events lie after the position `$1, $2` and at or before `$3, $4` (commits
    /// and global positions), of the types in the JSON array `$5` (all when it is `[]`).
    pub(super) count_range: &'static str,
}

/// A value bound to a statement of `SqlStore`.
pub enum Arg<'a> {
    Text(Cow<'a, str>),
    Int(i64),
}

impl<'a> Arg<'a> {
    pub(super) fn text(value: impl Into<Cow<'a, str>>) -> Self {
        Self::Text(value.into())
    }
}

/// The driver calls `SqlStore` makes: statements run with `Arg`s bound, and the few column
/// types it reads itself. Every sqlx database that binds and decodes those types is one; the
/// bounds this takes are stated once, on the impl below, so the code over a `SqlBackend`
/// needs none.
#[async_trait]
pub trait SqlDb: Database {
    /// `sql` with `args` bound in order.
    fn query<'q>(sql: &'q str, args: &'q [Arg<'q>]) -> Query<'q, Self, Self::Arguments<'q>>;

    async fn fetch_all(
        pool: &Pool<Self>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<Self::Row>, sqlx::Error>;

    /// Runs `sql`; how many rows it changed.
    async fn execute(pool: &Pool<Self>, sql: &str, args: &[Arg<'_>]) -> Result<u64, sqlx::Error>;

    fn text(row: &Self::Row, at: usize) -> Result<String, sqlx::Error>;

    fn int(row: &Self::Row, at: usize) -> Result<i64, sqlx::Error>;

    fn json(row: &Self::Row, at: usize) -> Result<serde_json::Value, sqlx::Error>;

    /// The `result, fingerprint, expired` of a command record (`Statements::find_command`).
    #[allow(clippy::type_complexity)]
    fn command_record(
        row: &Self::Row,
    ) -> Result<(Option<serde_json::Value>, Option<String>, bool), sqlx::Error>;
}

#[async_trait]
impl<DB> SqlDb for DB
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> bool: Decode<'r, DB> + Type<DB>,
    for<'r> serde_json::Value: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    fn query<'q>(sql: &'q str, args: &'q [Arg<'q>]) -> Query<'q, DB, DB::Arguments<'q>> {
        args.iter().fold(sqlx::query(sql), |query, arg| match arg {
            Arg::Text(text) => query.bind(text.as_ref()),
            Arg::Int(n) => query.bind(*n),
        })
    }

    async fn fetch_all(
        pool: &Pool<DB>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        Self::query(sql, args).fetch_all(pool).await
    }

    async fn execute(pool: &Pool<DB>, sql: &str, args: &[Arg<'_>]) -> Result<u64, sqlx::Error> {
        let done = Self::query(sql, args).execute(pool).await?;
        Ok(done.rows_affected())
    }

    fn text(row: &DB::Row, at: usize) -> Result<String, sqlx::Error> {
        row.try_get(at)
    }

    fn int(row: &DB::Row, at: usize) -> Result<i64, sqlx::Error> {
        row.try_get(at)
    }

    fn json(row: &DB::Row, at: usize) -> Result<serde_json::Value, sqlx::Error> {
        row.try_get(at)
    }

    fn command_record(
        row: &DB::Row,
    ) -> Result<(Option<serde_json::Value>, Option<String>, bool), sqlx::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }
}

/// How many rows a statement changed, which sqlx tells by each database's own result type.
pub trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::postgres::PgQueryResult::rows_affected(self)
    }
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::sqlite::SqliteQueryResult::rows_affected(self)
    }
}

/// An event row, read by column position in the order of `Statements::event_columns`: a
/// log read decodes a million rows, and a lookup by name costs a hash per column.
pub(super) fn stored_event<B: SqlBackend>(row: &SqlRow<B>) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        event_id: B::event_id(row, 0)?,
        aggregate_id: B::Db::text(row, 1)?,
        sequence: B::Db::int(row, 2)?,
        event_type: B::Db::text(row, 3)?,
        event_version: B::Db::text(row, 4)?,
        payload: B::Db::json(row, 5)?,
        metadata: B::Db::json(row, 6)?,
        position: B::position(row, 7)?,
        recorded_at: B::recorded_at(row, 9)?,
    })
}

/// An event row as the envelope it stores.
pub(super) fn envelope<B: SqlBackend>(row: &SqlRow<B>) -> Result<EventEnvelope, StoreError> {
    stored_event::<B>(row).and_then(StoredEvent::into_envelope)
}

/// The event store on an SQL database (`PostgresStore`, `SqliteStore`).
pub struct SqlStore<B: SqlBackend> {
    /// Where reads go.
    pub(super) reader: Pool<B::Db>,
    /// Where the writes other than appends go: the same pool as `reader` on PostgreSQL,
    /// the single writer connection on SQLite.
    pub(super) writer: Pool<B::Db>,
    /// The statements, in the backend's SQL.
    pub(super) sql: &'static Statements,
    /// What aggregates are loaded through (postgres-es / sqlite-es).
    repository: B::Repo,
    /// Seal and open the personal data of events; none until `with_keys`.
    keys: Option<Arc<Keys>>,
    pub(super) committed: CommitSignal,
    /// What the backend keeps of its own.
    pub(super) backend: B,
}

impl<B: SqlBackend> SqlStore<B> {
    /// The store on these pools, running `sql` and loading aggregates through `repository`.
    pub(super) fn assemble(
        reader: Pool<B::Db>,
        writer: Pool<B::Db>,
        sql: &'static Statements,
        repository: B::Repo,
        backend: B,
    ) -> Self {
        Self {
            reader,
            writer,
            sql,
            repository,
            keys: None,
            committed: CommitSignal::new(),
            backend,
        }
    }

    /// The store sealing and opening personal data with `keys` (wrapped by the same KEKs
    /// every reader of the log uses).
    pub fn with_keys(mut self, keys: Arc<Keys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The keys, which every append and every load of sealed events needs.
    pub(super) fn keys(&self) -> Result<&Keys, StoreError> {
        self.keys.as_deref().ok_or_else(|| {
            StoreError::Internal("the event store has no keys for personal data".into())
        })
    }

    /// The row that `sql`, a read of one row at most, returns, if any.
    async fn fetch_row(
        &self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<SqlRow<B>>, sqlx::Error> {
        let rows = B::Db::fetch_all(&self.reader, sql, args).await?;
        Ok(rows.into_iter().next())
    }

    /// The position that `sql` (one of the position statements) reads, if it finds a row.
    async fn read_position(
        &self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<Position>, StoreError> {
        let row = self.fetch_row(sql, args).await?;
        row.map(|row| B::position(&row, 0)).transpose()
    }
}

/// What a failed read of a user's events (through postgres-es / sqlite-es) means: the
/// database unavailable (a lost connection, a server shutting down: the command may be
/// retried), or something wrong.
fn loading_failed(e: cqrs_es::persist::PersistenceError) -> StoreError {
    use cqrs_es::persist::PersistenceError;
    match e {
        PersistenceError::ConnectionError(e) => StoreError::Unavailable(e.to_string()),
        PersistenceError::UnknownError(e) => match e.downcast::<sqlx::Error>() {
            Ok(e) => StoreError::from(*e),
            Err(e) => StoreError::Internal(e.to_string()),
        },
        e => StoreError::Internal(e.to_string()),
    }
}

#[async_trait]
impl<B: SqlBackend> CommandStore for SqlStore<B> {
    /// Reads the user's events through postgres-es / sqlite-es, opens their personal data
    /// (erased if the account is deleted) and applies them.
    async fn load(&self, user_id: Uuid) -> Result<(User, u64), StoreError> {
        let events = self
            .repository
            .get_events::<User>(&user_id.to_string())
            .await
            .map_err(loading_failed)?;
        let key = if events
            .iter()
            .any(|e| sealing::stored_is_sealed(&e.payload, &e.event_type))
        {
            let key = self.keys()?.key_for_writing(user_id).await?;
            let deleted = events.iter().any(|e| e.event_type == "AccountDeleted");
            if key.is_none() && !deleted {
                let why = format!("no data key for the live user {user_id}");
                self.keys()?
                    .integrity_error(format_args!("the events of user {user_id}"), &why);
                return Err(StoreError::Internal(why));
            }
            key
        } else {
            None
        };
        let mut user = User::default();
        let mut sequence = 0;
        for e in events {
            sequence = e.sequence as u64;
            let event = sealing::open_stored(
                self.keys()?,
                user_id,
                sequence,
                &e.event_type,
                e.payload,
                key.as_ref(),
            )?;
            user.apply(event);
        }
        Ok((user, sequence))
    }

    async fn append(&self, request: AppendRequest<'_>) -> Result<CommandResult, AppendError> {
        let keys = self.keys()?;
        let sealed = Sealed::prepare(
            keys,
            request.user_id,
            request.expected_sequence + 1,
            request.events,
            request.user_after,
            request.metadata.command_id.as_deref(),
        )
        .await?;
        let user = request.user_id;
        let mut result = B::append(self, request, &sealed).await?;
        if sealed.key_destroyed_at.is_some() {
            keys.forget(user);
            result.key_destroyed_at = sealed.key_destroyed_at;
        }
        Ok(result)
    }

    async fn find_command(&self, command_id: &str) -> Result<Option<StoredCommand>, StoreError> {
        let args = [Arg::text(command_id), Arg::Int(retention_seconds())];
        match self.fetch_row(self.sql.find_command, &args).await? {
            Some(row) => {
                let (result, fingerprint, expired) = B::Db::command_record(&row)?;
                let result = match result {
                    Some(stored) => {
                        Some(sealing::open_result(self.keys()?, command_id, stored).await?)
                    }
                    None => None,
                };
                stored_command(result, fingerprint, expired)
            }
            None => Ok(None),
        }
    }

    async fn forget_expired_command(&self, command_id: &str) -> Result<(), StoreError> {
        let args = [Arg::text(command_id), Arg::Int(retention_seconds())];
        B::Db::execute(&self.writer, self.sql.forget_expired_command, &args).await?;
        Ok(())
    }

    async fn prune_expired_commands(&self) -> Result<u64, StoreError> {
        let args = [Arg::Int(PRUNE_BATCH), Arg::Int(retention_seconds())];
        let mut pruned = 0;
        loop {
            let done = B::Db::execute(&self.writer, self.sql.prune_expired_commands, &args).await?;
            pruned += done;
            if done < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn position_of(&self, user_id: Uuid, sequence: u64) -> Result<Position, StoreError> {
        let args = [
            Arg::text(pcf_domain::AGGREGATE_TYPE),
            Arg::text(user_id.to_string()),
            Arg::Int(sequence as i64),
        ];
        let position = self.read_position(self.sql.position_of, &args).await?;
        Ok(position.unwrap_or(Position::START))
    }
}

#[async_trait]
impl<B: SqlBackend> RelayStore for SqlStore<B> {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        let position = self
            .read_position(self.sql.load_checkpoint, &[Arg::text(name)])
            .await?;
        Ok(position.unwrap_or(Position::START))
    }

    async fn count_after(&self, position: Position) -> Result<u64, StoreError> {
        let args = [
            B::commit_arg(position.commit),
            Arg::Int(position.global as i64),
        ];
        let row = self
            .fetch_row(self.sql.count_after, &args)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        Ok(B::Db::int(&row, 0)? as u64)
    }

    async fn backlog_after(&self, position: Position) -> Result<Backlog, StoreError> {
        let args = [
            B::commit_arg(position.commit),
            Arg::Int(position.global as i64),
        ];
        let row = self
            .fetch_row(self.sql.backlog_after, &args)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        Ok(Backlog {
            events: B::Db::int(&row, 0)? as u64,
            oldest_age_seconds: B::Db::int(&row, 1)?.max(0) as f64 / 1000.0,
        })
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        let args = [
            Arg::text(name),
            B::commit_arg(position.commit),
            Arg::Int(position.global as i64),
        ];
        B::Db::execute(&self.writer, self.sql.save_checkpoint, &args).await?;
        Ok(())
    }

    fn committed(&self) -> Arc<Notify> {
        self.committed.relay()
    }

    async fn try_lead(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        B::try_lead(self, name).await
    }
}

#[async_trait]
impl<B: SqlBackend> CommitFeed for SqlStore<B> {
    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.watch()
    }

    async fn watch_commits(&self) -> Result<(), StoreError> {
        B::watch_commits(self).await
    }
}

#[async_trait]
impl<B: SqlBackend> StoreHealth for SqlStore<B> {
    async fn ping(&self) -> Result<(), StoreError> {
        B::Db::execute(&self.reader, "SELECT 1", &[]).await?;
        Ok(())
    }
}

#[async_trait]
impl<B: SqlBackend> EventLog for SqlStore<B> {
    async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        Ok(B::read(self, q).await?)
    }

    async fn read_changes(&self, q: &LogQuery) -> Result<Vec<Change>, PortError> {
        Ok(B::read_changes(self, q).await?)
    }

    async fn user_events(
        &self,
        user: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, PortError> {
        let sql = format!(
            "SELECT {} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
             ORDER BY sequence",
            self.sql.event_columns
        );
        let args = [
            Arg::text(pcf_domain::AGGREGATE_TYPE),
            Arg::text(user.to_string()),
            Arg::Int(after_sequence as i64),
        ];
        let rows = B::Db::fetch_all(&self.reader, &sql, &args)
            .await
            .map_err(StoreError::from)?;
        Ok(rows
            .iter()
            .map(envelope::<B>)
            .collect::<Result<Vec<_>, _>>()?)
    }

    async fn last_position(&self) -> Result<Option<Position>, PortError> {
        Ok(self.read_position(self.sql.last_position, &[]).await?)
    }

    async fn event_count(&self) -> Result<Option<u64>, PortError> {
        Ok(Some(self.count_after(Position::START).await?))
    }
}

#[async_trait]
impl<B: SqlBackend> EmailDirectory for SqlStore<B> {
    async fn owner_of(&self, email: &Email) -> Result<Option<Uuid>, PortError> {
        let sql = "SELECT user_id FROM user_emails WHERE email = $1";
        let row = self
            .fetch_row(sql, &[Arg::text(email.as_str())])
            .await
            .map_err(StoreError::from)?;
        let owner = row
            .map(|row| B::Db::text(&row, 0))
            .transpose()
            .map_err(StoreError::from)?;
        Ok(owner.and_then(|id| Uuid::parse_str(&id).ok()))
    }
}

#[cfg(test)]
mod loading_tests {
    use super::*;
    use cqrs_es::persist::PersistenceError;

    fn reset() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    #[test]
    fn a_connection_lost_while_loading_is_unavailable_and_the_rest_internal() {
        let lost = [
            PersistenceError::ConnectionError(Box::new(reset())),
            PersistenceError::UnknownError(Box::new(reset())),
            PersistenceError::UnknownError(Box::new(sqlx::Error::PoolTimedOut)),
        ];
        for e in lost {
            assert!(matches!(loading_failed(e), StoreError::Unavailable(_)));
        }
        let wrong = [
            PersistenceError::UnknownError(Box::new(sqlx::Error::RowNotFound)),
            PersistenceError::DeserializationError(Box::new(std::fmt::Error)),
            PersistenceError::OptimisticLockError,
        ];
        for e in wrong {
            assert!(matches!(loading_failed(e), StoreError::Internal(_)));
        }
    }
}
