//! Every SQL schema change of PCF, embedded in the binary with `sqlx::migrate!`: one set for
//! PostgreSQL (cluster mode) and one for SQLite (embedded mode).
#![forbid(unsafe_code)]

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{PgPool, SqlitePool};

/// The PostgreSQL schema: the event store (postgres-es's tables, extended), uniqueness,
/// idempotency and relay bookkeeping.
pub static POSTGRES: Migrator = sqlx::migrate!("./postgres");

/// The SQLite schema of embedded mode, the same tables in SQLite's dialect.
pub static SQLITE: Migrator = sqlx::migrate!("./sqlite");

/// Applies the pending PostgreSQL migrations. Concurrent callers are serialised by sqlx with
/// an advisory lock, so every API instance may call this at start.
pub async fn run_postgres(pool: &PgPool) -> Result<(), MigrateError> {
    POSTGRES.run(pool).await
}

/// Applies the pending SQLite migrations.
pub async fn run_sqlite(pool: &SqlitePool) -> Result<(), MigrateError> {
    SQLITE.run(pool).await
}
