//! The SQL user view on the PostgreSQL primary: a table per generation behind the view
//! `read_users`; a batch's rows and the projection's checkpoint change in one transaction.

use async_trait::async_trait;
use pcf_domain::ports::{EventLog, PortError};
use pcf_domain::read_model::{sql_table, SQL_VIEW};
use pcf_domain::{EventEnvelope, UserView};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::generations::{GenerationState, Generational, Offsets};
use crate::projector::{ProjectionError, UserProjector, UserViewWriter};

const NAME: &str = "users-sql";

/// The advisory lock between live writes (shared, per transaction) and `begin` / `switch`
/// (exclusive): a live batch reads the generation state and writes every target in one
/// transaction under the shared lock, so a state change waits for the batches in flight,
/// and the batches after it see the new state.
const GENERATIONS_LOCK: i64 = 0x7063_665f_6765_6e73; // "pcf_gens"

fn db(e: sqlx::Error) -> PortError {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            PortError::Unavailable(format!("postgres: {e}"))
        }
        other => PortError::Internal(format!("postgres: {other}")),
    }
}

/// Reads a `read_users` row (shared with nothing else: the query side has its own reader).
fn row_to_view(row: &PgRow) -> Result<UserView, sqlx::Error> {
    Ok(UserView {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        display_name: row.try_get("display_name")?,
        bio: row.try_get("bio")?,
        avatar_url: row.try_get("avatar_url")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get::<i64, _>("version")? as u64,
        deleted: row.try_get("deleted")?,
    })
}

/// Writes one generation inside a transaction (shared with the other generations' writers
/// of the same batch).
struct TxWriter {
    tx: Arc<Mutex<Transaction<'static, Postgres>>>,
    table: String,
}

#[async_trait]
impl UserViewWriter for TxWriter {
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        let mut tx = self.tx.lock().await;
        let sql = format!("SELECT * FROM {} WHERE id = $1", self.table);
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
        row.map(|r| row_to_view(&r)).transpose().map_err(db)
    }

    async fn current_many(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, UserView>, PortError> {
        let mut tx = self.tx.lock().await;
        let sql = format!("SELECT * FROM {} WHERE id = ANY($1)", self.table);
        let rows = sqlx::query(&sql)
            .bind(ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| row_to_view(r).map(|v| (v.id, v)))
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    async fn replace(
        &self,
        previous: Option<&UserView>,
        next: &UserView,
    ) -> Result<bool, PortError> {
        let written = self
            .replace_many(&[(previous.cloned(), next.clone())])
            .await?;
        Ok(written.first().copied().unwrap_or(false))
    }

    /// One statement for the whole batch: rows whose stored version is still the one they
    /// were folded from are updated, new ones inserted where still absent.
    async fn replace_many(
        &self,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Vec<bool>, PortError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let n = changes.len();
        // Rows in id order: concurrent writers of one table (a rebuild and a live projector)
        // then meet their rows in the same order, which makes deadlocks between them rare.
        let mut order: Vec<&(Option<UserView>, UserView)> = changes.iter().collect();
        order.sort_by_key(|(_, next)| next.id);
        let mut ids = Vec::with_capacity(n);
        let mut emails = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut bios = Vec::with_capacity(n);
        let mut avatars = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut updated = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut deleted = Vec::with_capacity(n);
        let mut previous = Vec::with_capacity(n);
        for (prev, next) in order {
            ids.push(next.id);
            emails.push(next.email.as_str());
            names.push(next.display_name.as_str());
            bios.push(next.bio.as_deref());
            avatars.push(next.avatar_url.as_deref());
            created.push(next.created_at);
            updated.push(next.updated_at);
            versions.push(next.version as i64);
            deleted.push(next.deleted);
            previous.push(prev.as_ref().map_or(0, |p| p.version as i64));
        }
        let sql = format!(
            "WITH x AS ( \
                SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
                    $5::text[], $6::timestamptz[], $7::timestamptz[], $8::bigint[], \
                    $9::boolean[], $10::bigint[]) \
                AS x (id, email, display_name, bio, avatar_url, created_at, updated_at, \
                      version, deleted, previous) \
             ), updated AS ( \
                UPDATE {t} AS u SET email = x.email, display_name = x.display_name, \
                    bio = x.bio, avatar_url = x.avatar_url, created_at = x.created_at, \
                    updated_at = x.updated_at, version = x.version, deleted = x.deleted \
                FROM x WHERE x.previous > 0 AND u.id = x.id AND u.version = x.previous \
                RETURNING u.id \
             ), inserted AS ( \
                INSERT INTO {t} (id, email, display_name, bio, avatar_url, created_at, \
                    updated_at, version, deleted) \
                SELECT id, email, display_name, bio, avatar_url, created_at, updated_at, \
                    version, deleted FROM x WHERE x.previous = 0 \
                ON CONFLICT (id) DO NOTHING \
                RETURNING id \
             ) \
             SELECT id FROM updated UNION ALL SELECT id FROM inserted",
            t = self.table
        );
        let mut tx = self.tx.lock().await;
        let written: Vec<(Uuid,)> = sqlx::query_as(&sql)
            .bind(&ids)
            .bind(&emails)
            .bind(&names)
            .bind(&bios)
            .bind(&avatars)
            .bind(&created)
            .bind(&updated)
            .bind(&versions)
            .bind(&deleted)
            .bind(&previous)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
        let written: std::collections::HashSet<Uuid> =
            written.into_iter().map(|(id,)| id).collect();
        Ok(changes
            .iter()
            .map(|(_, next)| written.contains(&next.id))
            .collect())
    }
}

/// Waits for the live batches in flight and holds off new ones until `tx` ends.
async fn lock_generations(tx: &mut Transaction<'static, Postgres>) -> Result<(), PortError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(GENERATIONS_LOCK)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(())
}

/// The SQL user view with its generations.
#[derive(Clone)]
pub struct SqlUserViews {
    pool: PgPool,
}

impl SqlUserViews {
    /// On the primary: readers use the replicas.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// `(partition, next offset)` recorded for the active generation.
    pub async fn checkpoints(&self) -> Result<Vec<(i32, i64)>, PortError> {
        let active = self.state().await?.active;
        sqlx::query_as(
            "SELECT partition, next_offset FROM projection_checkpoints \
             WHERE projection = $1 AND generation = $2 ORDER BY partition",
        )
        .bind(NAME)
        .bind(active as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }
}

#[async_trait]
impl Generational for SqlUserViews {
    fn name(&self) -> &str {
        NAME
    }

    async fn state(&self) -> Result<GenerationState, PortError> {
        read_state(&self.pool).await
    }

    /// Lists are served from this view; point reads and `minVersion` use the Redis view
    /// (this one only while Redis is down). It takes larger batches: fewer and larger
    /// transactions on the primary, which the commands share.
    fn batch_wait(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(20))
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        let table = sql_table(generation);
        let mut tx = self.pool.begin().await.map_err(db)?;
        lock_generations(&mut tx).await?;
        for sql in [
            format!("DROP TABLE IF EXISTS {table}"),
            format!("CREATE TABLE {table} (LIKE {} INCLUDING ALL)", sql_table(1)),
            format!("CREATE INDEX {table}_email ON {table} (email) WHERE NOT deleted"),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await.map_err(db)?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1 AND generation = $2")
            .bind(NAME)
            .bind(generation as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("UPDATE projection_generations SET building = $2 WHERE projection = $1")
            .bind(NAME)
            .bind(generation as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        lock_generations(&mut tx).await?;
        let view = format!(
            "CREATE OR REPLACE VIEW {SQL_VIEW} AS SELECT * FROM {}",
            sql_table(generation)
        );
        sqlx::query(&view).execute(&mut *tx).await.map_err(db)?;
        sqlx::query(
            "UPDATE projection_generations SET active = $2, building = NULL WHERE projection = $1",
        )
        .bind(NAME)
        .bind(generation as i64)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        if generation == 1 {
            // The template of every other generation stays; empty it instead.
            sqlx::query(&format!("TRUNCATE {}", sql_table(1)))
                .execute(&self.pool)
                .await
                .map_err(db)?;
        } else {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", sql_table(generation)))
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1 AND generation = $2")
            .bind(NAME)
            .bind(generation as i64)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn apply(
        &self,
        generation: u64,
        events: &[EventEnvelope],
        offsets: Option<&Offsets>,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let tx = Arc::new(Mutex::new(self.pool.begin().await.map_err(view_error)?));
        self.apply_in(&tx, generation, events, offsets, &log)
            .await?;
        commit(tx).await
    }

    async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError> {
        let tx = Arc::new(Mutex::new(self.pool.begin().await.map_err(view_error)?));
        let writer = Arc::new(TxWriter {
            tx: tx.clone(),
            table: sql_table(generation),
        });
        UserProjector::without_log(writer)
            .apply_states(states)
            .await?;
        commit(tx).await
    }

    async fn apply_live(
        &self,
        events: &[EventEnvelope],
        offsets: &Offsets,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await.map_err(view_error)?;
        // The lock first, then the state, in statements of their own: the state is read
        // with a snapshot taken after any `begin` or `switch` it waited for.
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(GENERATIONS_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(view_error)?;
        let state = read_state(&mut *tx).await.map_err(ProjectionError::View)?;
        let tx = Arc::new(Mutex::new(tx));
        for generation in state.targets() {
            self.apply_in(&tx, generation, events, Some(offsets), &log)
                .await?;
        }
        commit(tx).await
    }
}

fn view_error(e: sqlx::Error) -> ProjectionError {
    ProjectionError::View(db(e))
}

async fn read_state(executor: impl sqlx::PgExecutor<'_>) -> Result<GenerationState, PortError> {
    let (active, building): (i64, Option<i64>) =
        sqlx::query_as("SELECT active, building FROM projection_generations WHERE projection = $1")
            .bind(NAME)
            .fetch_one(executor)
            .await
            .map_err(db)?;
    Ok(GenerationState {
        active: active as u64,
        building: building.map(|b| b as u64),
    })
}

async fn commit(tx: Arc<Mutex<Transaction<'static, Postgres>>>) -> Result<(), ProjectionError> {
    let Ok(tx) = Arc::try_unwrap(tx) else {
        return Err(ProjectionError::View(PortError::Internal(
            "transaction still shared after the batch".into(),
        )));
    };
    tx.into_inner().commit().await.map_err(view_error)
}

impl SqlUserViews {
    /// Applies a batch to one generation inside `tx`, with the batch's checkpoint.
    async fn apply_in(
        &self,
        tx: &Arc<Mutex<Transaction<'static, Postgres>>>,
        generation: u64,
        events: &[EventEnvelope],
        offsets: Option<&Offsets>,
        log: &Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let writer = Arc::new(TxWriter {
            tx: tx.clone(),
            table: sql_table(generation),
        });
        UserProjector::new(writer, log.clone())
            .apply_batch(events)
            .await?;
        let offsets = offsets.unwrap_or_default();
        if offsets.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = offsets.iter().map(|(p, _)| *p).collect();
        let next: Vec<i64> = offsets.iter().map(|(_, o)| *o).collect();
        let mut tx = tx.lock().await;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, generation, partition, next_offset) \
             SELECT $1, $2, p, o FROM UNNEST($3::integer[], $4::bigint[]) AS c (p, o) \
             ON CONFLICT (projection, generation, partition) \
             DO UPDATE SET next_offset = GREATEST(projection_checkpoints.next_offset, \
             EXCLUDED.next_offset), updated_at = now()",
        )
        .bind(NAME)
        .bind(generation as i64)
        .bind(&partitions)
        .bind(&next)
        .execute(&mut **tx)
        .await
        .map_err(view_error)?;
        Ok(())
    }
}
