//! The read-model schema shared by the projectors (writers) and the query side (readers):
//! Redis key layout and SQL table names, per generation.
//!
//! Redis: users are spread over [`REDIS_BUCKETS`] buckets, and every key of bucket `n` starts
//! with the hash tag `{prefix:bn}`, so that a bucket's keys share one slot of a Redis
//! Cluster. Each bucket holds its own copy of the generation state: `{prefix:bn}:active`
//! names the generation readers use, `{prefix:bn}:building` the one a rebuild is writing.
//! Generation `g` holds `{prefix:bn}:g{g}:user:{id}` (the JSON `UserView`, `n` the bucket of
//! the id) and `{prefix:bm}:g{g}:email:{email}` (the id of the live account with that email,
//! `m` the bucket of the email).
//!
//! SQL: generation `g` is the table `read_users_g{g}`; readers use the view `read_users`,
//! which names the active generation's table.

use uuid::Uuid;

/// The default Redis key prefix of the user view.
pub const REDIS_PREFIX: &str = "pcf:users";

/// How many buckets the Redis view's keys are spread over (each one slot of a cluster).
/// It divides 256: a user's bucket is the last byte of the id (see [`user_bucket`]).
pub const REDIS_BUCKETS: u32 = 64;

/// The SQL view readers query.
pub const SQL_VIEW: &str = "read_users";

/// The bucket of a user: the id's last byte (random in v4 and v7 ids) modulo the buckets,
/// which a Lua script computes as `tonumber(string.sub(id, -2), 16) % 64`.
pub fn user_bucket(id: Uuid) -> u32 {
    u32::from(id.as_bytes()[15]) % REDIS_BUCKETS
}

/// The bucket of an email entry: FNV-1a of the email, modulo the buckets.
pub fn email_bucket(email: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in email.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % REDIS_BUCKETS
}

/// The hash tag every key of a bucket starts with.
pub fn redis_bucket_tag(prefix: &str, bucket: u32) -> String {
    format!("{{{prefix}:b{bucket}}}")
}

pub fn redis_active_key(prefix: &str, bucket: u32) -> String {
    format!("{}:active", redis_bucket_tag(prefix, bucket))
}

pub fn redis_building_key(prefix: &str, bucket: u32) -> String {
    format!("{}:building", redis_bucket_tag(prefix, bucket))
}

/// A `SCAN MATCH` pattern of every key of one generation (all buckets).
pub fn redis_generation_pattern(prefix: &str, generation: u64) -> String {
    format!("{{{prefix}:b*}}:g{generation}:*")
}

/// A `SCAN MATCH` pattern of every key under `prefix` (all buckets, the generation states
/// too).
pub fn redis_prefix_pattern(prefix: &str) -> String {
    format!("{{{prefix}:b*}}:*")
}

pub fn redis_user_key(prefix: &str, generation: u64, id: Uuid) -> String {
    format!(
        "{}:g{generation}:user:{id}",
        redis_bucket_tag(prefix, user_bucket(id))
    )
}

pub fn redis_email_key(prefix: &str, generation: u64, email: &str) -> String {
    format!(
        "{}:g{generation}:email:{email}",
        redis_bucket_tag(prefix, email_bucket(email))
    )
}

/// What a key of the Redis view is, parsed back (`None`: not a generation's key).
#[derive(Debug, PartialEq, Eq)]
pub enum RedisViewKey<'a> {
    User { generation: u64, id: &'a str },
    Email { generation: u64, email: &'a str },
}

/// Parses a key of generation documents or email entries under `prefix`.
pub fn parse_redis_key<'a>(prefix: &str, key: &'a str) -> Option<RedisViewKey<'a>> {
    let rest = key
        .strip_prefix('{')?
        .strip_prefix(prefix)?
        .strip_prefix(":b")?;
    let (bucket, rest) = rest.split_once("}:g")?;
    bucket.parse::<u32>().ok()?;
    let (generation, rest) = rest.split_once(':')?;
    let generation = generation.parse().ok()?;
    if let Some(id) = rest.strip_prefix("user:") {
        return Some(RedisViewKey::User { generation, id });
    }
    rest.strip_prefix("email:")
        .map(|email| RedisViewKey::Email { generation, email })
}

/// The table of one SQL generation.
pub fn sql_table(generation: u64) -> String {
    format!("read_users_g{generation}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_user_share_the_bucket_tag_and_parse_back() {
        let id = Uuid::parse_str("0190f4c2-7d1e-7a3b-8c4d-5e6f708192a7").unwrap();
        assert_eq!(user_bucket(id), 0xa7 % 64);
        let key = redis_user_key("pcf:users", 3, id);
        assert_eq!(key, format!("{{pcf:users:b39}}:g3:user:{id}"));
        assert_eq!(
            parse_redis_key("pcf:users", &key),
            Some(RedisViewKey::User {
                generation: 3,
                id: &id.to_string()
            })
        );
        let email = redis_email_key("pcf:users", 12, "a@example.com");
        assert!(email.starts_with(&redis_bucket_tag(
            "pcf:users",
            email_bucket("a@example.com")
        )));
        assert_eq!(
            parse_redis_key("pcf:users", &email),
            Some(RedisViewKey::Email {
                generation: 12,
                email: "a@example.com"
            })
        );
        assert_eq!(
            parse_redis_key("pcf:users", &redis_active_key("pcf:users", 1)),
            None
        );
    }

    #[test]
    fn emails_spread_over_the_buckets() {
        let buckets: std::collections::HashSet<u32> = (0..1000)
            .map(|i| email_bucket(&format!("user{i}@example.com")))
            .collect();
        assert_eq!(buckets.len(), REDIS_BUCKETS as usize);
    }
}
