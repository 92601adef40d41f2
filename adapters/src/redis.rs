//! What a Redis error means, once for the view's writer and its readers: every failure of a
//! call is the view being unavailable (the callers fall back, or retry), named as Redis's.

use pcf_domain::ports::PortError;

/// The error as a port's.
pub fn port_error(e: redis::RedisError) -> PortError {
    PortError::Unavailable(format!("redis: {e}"))
}

/// Succeeds when the Redis server behind `conn` answers a PING.
pub async fn ping(conn: &redis::aio::ConnectionManager) -> Result<(), PortError> {
    let _: String = redis::cmd("PING")
        .query_async(&mut conn.clone())
        .await
        .map_err(port_error)?;
    Ok(())
}
