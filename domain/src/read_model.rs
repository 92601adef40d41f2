//! The read-model schema shared by the projectors (writers) and the query side (readers):
//! Redis key layout and SQL table names, per generation.
//!
//! Redis: `{prefix}:active` names the generation readers use; `{prefix}:building` the one a
//! rebuild is writing. Generation `g` holds `{prefix}:g{g}:user:{id}` (the JSON `UserView`)
//! and `{prefix}:g{g}:email:{email}` (the id of the live account with that email).
//!
//! SQL: generation `g` is the table `read_users_g{g}`; readers use the view `read_users`,
//! which names the active generation's table.

use uuid::Uuid;

/// The default Redis key prefix of the user view.
pub const REDIS_PREFIX: &str = "pcf:users";

/// The SQL view readers query.
pub const SQL_VIEW: &str = "read_users";

pub fn redis_active_key(prefix: &str) -> String {
    format!("{prefix}:active")
}

pub fn redis_building_key(prefix: &str) -> String {
    format!("{prefix}:building")
}

/// The common prefix of every key of one generation.
pub fn redis_generation_prefix(prefix: &str, generation: u64) -> String {
    format!("{prefix}:g{generation}:")
}

pub fn redis_user_key(prefix: &str, generation: u64, id: Uuid) -> String {
    format!("{prefix}:g{generation}:user:{id}")
}

pub fn redis_email_key(prefix: &str, generation: u64, email: &str) -> String {
    format!("{prefix}:g{generation}:email:{email}")
}

/// The table of one SQL generation.
pub fn sql_table(generation: u64) -> String {
    format!("read_users_g{generation}")
}
