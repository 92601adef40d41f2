//! The PostgreSQL event store: postgres-es for loading, one statement of our own per append,
//! commits announced to the stores of other processes with NOTIFY.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use futures::TryStreamExt;
use pcf_domain::ports::{Change, LogQuery};
use pcf_domain::{EventEnvelope, Position};
use postgres_es::PostgresEventRepository;
use sqlx::postgres::{PgListener, PgRow, PgValueFormat};
use sqlx::{PgPool, Postgres, Row};
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

use super::sealing::Sealed;
use super::sql::{envelope, Arg, SqlBackend, SqlStore, Statements};
use super::{
    email_changes, metadata_value, AppendError, AppendRequest, CommandResult, EmailChange, Lease,
    StoreError,
};

const NOTIFY_CHANNEL: &str = "pcf_events";

/// The least time between two announcements of commits by one store. The first commit
/// after a quiet spell is announced at once; the commits made within this time of an
/// announcement are announced together at its end. Only other processes wait for it (this
/// store signals its own relay and subscribers directly).
const ANNOUNCE_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// Columns every read of the log selects, in the order `stored_event` takes them;
/// `transaction_id` goes out as text because sqlx has no `xid8` type.
const EVENT_COLUMNS: &str = "event_id, aggregate_id, sequence, event_type, event_version, \
     payload, metadata, transaction_id::text AS txid, global_position, recorded_at";

/// The statements of `SqlStore`, in PostgreSQL's SQL. A position is read as the commit
/// (`transaction_id` as text) and the global position.
const STATEMENTS: Statements = Statements {
    event_columns: EVENT_COLUMNS,
    find_command: "SELECT result, fingerprint, \
            recorded_at < now() - make_interval(secs => $2::bigint) AS expired \
        FROM processed_commands WHERE command_id = $1",
    forget_expired_command: "DELETE FROM processed_commands \
        WHERE command_id = $1 AND recorded_at < now() - make_interval(secs => $2::bigint)",
    // By the index on `recorded_at`; rows another pruner locked are left to it.
    prune_expired_commands: "DELETE FROM processed_commands WHERE command_id IN ( \
            SELECT command_id FROM processed_commands \
            WHERE recorded_at < now() - make_interval(secs => $2::bigint) \
            LIMIT $1 FOR UPDATE SKIP LOCKED)",
    position_of: "SELECT transaction_id::text AS txid, global_position FROM events \
        WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
    load_checkpoint: "SELECT transaction_id::text AS txid, global_position \
        FROM relay_checkpoints WHERE name = $1",
    count_after: "SELECT count(*) FROM events \
        WHERE (transaction_id, global_position) > ($1::text::xid8, $2)",
    backlog_after: "SELECT count(*), \
            COALESCE((EXTRACT(EPOCH FROM clock_timestamp() - min(recorded_at)) * 1000)::bigint, 0) \
        FROM events WHERE (transaction_id, global_position) > ($1::text::xid8, $2)",
    save_checkpoint: "INSERT INTO relay_checkpoints \
            (name, transaction_id, global_position, updated_at) \
        VALUES ($1, $2::text::xid8, $3, now()) \
        ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
            global_position = EXCLUDED.global_position, updated_at = now()",
    last_position: "SELECT transaction_id::text AS txid, global_position FROM events \
        WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
        ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    select_plain: "SELECT aggregate_id, sequence, event_type, payload FROM events \
        WHERE event_version = '1' ORDER BY global_position LIMIT $1",
    rewrite_plain: "UPDATE events SET payload = $1::jsonb, event_version = '2' \
        WHERE aggregate_type = 'User' AND aggregate_id = $2 AND sequence = $3 \
          AND event_version = '1'",
    load_republish: "SELECT transaction_id::text AS txid, global_position, published, state, \
            coalesce(error, '') FROM republish_checkpoints WHERE topic = $1 AND selection = $2",
    save_republish: "INSERT INTO republish_checkpoints \
            (topic, selection, transaction_id, global_position, published, state, error, \
             updated_at) \
        VALUES ($1, $2, $3::text::xid8, $4, $5, $6, NULLIF($7, ''), now()) \
        ON CONFLICT (topic, selection) DO UPDATE SET \
            transaction_id = EXCLUDED.transaction_id, \
            global_position = EXCLUDED.global_position, published = EXCLUDED.published, \
            state = EXCLUDED.state, error = EXCLUDED.error, updated_at = now()",
    has_position: "SELECT count(*) FROM events \
        WHERE transaction_id = $1::text::xid8 AND global_position = $2",
    count_range: "SELECT count(*) FROM events \
        WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
          AND (transaction_id, global_position) <= ($3::text::xid8, $4) \
          AND ($5 = '[]' OR event_type IN (SELECT jsonb_array_elements_text($5::jsonb)))",
};

/// The event store on a PostgreSQL primary.
pub type PostgresStore = SqlStore<PgBackend>;

/// What the PostgreSQL store keeps of its own: the pool of its appends, and the tasks that
/// listen for and announce commits.
pub struct PgBackend {
    /// Where appends run: the store's pool, or connections of their own (see
    /// `with_append_pool`).
    appends: PgPool,
    /// The task listening for commit notifications, ended with the store.
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Woken after each append; the task announcing commits to other stores (started at
    /// the first append, ended with the store).
    appended: Arc<Notify>,
    announcer: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    /// The payload of this store's announcements, so that its listener can tell them from
    /// other stores' (it signals its own commits directly).
    token: String,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        let listener = self.listener.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = listener.take() {
            task.abort();
        }
        if let Some(task) = self.announcer.get() {
            task.abort();
        }
    }
}

impl PostgresStore {
    pub fn new(pool: PgPool) -> Self {
        let backend = PgBackend {
            appends: pool.clone(),
            listener: std::sync::Mutex::new(None),
            appended: Arc::new(Notify::new()),
            announcer: std::sync::OnceLock::new(),
            token: Uuid::new_v4().simple().to_string(),
        };
        let repository = PostgresEventRepository::new(pool.clone());
        SqlStore::assemble(pool.clone(), pool, &STATEMENTS, repository, backend)
    }

    /// Signals this store's waiters, and has the commit announced to other stores.
    fn committed_here(&self) {
        self.committed.signal();
        let backend = &self.backend;
        backend.appended.notify_one();
        backend.announcer.get_or_init(|| {
            tokio::spawn(announce_commits(
                self.writer.clone(),
                backend.appended.clone(),
                backend.token.clone(),
            ))
        });
    }

    pub fn pool(&self) -> &PgPool {
        &self.reader
    }

    /// Runs appends on `pool`, for connections set up for them: the append is one
    /// statement of five data-modifying parts, which PostgreSQL (choosing between a plan
    /// for the arguments at hand and a generic one) plans afresh at every execution unless
    /// its connections are told to keep a generic plan. The other statements stay on the
    /// store's pool, where a generic plan would be wrong for some (a count after a
    /// position scans the whole table).
    pub fn with_append_pool(mut self, pool: PgPool) -> Self {
        self.backend.appends = pool;
        self
    }
}

/// The position a row gives in its columns `at` (`transaction_id` as text) and `at + 1`
/// (`global_position`).
fn position_at(row: &PgRow, at: usize) -> Result<Position, StoreError> {
    let txid: String = row.try_get(at)?;
    let global: i64 = row.try_get(at + 1)?;
    let commit = txid
        .parse::<u64>()
        .map_err(|e| StoreError::Internal(format!("transaction id {txid:?}: {e}")))?;
    Ok(Position::new(commit, global as u64))
}

fn row_to_change(row: &PgRow) -> Result<Change, StoreError> {
    let aggregate_id: String = row.try_get(1)?;
    let aggregate_id = Uuid::parse_str(&aggregate_id)
        .map_err(|e| StoreError::Internal(format!("aggregate id {aggregate_id:?}: {e}")))?;
    let sequence: i64 = row.try_get(2)?;
    let payload = row.try_get_raw(3)?;
    let bytes = payload
        .as_bytes()
        .map_err(|e| StoreError::Internal(format!("payload: {e}")))?;
    // jsonb in the binary format is a version byte (1) and the text.
    let json = match payload.format() {
        PgValueFormat::Binary => bytes.get(1..).unwrap_or_default(),
        PgValueFormat::Text => bytes,
    };
    let (event, sealed, erased) = Change::decode_stored(json);
    Ok(Change {
        event_id: row.try_get(0)?,
        aggregate_id,
        sequence: sequence as u64,
        position: position_at(row, 4)?,
        event,
        sealed,
        erased,
    })
}

/// A read of the log after `q.after`, in commit order, of `columns`. Only below the
/// oldest running transaction: anything that could still commit with a lower position is
/// not visible yet, so the prefix returned never changes. Filters are written in only
/// when asked for: optional ones (`$n IS NULL OR …`) lead a prepared statement's generic
/// plan away from the ordered index scan on `events_commit_order`, into reading every
/// later row and sorting them. The log holds one aggregate type, and is read whole (as
/// `count_after` counts it): a condition on `aggregate_type`, true of every row, matches
/// the leading column of the primary key, and while the table's statistics still
/// describe it small (a new deployment, before autovacuum's first analyze) the planner
/// read that whole index into a bitmap for every relay read.
fn log_sql(columns: &str, q: &LogQuery) -> String {
    let mut sql = format!(
        "SELECT {columns} FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
    );
    let mut next = 4;
    if q.aggregate_id.is_some() {
        sql.push_str(&format!(" AND aggregate_id = ${next}"));
        next += 1;
    }
    if !q.types.is_empty() {
        sql.push_str(&format!(" AND event_type = ANY(${next})"));
    }
    sql.push_str(" ORDER BY transaction_id, global_position LIMIT $3");
    sql
}

/// `log_sql` with its arguments bound.
fn log_query<'q>(
    sql: &'q str,
    q: &'q LogQuery,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let after = q.after.unwrap_or(Position::START);
    let mut query = sqlx::query(sql)
        .bind(after.commit.to_string())
        .bind(after.global as i64)
        .bind(q.limit as i64);
    if let Some(id) = q.aggregate_id {
        query = query.bind(id.to_string());
    }
    if !q.types.is_empty() {
        query = query.bind(&q.types);
    }
    query
}

/// Decodes each row of a log read as it arrives, into a vector sized for the page once:
/// collecting the rows first, then growing the result, copied a page of several megabytes
/// over and over.
async fn decode_log<T>(
    sql: &str,
    q: &LogQuery,
    pool: &PgPool,
    decode: impl Fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = log_query(sql, q).fetch(pool);
    let mut decoded = Vec::with_capacity(q.limit.min(LOG_PAGE_CAPACITY));
    while let Some(row) = rows.try_next().await? {
        decoded.push(decode(&row)?);
    }
    Ok(decoded)
}

/// The most rows a log read makes room for before it has seen them.
const LOG_PAGE_CAPACITY: usize = 10_000;

/// An append in one statement, so one round trip and no explicit transaction: the events,
/// the email index, the command id (with its fingerprint) and the user's data key (made
/// with the first event, destroyed with the deletion) change together or not at all. Each unique violation names its constraint (see `classify`). The stored command
/// result gets the position of the last event appended, formatted as `Position` prints it.
const APPEND: &str = "\
WITH appended AS ( \
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                        payload, metadata, event_id) \
    SELECT $1, $2, $3 + e.ord, e.event_type, e.event_version, e.payload, $7, e.event_id \
    FROM UNNEST($4::text[], $5::text[], $6::jsonb[], $8::uuid[]) \
         WITH ORDINALITY AS e (event_type, event_version, payload, event_id, ord) \
    RETURNING global_position, transaction_id \
), released AS ( \
    DELETE FROM user_emails WHERE user_id = $2 AND ($9 OR email = ANY($10::text[])) \
), claimed AS ( \
    INSERT INTO user_emails (email, user_id) SELECT c, $2 FROM UNNEST($11::text[]) AS c \
), last AS ( \
    SELECT transaction_id, max(global_position) AS global_position \
    FROM appended GROUP BY transaction_id \
), command AS ( \
    INSERT INTO processed_commands (command_id, aggregate_id, result, fingerprint) \
    SELECT $12, $2, jsonb_set($13::jsonb, '{position}', to_jsonb( \
        lpad(to_hex(transaction_id::text::bigint), 16, '0') || \
        lpad(to_hex(global_position), 16, '0'))), $14 \
    FROM last WHERE $12::text IS NOT NULL \
), key_made AS ( \
    INSERT INTO user_keys (user_id, kek_id, wrapped) \
    SELECT $2, $15, $16 WHERE $16::bytea IS NOT NULL \
), key_destroyed AS ( \
    DELETE FROM user_keys WHERE user_id = $2 AND $17 \
) \
SELECT transaction_id::text AS txid, global_position FROM last";

/// What a failed append means: each unique constraint it may violate stands for one answer.
/// A deadlock (two appends claiming each other's emails, say) is a lost race like a
/// sequence clash: decided again.
fn classify(e: sqlx::Error) -> AppendError {
    let constraint = match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01") => {
            return AppendError::Conflict
        }
        sqlx::Error::Database(db) if db.is_unique_violation() => db.constraint(),
        _ => None,
    };
    match constraint {
        Some("events_pkey") => AppendError::Conflict,
        Some("user_emails_pkey") => AppendError::EmailTaken,
        Some("processed_commands_pkey") => AppendError::DuplicateCommand,
        // Two first writes of an older user (without a key yet) raced to give it one.
        Some("user_keys_pkey") => AppendError::Conflict,
        _ => AppendError::Store(e.into()),
    }
}

#[async_trait]
impl SqlBackend for PgBackend {
    type Db = Postgres;
    type Repo = PostgresEventRepository;

    fn position(row: &PgRow, at: usize) -> Result<Position, StoreError> {
        position_at(row, at)
    }

    fn commit_arg(commit: u64) -> Arg<'static> {
        // Cast to `xid8` by the statements: sqlx has no type for it.
        Arg::Text(commit.to_string().into())
    }

    fn event_id(row: &PgRow, at: usize) -> Result<Uuid, StoreError> {
        Ok(row.try_get(at)?)
    }

    fn recorded_at(row: &PgRow, at: usize) -> Result<DateTime<Utc>, StoreError> {
        Ok(row.try_get(at)?)
    }

    async fn append(
        store: &PostgresStore,
        req: AppendRequest<'_>,
        sealed: &Sealed,
    ) -> Result<CommandResult, AppendError> {
        let n = req.events.len();
        let types: Vec<String> = req.events.iter().map(|e| e.event_type()).collect();
        let versions = vec![sealed.version; n];
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let mut claims: Vec<&str> = Vec::new();
        let mut releases: Vec<&str> = Vec::new();
        let mut release_all = false;
        for change in email_changes(req.events) {
            match change {
                EmailChange::Claim(email) => claims.push(email),
                EmailChange::Release(email) => releases.push(email),
                EmailChange::ReleaseAll => release_all = true,
            }
        }
        let mut result = req.result(Position::START);
        // The stored result gets its position inside the statement, once it is known.
        let stored = req
            .metadata
            .command_id
            .as_ref()
            .map(|_| sealed.stored_result(&result))
            .transpose()?;
        let row = sqlx::query(APPEND)
            .bind(pcf_domain::AGGREGATE_TYPE)
            .bind(req.user_id.to_string())
            .bind(req.expected_sequence as i64)
            .bind(&types)
            .bind(&versions)
            .bind(&sealed.payloads)
            .bind(metadata_value(req.metadata))
            .bind(&ids)
            .bind(release_all)
            .bind(&releases)
            .bind(&claims)
            .bind(&req.metadata.command_id)
            .bind(stored)
            .bind(req.fingerprint)
            .bind(sealed.new_key.as_ref().map(|k| k.kek_id.as_str()))
            .bind(sealed.new_key.as_ref().map(|k| k.bytes.as_slice()))
            .bind(sealed.key_destroyed_at.is_some())
            .fetch_one(&store.backend.appends)
            .await
            .map_err(classify)?;
        result.position = position_at(&row, 0)?;
        store.committed_here();
        Ok(result)
    }

    async fn read(store: &PostgresStore, q: &LogQuery) -> Result<Vec<EventEnvelope>, StoreError> {
        let sql = log_sql(EVENT_COLUMNS, q);
        decode_log(&sql, q, &store.reader, envelope::<Self>).await
    }

    async fn read_changes(store: &PostgresStore, q: &LogQuery) -> Result<Vec<Change>, StoreError> {
        // The payload is decoded straight from the bytes PostgreSQL sends (the stored,
        // externally tagged form of `UserEvent`), without a JSON value in between; metadata,
        // type, version and time are not read at all.
        let sql = log_sql(
            "event_id, aggregate_id, sequence, payload, transaction_id::text AS txid, \
             global_position",
            q,
        );
        decode_log(&sql, q, &store.reader, row_to_change).await
    }

    async fn try_lead(
        store: &PostgresStore,
        name: &str,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        // A session-level advisory lock on a connection of its own: held until released or
        // until the connection (or the process) dies, when another relay takes over.
        let mut conn = store.reader.acquire().await?.detach();
        let (locked,): (bool,) =
            sqlx::query_as("SELECT pg_try_advisory_lock(hashtext($1)::bigint)")
                .bind(format!("pcf-relay:{name}"))
                .fetch_one(&mut conn)
                .await?;
        Ok(locked.then(|| Box::new(AdvisoryLease { conn }) as Box<dyn Lease>))
    }

    async fn watch_commits(store: &PostgresStore) -> Result<(), StoreError> {
        let mut listener = PgListener::connect_with(&store.reader).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let committed = store.committed.clone();
        let token = store.backend.token.clone();
        let task = tokio::spawn(async move {
            loop {
                // `recv` reconnects by itself after a lost connection; anything committed
                // meanwhile is found by the waiters' polling.
                match listener.recv().await {
                    // This store's own commits were signalled when they were made.
                    Ok(n) if n.payload() == token => {}
                    Ok(_) => committed.signal(),
                    Err(e) => {
                        tracing::warn!(error = %e, "event notification listener failed");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        // One listener per store: a second call replaces the first.
        let previous = store
            .backend
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task);
        if let Some(previous) = previous {
            previous.abort();
        }
        Ok(())
    }
}

/// Announces this store's commits on `NOTIFY_CHANNEL` after they are made (so a listener
/// that hears it finds them committed), one NOTIFY for all the appends made while the
/// previous one was on its way, at most one per `ANNOUNCE_GAP`. A failed announcement is
/// not retried: listeners poll as well.
async fn announce_commits(pool: PgPool, appended: Arc<Notify>, token: String) {
    loop {
        appended.notified().await;
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(&token)
            .execute(&pool)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "announcing commits failed");
        }
        tokio::time::sleep(ANNOUNCE_GAP).await;
    }
}

/// An advisory lock held by a dedicated connection.
struct AdvisoryLease {
    conn: sqlx::PgConnection,
}

#[async_trait]
impl Lease for AdvisoryLease {
    async fn alive(&mut self) -> bool {
        sqlx::query("SELECT 1")
            .execute(&mut self.conn)
            .await
            .is_ok()
    }
}
