//! Authentication: bearer JWTs (HS256 with `PCF_JWT_SECRET`, or RS256/ES256 with
//! `PCF_JWT_PUBLIC_KEY`) and hashed API keys for service consumers (`PCF_API_KEYS_FILE`).

use anyhow::Context;
use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pcf_domain::auth::{AccessRole, Principal, Tier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Environment};

/// The claims PCF reads and writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub iat: u64,
}

/// Why credentials were refused; the detail is logged, the client sees `UNAUTHENTICATED`.
/// Whatever of the client's text it quotes is an [`excerpt`]: a log line never carries more
/// than a bounded, escaped piece of client input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// The most characters of client text quoted in a message or log line.
const EXCERPT_CHARS: usize = 32;

/// A bounded, escaped excerpt of client text: its first characters with control and
/// non-ASCII characters escaped, and how long the whole was when it was cut.
pub fn excerpt(text: &str) -> String {
    excerpt_of(text, EXCERPT_CHARS)
}

/// As [`excerpt`], of at most `chars` characters.
pub fn excerpt_of(text: &str, chars: usize) -> String {
    let mut out = String::new();
    for c in text.chars().take(chars) {
        out.extend(c.escape_default());
    }
    if text.chars().nth(chars).is_some() {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

/// Verified credentials: who, and until when (API keys do not expire).
#[derive(Debug, Clone)]
pub struct Verified {
    pub principal: Principal,
    /// The Unix time from which the credentials are refused: a token's `exp` plus the
    /// leeway every check of it allows.
    pub expires: Option<u64>,
}

/// The shortest HS256 secret production accepts: 256 bits, as RFC 7518 requires of a key
/// for HMAC with SHA-256.
pub const MIN_SECRET_BYTES: usize = 32;

/// One API key of the keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    name: String,
    /// Hex SHA-256 of the key; the key itself is never stored.
    sha256: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyEntry>,
}

/// Verifies credentials.
pub struct Authenticator {
    decoding: DecodingKey,
    validation: Validation,
    /// SHA-256 of each key → its principal.
    api_keys: HashMap<[u8; 32], Principal>,
    verified: VerifiedTokens,
    /// The longest lifetime left (`exp` from now) a token may claim.
    max_ttl: u64,
}

/// Tokens whose signature and claims have verified, by their whole text: the signature is
/// part of the text, so the same text verifies the same way again, and only the times
/// (`exp`, `nbf`) need checking on each use. Clients send the same token on every request;
/// this spares the signature check and the claims' decoding.
#[derive(Default)]
struct VerifiedTokens {
    entries: std::sync::Mutex<HashMap<String, VerifiedToken>>,
}

#[derive(Clone)]
struct VerifiedToken {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
}

/// At most this many tokens are remembered; when full, the memory starts again.
const VERIFIED_TOKENS: usize = 10_000;

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<VerifiedToken> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(token).cloned()
    }

    fn put(&self, token: &str, verified: VerifiedToken) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= VERIFIED_TOKENS {
            entries.clear();
        }
        entries.insert(token.to_owned(), verified);
    }
}

/// How a process verifies (and, in development, mints) tokens.
pub struct AuthSetup {
    pub authenticator: Authenticator,
    /// A development admin token, when the secret was generated at start.
    pub dev_token: Option<String>,
}

fn parse_roles(roles: &[String], whose: &str) -> anyhow::Result<BTreeSet<AccessRole>> {
    roles
        .iter()
        .map(|r| {
            AccessRole::parse(r)
                .with_context(|| format!("{whose}: unknown role {r:?} (admin, auditor, analytics)"))
        })
        .collect()
}

fn parse_tier(tier: Option<&str>) -> Tier {
    match tier {
        Some("premium") => Tier::Premium,
        _ => Tier::Standard,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random 256-bit secret, hex-encoded.
fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Mints an HS256 token.
pub fn mint(
    secret: &str,
    sub: &str,
    roles: &[AccessRole],
    tier: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let iat = now();
    let claims = Claims {
        sub: sub.to_owned(),
        roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
        tier: tier.map(str::to_owned),
        exp: iat + ttl.as_secs(),
        nbf: Some(iat),
        iat,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing the token")
}

/// Parses `90s`, `15m`, `1h`, `7d`.
pub fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .with_context(|| format!("--ttl {s:?}: expected a number and a unit, like 1h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        other => anyhow::bail!("--ttl {s:?}: unknown unit {other:?} (s, m, h, d)"),
    };
    Ok(Duration::from_secs(secs))
}

impl AuthSetup {
    /// From the configuration. Without a secret or public key, development gets a random
    /// secret and an admin token; production refuses to start.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let api_keys = match &config.api_keys_file {
            Some(path) => load_api_keys(path)?,
            None => HashMap::new(),
        };
        let (decoding, mut validation, dev_token) = match (
            &config.jwt_secret,
            &config.jwt_public_key,
        ) {
            (Some(_), Some(_)) => {
                anyhow::bail!("set PCF_JWT_SECRET or PCF_JWT_PUBLIC_KEY, not both")
            }
            (Some(secret), None) => {
                if config.environment == Environment::Production && secret.len() < MIN_SECRET_BYTES
                {
                    anyhow::bail!(
                            "PCF_JWT_SECRET is {} bytes; production needs at least {MIN_SECRET_BYTES} (256 bits), for example from `openssl rand -hex 32`",
                            secret.len()
                        );
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Validation::new(Algorithm::HS256),
                    None,
                )
            }
            (None, Some(key)) => {
                let pem = read_pem(key)?;
                if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                    (k, Validation::new(Algorithm::RS256), None)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                    (k, Validation::new(Algorithm::ES256), None)
                } else {
                    anyhow::bail!(
                        "PCF_JWT_PUBLIC_KEY is neither an RSA nor an EC public key in PEM"
                    );
                }
            }
            (None, None) => {
                if config.environment == Environment::Production {
                    anyhow::bail!("PCF_ENV=production needs PCF_JWT_SECRET or PCF_JWT_PUBLIC_KEY");
                }
                let secret = random_secret()?;
                let token = mint(
                    &secret,
                    "dev-admin",
                    &[AccessRole::Admin],
                    None,
                    Duration::from_secs(12 * 3600),
                )?;
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Validation::new(Algorithm::HS256),
                    Some(token),
                )
            }
        };
        // One algorithm only: the key decides it, the token's header cannot.
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            authenticator: Authenticator {
                decoding,
                validation,
                api_keys,
                verified: VerifiedTokens::default(),
                max_ttl: config.jwt_max_ttl.as_secs(),
            },
            dev_token,
        })
    }
}

fn read_pem(value: &str) -> anyhow::Result<String> {
    if value.contains("-----BEGIN") {
        Ok(value.to_owned())
    } else {
        std::fs::read_to_string(value)
            .with_context(|| format!("reading PCF_JWT_PUBLIC_KEY from {value}"))
    }
}

fn load_api_keys(path: &Path) -> anyhow::Result<HashMap<[u8; 32], Principal>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading PCF_API_KEYS_FILE {}", path.display()))?;
    let file: ApiKeysFile =
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    let mut keys = HashMap::new();
    let mut names: HashMap<[u8; 32], String> = HashMap::new();
    for entry in file.keys {
        let whose = format!("API key {:?}", entry.name);
        let mut hash = [0u8; 32];
        hex::decode_to_slice(entry.sha256.trim().to_ascii_lowercase(), &mut hash)
            .with_context(|| format!("{whose}: sha256 must be 64 hex digits"))?;
        // One key standing for two entries would take the roles of whichever came last.
        if let Some(first) = names.insert(hash, entry.name.clone()) {
            anyhow::bail!(
                "{}: {whose} has the same sha256 as API key {first:?}; each key must be listed once",
                path.display()
            );
        }
        let principal = Principal {
            subject: Some(entry.name.clone()),
            roles: parse_roles(&entry.roles, &whose)?,
            tier: parse_tier(entry.tier.as_deref()),
        };
        keys.insert(hash, principal);
    }
    Ok(keys)
}

impl Authenticator {
    /// The caller of a request: anonymous without credentials; an error for credentials that
    /// do not verify.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        if let Some(key) = headers.get("x-api-key") {
            let key = key
                .to_str()
                .map_err(|_| AuthError("malformed API key".into()))?;
            return self.api_key(key);
        }
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(Principal::anonymous());
        };
        let value = value
            .to_str()
            .map_err(|_| AuthError("malformed Authorization header".into()))?;
        self.credentials(value)
    }

    /// Verifies an `Authorization` value: `Bearer <jwt>` or `ApiKey <key>`.
    pub fn credentials(&self, value: &str) -> Result<Principal, AuthError> {
        self.verify(value).map(|v| v.principal)
    }

    /// As [`Self::credentials`], with when the credentials expire.
    pub fn verify(&self, value: &str) -> Result<Verified, AuthError> {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            self.verify_token(rest.trim())
        } else if scheme.eq_ignore_ascii_case("apikey") {
            self.api_key(rest.trim()).map(|principal| Verified {
                principal,
                expires: None,
            })
        } else {
            Err(AuthError(format!(
                "unsupported authorization scheme \"{}\"",
                excerpt(scheme)
            )))
        }
    }

    /// Verifies a JWT: signature with the one configured algorithm, `exp`, `nbf`.
    pub fn token(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_token(token).map(|v| v.principal)
    }

    fn verify_token(&self, token: &str) -> Result<Verified, AuthError> {
        if let Some(known) = self.verified.get(token) {
            // The same checks of the times as the first verification, with its leeway.
            let now = jsonwebtoken::get_current_timestamp();
            let leeway = self.validation.leeway;
            if known.exp.saturating_add(leeway) < now {
                return Err(AuthError("token refused: ExpiredSignature".into()));
            }
            if known
                .nbf
                .is_some_and(|nbf| nbf > now.saturating_add(leeway))
            {
                return Err(AuthError("token refused: ImmatureSignature".into()));
            }
            return Ok(Verified {
                principal: known.principal,
                expires: Some(known.exp.saturating_add(leeway).saturating_add(1)),
            });
        }
        // The error's text may quote the token's header; only an excerpt is kept.
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                AuthError(format!(
                    "token refused: {}",
                    excerpt_of(&e.to_string(), 120)
                ))
            })?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() {
            return Err(AuthError("token refused: empty subject".into()));
        }
        let now = jsonwebtoken::get_current_timestamp();
        let longest = now
            .saturating_add(self.max_ttl)
            .saturating_add(self.validation.leeway);
        if claims.exp > longest {
            return Err(AuthError(format!(
                "token refused: it claims to be valid for {} s, more than the {} s accepted",
                claims.exp - now,
                self.max_ttl
            )));
        }
        let principal = Principal {
            subject: Some(claims.sub),
            // Roles this version does not know grant nothing.
            roles: claims
                .roles
                .iter()
                .filter_map(|r| AccessRole::parse(r))
                .collect(),
            tier: parse_tier(claims.tier.as_deref()),
        };
        self.verified.put(
            token,
            VerifiedToken {
                principal: principal.clone(),
                exp: claims.exp,
                nbf: claims.nbf,
            },
        );
        Ok(Verified {
            principal,
            expires: Some(
                claims
                    .exp
                    .saturating_add(self.validation.leeway)
                    .saturating_add(1),
            ),
        })
    }

    fn api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.api_keys
            .get(&hash)
            .cloned()
            .ok_or_else(|| AuthError("unknown API key".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(secret: &str) -> Authenticator {
        let config = Config {
            jwt_secret: Some(secret.to_owned()),
            ..Config::default()
        };
        AuthSetup::from_config(&config).unwrap().authenticator
    }

    #[test]
    fn a_minted_token_verifies_with_its_roles_and_tier() {
        let auth = setup("s3cret");
        let token = mint(
            "s3cret",
            "u1",
            &[AccessRole::Auditor],
            Some("premium"),
            Duration::from_secs(60),
        )
        .unwrap();
        let p = auth.token(&token).unwrap();
        assert_eq!(p.subject.as_deref(), Some("u1"));
        assert!(p.has(AccessRole::Auditor));
        assert_eq!(p.tier, Tier::Premium);
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let auth = setup("s3cret");
        let token = mint("other", "u1", &[], None, Duration::from_secs(60)).unwrap();
        assert!(auth.token(&token).is_err());
    }

    #[test]
    fn a_remembered_token_is_still_refused_once_it_expires() {
        let auth = setup("s3cret");
        let token = mint("s3cret", "u1", &[], None, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.token(&token).unwrap().subject.as_deref(), Some("u1"));
        // Its verification is remembered; move its expiry into the past, beyond the leeway.
        let mut known = auth.verified.get(&token).expect("remembered");
        known.exp = jsonwebtoken::get_current_timestamp() - auth.validation.leeway - 2;
        auth.verified.put(&token, known);
        let err = auth.token(&token).unwrap_err();
        assert!(err.0.contains("ExpiredSignature"), "{}", err.0);
        // A token with one character changed is verified afresh, and refused.
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(auth.token(&forged).is_err());
    }

    #[test]
    fn ttl_units_parse() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn production_without_a_secret_does_not_start() {
        let config = Config {
            environment: Environment::Production,
            ..Config::default()
        };
        let err = AuthSetup::from_config(&config).err().unwrap().to_string();
        assert!(err.contains("PCF_JWT_SECRET"), "{err}");
    }

    #[test]
    fn production_refuses_a_secret_under_256_bits() {
        let config = |secret: &str| Config {
            environment: Environment::Production,
            jwt_secret: Some(secret.to_owned()),
            ..Config::default()
        };
        for short in ["a", &"x".repeat(MIN_SECRET_BYTES - 1)] {
            let err = AuthSetup::from_config(&config(short))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("at least 32"), "{err}");
        }
        assert!(AuthSetup::from_config(&config(&"x".repeat(MIN_SECRET_BYTES))).is_ok());
        // Development takes what it is given.
        let dev = Config {
            jwt_secret: Some("a".to_owned()),
            ..Config::default()
        };
        assert!(AuthSetup::from_config(&dev).is_ok());
    }

    #[test]
    fn a_keys_file_listing_one_hash_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let hash = hex::encode(Sha256::digest(b"the-key"));
        std::fs::write(
            &path,
            format!(
                "[[keys]]\nname = \"reader\"\nsha256 = \"{hash}\"\nroles = [\"analytics\"]\n\n\
                 [[keys]]\nname = \"admin\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n",
                hash.to_uppercase()
            ),
        )
        .unwrap();
        let err = load_api_keys(&path).err().unwrap().to_string();
        assert!(err.contains("same sha256"), "{err}");
        assert!(err.contains("reader") && err.contains("admin"), "{err}");
    }

    #[test]
    fn an_excerpt_is_bounded_and_escaped() {
        let attack = format!("{}\n\u{202e}", "A".repeat(60_000));
        let e = excerpt(&attack);
        assert!(e.len() < 64, "{e}");
        assert!(e.contains("60004 bytes"), "{e}");
        assert_eq!(excerpt("Bearer\n"), "Bearer\\n");
        assert_eq!(excerpt("\u{202e}x"), "\\u{202e}x");
    }

    #[test]
    fn development_without_a_secret_gets_a_working_admin_token() {
        let setup = AuthSetup::from_config(&Config::default()).unwrap();
        let token = setup.dev_token.unwrap();
        let p = setup.authenticator.token(&token).unwrap();
        assert!(p.is_admin());
    }
}
