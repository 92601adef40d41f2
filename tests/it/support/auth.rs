//! Credentials of the tests: HS256 tokens signed with the one secret every test app verifies
//! with, hand-made tokens, and API keys as the keys file holds them.

use pcf_domain::auth::AccessRole;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// The HS256 secret every test app verifies tokens with (long enough for production mode).
pub const JWT_SECRET: &str = "pcf-integration-tests-secret-0123456789abcdef";

fn roles_of(names: &[&str]) -> Vec<AccessRole> {
    names
        .iter()
        .map(|r| AccessRole::parse(r).unwrap_or_else(|| panic!("unknown role {r}")))
        .collect()
}

/// A token signed with [`JWT_SECRET`], valid for an hour.
pub fn token(sub: &str, roles: &[&str]) -> String {
    token_with_tier(sub, roles, None)
}

/// A token signed with [`JWT_SECRET`] with a rate-limit tier, valid for an hour.
pub fn token_with_tier(sub: &str, roles: &[&str], tier: Option<&str>) -> String {
    pcf::http::auth::mint(
        JWT_SECRET,
        sub,
        &roles_of(roles),
        tier,
        Duration::from_secs(3600),
    )
    .expect("minting a token")
}

/// A token signed with [`JWT_SECRET`] carrying exactly `claims`.
pub fn token_with_claims(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("signing a token")
}

/// A token with the `admin` role, which may run every command and query.
pub fn admin() -> String {
    token("test-admin", &["admin"])
}

pub fn auditor() -> String {
    token("test-auditor", &["auditor"])
}

pub fn analytics() -> String {
    token("test-analytics", &["analytics"])
}

/// The token of the end user `id` (no roles).
pub fn owner(id: Uuid) -> String {
    token(&id.to_string(), &[])
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Base64url without padding (RFC 7515), for hand-made tokens and Kafka cluster ids.
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Hex SHA-256, as the API keys file holds it.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}
