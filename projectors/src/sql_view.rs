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

/// Writes one generation inside one transaction.
struct TxWriter {
    tx: Mutex<Transaction<'static, Postgres>>,
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
        let mut tx = self.tx.lock().await;
        // The version guard makes the write idempotent and safe beside other writers.
        let sql = format!(
            "INSERT INTO {t} AS u (id, email, display_name, bio, avatar_url, created_at, \
             updated_at, version, deleted) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, \
             display_name = EXCLUDED.display_name, bio = EXCLUDED.bio, \
             avatar_url = EXCLUDED.avatar_url, created_at = EXCLUDED.created_at, \
             updated_at = EXCLUDED.updated_at, version = EXCLUDED.version, \
             deleted = EXCLUDED.deleted \
             WHERE u.version = $10",
            t = self.table
        );
        let written = sqlx::query(&sql)
            .bind(next.id)
            .bind(&next.email)
            .bind(&next.display_name)
            .bind(&next.bio)
            .bind(&next.avatar_url)
            .bind(next.created_at)
            .bind(next.updated_at)
            .bind(next.version as i64)
            .bind(next.deleted)
            .bind(previous.map_or(0, |p| p.version as i64))
            .execute(&mut **tx)
            .await
            .map_err(db)?
            .rows_affected();
        Ok(written == 1)
    }
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
        let (active, building): (i64, Option<i64>) = sqlx::query_as(
            "SELECT active, building FROM projection_generations WHERE projection = $1",
        )
        .bind(NAME)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(GenerationState {
            active: active as u64,
            building: building.map(|b| b as u64),
        })
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        let table = sql_table(generation);
        let mut tx = self.pool.begin().await.map_err(db)?;
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
        let tx = self
            .pool
            .begin()
            .await
            .map_err(|e| ProjectionError::View(db(e)))?;
        let writer = Arc::new(TxWriter {
            tx: Mutex::new(tx),
            table: sql_table(generation),
        });
        UserProjector::new(writer.clone(), log)
            .apply_batch(events)
            .await?;
        let Ok(writer) = Arc::try_unwrap(writer) else {
            return Err(ProjectionError::View(PortError::Internal(
                "transaction still shared after the batch".into(),
            )));
        };
        let mut tx = writer.tx.into_inner();
        for (partition, next_offset) in offsets.unwrap_or_default() {
            sqlx::query(
                "INSERT INTO projection_checkpoints (projection, generation, partition, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (projection, generation, partition) \
                 DO UPDATE SET next_offset = GREATEST(projection_checkpoints.next_offset, \
                 EXCLUDED.next_offset), updated_at = now()",
            )
            .bind(NAME)
            .bind(generation as i64)
            .bind(partition)
            .bind(next_offset)
            .execute(&mut *tx)
            .await
            .map_err(|e| ProjectionError::View(db(e)))?;
        }
        tx.commit().await.map_err(|e| ProjectionError::View(db(e)))
    }
}
