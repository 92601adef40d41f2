//! The SQL user view on the PostgreSQL primary: a table per generation behind the view
//! `read_users`; a batch's rows and the projection's checkpoint change in one transaction.

use async_trait::async_trait;
use pcf_domain::ports::PortError;
use pcf_domain::read_model::{sql_table, SQL_VIEW};
use pcf_domain::UserView;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::HashMap;
use uuid::Uuid;

use crate::store::{
    BatchGenerations, GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written,
};

const NAME: &str = "users-sql";

/// The advisory lock between live writes (shared, per transaction) and `begin` / `switch`
/// (exclusive): a live batch reads the generation state and writes every target in one
/// transaction under the shared lock, so a state change waits for the batches in flight,
/// and the batches after it see the new state.
const GENERATIONS_LOCK: i64 = 0x7063_665f_6765_6e73; // "pcf_gens"

fn db(e: sqlx::Error) -> PortError {
    pcf_adapters::sql::port_error("postgres", e)
}

/// Forgets the checkpoints of a generation ($1 the projection, $2 the generation).
const FORGET_CHECKPOINTS: &str =
    "DELETE FROM projection_checkpoints WHERE projection = $1 AND generation = $2";

/// Runs `sql`, a statement about one generation of this projection: $1 is bound to the
/// projection's name, $2 to the generation.
async fn execute_for_generation(
    executor: impl sqlx::PgExecutor<'_>,
    sql: &str,
    generation: u64,
) -> Result<(), PortError> {
    sqlx::query(sql)
        .bind(NAME)
        .bind(generation as i64)
        .execute(executor)
        .await
        .map_err(db)?;
    Ok(())
}

/// A batch of writes in one transaction on the primary: its rows and its checkpoints
/// commit together.
struct SqlBatch {
    tx: Transaction<'static, Postgres>,
    generations: BatchGenerations,
}

#[async_trait]
impl ViewBatch for SqlBatch {
    fn generations(&self) -> &[u64] {
        self.generations.targets()
    }

    #[tracing::instrument(level = "debug", name = "sql.load", skip_all, fields(generation = generation, users = ids.len()))]
    async fn load(
        &mut self,
        generation: u64,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, UserView>, PortError> {
        let sql = format!("SELECT * FROM {} WHERE id = ANY($1)", sql_table(generation));
        let rows = sqlx::query(&sql)
            .bind(ids)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| pcf_adapters::sql::read_user(r).map(|v| (v.id, v)))
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    /// One statement: each state is inserted, or replaces a row at an older version (the
    /// columns are bound as for `replace`; the versions folded from go unread).
    #[tracing::instrument(level = "debug", name = "sql.write", skip_all, fields(generation = generation, users = states.len()))]
    async fn write_newer(
        &mut self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let columns = Columns::of(states.iter().map(|state| (state, 0)));
        let sql = format!(
            "INSERT INTO {t} AS u (id, email, display_name, bio, avatar_url, created_at, \
                updated_at, version, deleted) \
             SELECT id, email, display_name, bio, avatar_url, created_at, updated_at, \
                version, deleted \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::boolean[], \
                $10::bigint[]) \
             AS x (id, email, display_name, bio, avatar_url, created_at, updated_at, \
                version, deleted, previous) \
             ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, \
                display_name = EXCLUDED.display_name, bio = EXCLUDED.bio, \
                avatar_url = EXCLUDED.avatar_url, created_at = EXCLUDED.created_at, \
                updated_at = EXCLUDED.updated_at, version = EXCLUDED.version, \
                deleted = EXCLUDED.deleted \
             WHERE u.version < EXCLUDED.version",
            t = sql_table(generation)
        );
        columns
            .bind(sqlx::query(&sql))
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(vec![true; states.len()])
    }

    /// One statement for the whole batch: rows whose stored version is still the one they
    /// were folded from are updated, new ones inserted where still absent. A live batch
    /// holds the generations lock, so its state cannot move.
    #[tracing::instrument(level = "debug", name = "sql.write", skip_all, fields(generation = generation, users = changes.len()))]
    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError> {
        if changes.is_empty() {
            return Ok(Written::Users(Vec::new()));
        }
        let columns = Columns::of(
            changes
                .iter()
                .map(|(prev, next)| (next, prev.as_ref().map_or(0, |p| p.version as i64))),
        );
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
            t = sql_table(generation)
        );
        let written: std::collections::HashSet<Uuid> = columns
            .bind(sqlx::query(&sql))
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db)?
            .iter()
            .map(|row| row.try_get::<Uuid, _>(0))
            .collect::<Result<_, _>>()
            .map_err(db)?;
        Ok(Written::Users(
            changes
                .iter()
                .map(|(_, next)| written.contains(&next.id))
                .collect(),
        ))
    }

    /// Records `offsets` for every generation of the batch, then commits.
    #[tracing::instrument(level = "debug", name = "sql.commit", skip_all)]
    async fn commit(mut self: Box<Self>, offsets: &Offsets) -> Result<(), PortError> {
        if !offsets.is_empty() {
            let partitions: Vec<i32> = offsets.iter().map(|(p, _)| *p).collect();
            let next: Vec<i64> = offsets.iter().map(|(_, o)| *o).collect();
            for generation in self.generations.targets() {
                sqlx::query(
                    "INSERT INTO projection_checkpoints \
                        (projection, generation, partition, next_offset) \
                     SELECT $1, $2, p, o FROM UNNEST($3::integer[], $4::bigint[]) AS c (p, o) \
                     ON CONFLICT (projection, generation, partition) \
                     DO UPDATE SET next_offset = GREATEST(projection_checkpoints.next_offset, \
                     EXCLUDED.next_offset), updated_at = now()",
                )
                .bind(NAME)
                .bind(*generation as i64)
                .bind(&partitions)
                .bind(&next)
                .execute(&mut *self.tx)
                .await
                .map_err(db)?;
            }
        }
        self.tx.commit().await.map_err(db)
    }
}

/// Users as the columns of `read_users`, in id order (concurrent writers of one table, a
/// rebuild and a live projector, then meet their rows in the same order, which makes
/// deadlocks between them rare), each with the version it was folded from.
struct Columns<'a> {
    ids: Vec<Uuid>,
    emails: Vec<&'a str>,
    names: Vec<&'a str>,
    bios: Vec<Option<&'a str>>,
    avatars: Vec<Option<&'a str>>,
    created: Vec<chrono::DateTime<chrono::Utc>>,
    updated: Vec<chrono::DateTime<chrono::Utc>>,
    versions: Vec<i64>,
    deleted: Vec<bool>,
    previous: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn of(users: impl Iterator<Item = (&'a UserView, i64)>) -> Self {
        let mut order: Vec<(&UserView, i64)> = users.collect();
        order.sort_by_key(|(user, _)| user.id);
        let n = order.len();
        let mut c = Columns {
            ids: Vec::with_capacity(n),
            emails: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            bios: Vec::with_capacity(n),
            avatars: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            deleted: Vec::with_capacity(n),
            previous: Vec::with_capacity(n),
        };
        for (user, previous) in order {
            c.ids.push(user.id);
            c.emails.push(user.email.as_str());
            c.names.push(user.display_name.as_str());
            c.bios.push(user.bio.as_deref());
            c.avatars.push(user.avatar_url.as_deref());
            c.created.push(user.created_at);
            c.updated.push(user.updated_at);
            c.versions.push(user.version as i64);
            c.deleted.push(user.deleted);
            c.previous.push(previous);
        }
        c
    }

    /// Binds the columns as $1..$10.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.emails)
            .bind(&self.names)
            .bind(&self.bios)
            .bind(&self.avatars)
            .bind(&self.created)
            .bind(&self.updated)
            .bind(&self.versions)
            .bind(&self.deleted)
            .bind(&self.previous)
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

/// Ends `tx`, a change of the generation state, with the change itself: `update` sets the
/// state ($1 the projection, $2 the generation), and `tx` commits.
async fn commit_state_change(
    mut tx: Transaction<'static, Postgres>,
    update: &str,
    generation: u64,
) -> Result<(), PortError> {
    execute_for_generation(&mut *tx, update, generation).await?;
    tx.commit().await.map_err(db)
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
impl ViewStore for SqlUserViews {
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
        // Only the primary key while it fills: the other indexes are built once, at the
        // switch (`secondary_indexes`), which costs less than keeping them up row by row.
        for sql in [
            format!("DROP TABLE IF EXISTS {table}"),
            format!(
                "CREATE TABLE {table} (LIKE {} INCLUDING ALL EXCLUDING INDEXES)",
                sql_table(1)
            ),
            format!("ALTER TABLE {table} ADD PRIMARY KEY (id)"),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await.map_err(db)?;
        }
        execute_for_generation(&mut *tx, FORGET_CHECKPOINTS, generation).await?;
        commit_state_change(
            tx,
            "UPDATE projection_generations SET building = $2 WHERE projection = $1",
            generation,
        )
        .await
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        build_secondary_indexes(&self.pool, &sql_table(generation)).await?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        lock_generations(&mut tx).await?;
        let view = format!(
            "CREATE OR REPLACE VIEW {SQL_VIEW} AS SELECT * FROM {}",
            sql_table(generation)
        );
        sqlx::query(&view).execute(&mut *tx).await.map_err(db)?;
        commit_state_change(
            tx,
            "UPDATE projection_generations SET active = $2, building = NULL WHERE projection = $1",
            generation,
        )
        .await
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        let table = sql_table(generation);
        let sql = if generation == 1 {
            // The template of every other generation stays; empty it instead.
            format!("TRUNCATE {table}")
        } else {
            format!("DROP TABLE IF EXISTS {table}")
        };
        sqlx::query(&sql).execute(&self.pool).await.map_err(db)?;
        execute_for_generation(&self.pool, FORGET_CHECKPOINTS, generation).await
    }

    /// A live batch takes the generations lock (shared) and then reads the state, in
    /// statements of their own: the state is read with a snapshot taken after any `begin`
    /// or `switch` it waited for, and none can happen until the batch ends.
    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let live_state = async {
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                .bind(GENERATIONS_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            read_state(&mut *tx).await
        };
        let generations = BatchGenerations::of(scope, live_state).await?;
        Ok(Box::new(SqlBatch { tx, generations }))
    }
}

/// The indexes of a generation besides its primary key: those of the first generation, the
/// template every later one is made like (so an index a migration adds there reaches every
/// rebuilt generation too), renamed for `table`. Each as its name and the statement that
/// builds it without blocking writes.
async fn secondary_indexes(pool: &PgPool, table: &str) -> Result<Vec<(String, String)>, PortError> {
    let template = sql_table(1);
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::regclass AND NOT i.indisprimary ORDER BY 1",
    )
    .bind(&template)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    indexes
        .into_iter()
        .map(|(name, definition)| {
            // "CREATE [UNIQUE] INDEX <name> ON <schema>.<template> USING ..."
            let (head, on) = definition.split_once(" ON ").ok_or_else(|| {
                PortError::Internal(format!("an index definition without ON: {definition}"))
            })?;
            let unique = if head.starts_with("CREATE UNIQUE") {
                "UNIQUE "
            } else {
                ""
            };
            let renamed = match name.strip_prefix(&template) {
                Some(rest) => format!("{table}{rest}"),
                None => format!("{table}_{name}"),
            };
            let on = on.replacen(&format!("{template} "), &format!("{table} "), 1);
            let build = format!("CREATE {unique}INDEX CONCURRENTLY {renamed} ON {on}");
            Ok((renamed, build))
        })
        .collect()
}

/// Builds the secondary indexes of a generation that has filled, without blocking the live
/// writes to it (`CONCURRENTLY`). An index that an interrupted build left invalid is
/// dropped and built again.
async fn build_secondary_indexes(pool: &PgPool, table: &str) -> Result<(), PortError> {
    for (name, build) in secondary_indexes(pool, table).await? {
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace",
        )
        .bind(&name)
        .fetch_optional(pool)
        .await
        .map_err(db)?;
        if valid == Some(true) {
            continue;
        }
        if valid == Some(false) {
            sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .execute(pool)
                .await
                .map_err(db)?;
        }
        // Statements of their own: `CONCURRENTLY` cannot run inside a transaction.
        sqlx::raw_sql(&build).execute(pool).await.map_err(db)?;
    }
    Ok(())
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
