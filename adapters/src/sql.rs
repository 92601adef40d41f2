//! What a PostgreSQL or SQLite error means, once for every store: the database is
//! unavailable (a connection, TLS, or pool problem: try again), or something is wrong with
//! the statement or the data. And the `read_users` row codec, which the SQL view's writer and
//! its readers on the replicas share.

use pcf_domain::ports::PortError;
use pcf_domain::UserView;
use sqlx::postgres::PgRow;
use sqlx::Row;

/// Whether the error says the database cannot be reached now, rather than that the request
/// is wrong. Besides connection trouble, what a server says while it cannot take the
/// statement: a standby refusing a write (25006, read_only_sql_transaction: the primary moved
/// and the connection still reaches the old one), a server shutting down or starting
/// (57P01-57P03), and a connection exception (class 08).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(code.as_ref(), "25006" | "57P01" | "57P02" | "57P03") || code.starts_with("08")
        }),
        _ => false,
    }
}

/// The error as a port's, naming `what` failed (`"postgres"`, `"read replica"`).
pub fn port_error(what: &str, e: sqlx::Error) -> PortError {
    if is_unavailable(&e) {
        PortError::Unavailable(format!("{what}: {e}"))
    } else {
        PortError::Internal(format!("{what}: {e}"))
    }
}

/// The columns of a `read_users` row, in the order the codec reads them.
pub const READ_USER_COLUMNS: &str =
    "id, email, display_name, bio, avatar_url, created_at, updated_at, version, deleted";

/// One `read_users` row as the view it stores.
pub fn read_user(row: &PgRow) -> Result<UserView, sqlx::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_trouble_is_unavailable_and_the_rest_internal() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            matches!(port_error("postgres", io), PortError::Unavailable(m) if m.starts_with("postgres: "))
        );
        assert!(matches!(
            port_error("postgres", sqlx::Error::PoolTimedOut),
            PortError::Unavailable(_)
        ));
        assert!(matches!(
            port_error("read replica", sqlx::Error::RowNotFound),
            PortError::Internal(m) if m.starts_with("read replica: ")
        ));
    }
}
