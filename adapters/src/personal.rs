//! Personal data sealed per user (crypto-shredding): what the writer of events and every
//! reader of them must agree on.
//!
//! Each user has a random 256-bit data key, stored only wrapped by a key-encryption key (KEK)
//! from configuration. The personal fields of an event (`PERSONAL_FIELDS`)
//! are sealed together with the user's data key: AES-256-GCM, a fresh random 96-bit nonce per
//! event, and associated data naming the user, the event's sequence and its type, so a sealed
//! value opens only in the event it was written for. Deleting the data key makes every copy of
//! those fields unreadable, wherever the event went.
//!
//! Shapes of a payload (`eventVersion` "2" is the sealed one):
//! * **sealed** (the event store, Kafka, dead letters): the other fields in plain text and
//!   `sealed`, base64 of nonce ‖ ciphertext ‖ tag, the personal fields as a JSON object;
//! * **opened** (for readers allowed personal data): the fields as in version 1;
//! * **erased** (the user's key is destroyed): the other fields and `"erased": true`;
//! * **redacted** (readers not allowed personal data, `pcf_domain::auth::redact_payload`):
//!   the other fields only.

use aes_gcm::aead::{Aead, AeadInPlace, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub use pcf_domain::auth::PERSONAL_FIELDS;
pub use pcf_domain::envelope::{ERASED, SEALED};
/// The event version whose personal fields are sealed.
pub const SEALED_VERSION: &str = "2";

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
/// What a KEK's check value seals: opening it proves the KEK is the one that wrapped keys.
const CHECK_PLAINTEXT: &[u8] = b"pcf key-encryption key check";

/// A user's data key. Zeroed when dropped.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut()).expect("the operating system's random source");
        Self(key)
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A key-encryption key with its id.
#[derive(Clone)]
pub struct Kek {
    id: String,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({:?})", self.id)
    }
}

impl Kek {
    /// A KEK from its id and the base64 of its 32 bytes.
    pub fn parse(id: &str, base64: &str) -> Result<Self, KeyError> {
        let id = id.trim();
        if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_whitespace()) {
            return Err(KeyError::BadKek(format!(
                "the KEK id {id:?} must be 1 to 64 characters without spaces"
            )));
        }
        let bytes = Zeroizing::new(
            BASE64
                .decode(base64.trim())
                .map_err(|_| KeyError::BadKek(format!("the KEK {id:?} is not base64")))?,
        );
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            KeyError::BadKek(format!(
                "the KEK {id:?} must be 32 bytes ({} given)",
                bytes.len()
            ))
        })?;
        Ok(Self {
            id: id.to_owned(),
            key: Zeroizing::new(key),
        })
    }

    /// A new random KEK.
    pub fn generate(id: &str) -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut()).expect("the operating system's random source");
        Self {
            id: id.to_owned(),
            key,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as base64, for the file development mode keeps it in.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.key.as_ref()))
    }
}

/// A data key as stored: wrapped by the KEK named `kek_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    pub bytes: Vec<u8>,
}

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    BadKek(String),
    /// A key is wrapped by a KEK the configuration does not have.
    #[error("data keys are wrapped by the KEK {0:?}, which is not configured")]
    UnknownKek(String),
    /// The configured KEK with this id is not the one the stored keys were wrapped with
    /// (its check value does not open).
    #[error("the KEK {0:?} is not the key-encryption key the stored keys were wrapped with")]
    WrongKek(String),
    /// The KEK is right but this user's wrapped key does not open: the key row is damaged.
    #[error("the data key of user {0} is damaged")]
    Damaged(String),
}

/// The configured KEKs: the first wraps new keys, every one unwraps.
#[derive(Debug, Clone)]
pub struct Keyring {
    keks: Vec<Kek>,
}

impl Keyring {
    pub fn new(keks: Vec<Kek>) -> Result<Self, KeyError> {
        if keks.is_empty() {
            return Err(KeyError::BadKek(
                "no key-encryption key is configured".into(),
            ));
        }
        for (i, kek) in keks.iter().enumerate() {
            if keks[..i].iter().any(|k| k.id == kek.id) {
                return Err(KeyError::BadKek(format!(
                    "the KEK id {:?} is given twice",
                    kek.id
                )));
            }
        }
        Ok(Self { keks })
    }

    /// The id of the KEK that wraps new keys.
    pub fn current_id(&self) -> &str {
        &self.keks[0].id
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keks.iter().map(|k| k.id.as_str())
    }

    fn kek(&self, id: &str) -> Result<&Kek, KeyError> {
        self.keks
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::UnknownKek(id.to_owned()))
    }

    /// Wraps `key` of `user_id` under the current KEK.
    pub fn wrap(&self, user_id: &str, key: &DataKey) -> WrappedKey {
        let kek = &self.keks[0];
        WrappedKey {
            kek_id: kek.id.clone(),
            bytes: seal_bytes(&kek.key, &key_aad(user_id, &kek.id), key.0.as_ref()),
        }
    }

    /// Unwraps the data key of `user_id`.
    pub fn unwrap(&self, user_id: &str, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        let kek = self.kek(&wrapped.kek_id)?;
        let plain = Zeroizing::new(
            open_bytes(&kek.key, &key_aad(user_id, &kek.id), &wrapped.bytes)
                .map_err(|_| KeyError::Damaged(user_id.to_owned()))?,
        );
        let key: [u8; KEY_LEN] = plain
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Damaged(user_id.to_owned()))?;
        Ok(DataKey(Zeroizing::new(key)))
    }

    /// The check value of the KEK `id`: stored beside the keys it wraps, so that a wrong
    /// KEK is told from a damaged key.
    pub fn check_value(&self, id: &str) -> Result<Vec<u8>, KeyError> {
        let kek = self.kek(id)?;
        Ok(seal_bytes(&kek.key, &check_aad(id), CHECK_PLAINTEXT))
    }

    /// Whether the configured KEK `id` is the one whose check value this is.
    pub fn verify(&self, id: &str, check_value: &[u8]) -> Result<(), KeyError> {
        let kek = self.kek(id)?;
        match open_bytes(&kek.key, &check_aad(id), check_value) {
            Ok(plain) if plain == CHECK_PLAINTEXT => Ok(()),
            _ => Err(KeyError::WrongKek(id.to_owned())),
        }
    }
}

fn key_aad(user_id: &str, kek_id: &str) -> Vec<u8> {
    format!("pcf/data-key/v1/{user_id}/{kek_id}").into_bytes()
}

fn check_aad(kek_id: &str) -> Vec<u8> {
    format!("pcf/kek-check/v1/{kek_id}").into_bytes()
}

/// The associated data of an event's sealed fields: the user, the event's sequence and type.
pub fn event_aad(user_id: impl std::fmt::Display, sequence: u64, event_type: &str) -> Vec<u8> {
    format!("pcf/event/v2/{user_id}/{sequence}/{event_type}").into_bytes()
}

/// The associated data of a stored command result's sealed user.
pub fn command_aad(user_id: &str, command_id: &str) -> Vec<u8> {
    format!("pcf/command/v1/{user_id}/{command_id}").into_bytes()
}

/// A sealed value failed to open: it was altered, or moved from where it was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sealed personal data does not open: {0}")]
pub struct Tampered(pub &'static str);

fn cipher(key: &[u8; KEY_LEN]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

/// nonce ‖ ciphertext ‖ tag.
fn seal_bytes(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the operating system's random source");
    let sealed = cipher(key)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encrypts any message of this size");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_bytes(key: &[u8; KEY_LEN], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(Tampered("too short"));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    cipher(key)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: rest, aad })
        .map_err(|_| Tampered("authentication failed"))
}

/// Seals bytes with a data key, as base64 (for JSON).
pub fn seal_text(key: &DataKey, aad: &[u8], plaintext: &[u8]) -> String {
    BASE64.encode(seal_bytes(&key.0, aad, plaintext))
}

/// A data key made ready to open many values: its cipher's key schedule is computed once (a
/// rebuild opens every event of a user with the same key).
pub struct Opening(Aes256Gcm);

impl Opening {
    pub fn new(key: &DataKey) -> Self {
        Self(cipher(&key.0))
    }

    /// `open_text`, decrypted in place in the decoded bytes.
    pub fn open_text(&self, aad: &[u8], sealed: &str) -> Result<Zeroizing<Vec<u8>>, Tampered> {
        const TAG_LEN: usize = 16;
        let mut bytes = Zeroizing::new(BASE64.decode(sealed).map_err(|_| Tampered("not base64"))?);
        let len = bytes.len();
        if len < NONCE_LEN + TAG_LEN {
            return Err(Tampered("too short"));
        }
        let (nonce, rest) = bytes.split_at_mut(NONCE_LEN);
        let (text, tag) = rest.split_at_mut(len - NONCE_LEN - TAG_LEN);
        self.0
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, text, Tag::from_slice(tag))
            .map_err(|_| Tampered("authentication failed"))?;
        bytes.truncate(len - TAG_LEN);
        bytes.drain(..NONCE_LEN);
        Ok(bytes)
    }
}

/// Opens what `seal_text` sealed with the same key and associated data.
pub fn open_text(key: &DataKey, aad: &[u8], sealed: &str) -> Result<Vec<u8>, Tampered> {
    let bytes = BASE64.decode(sealed).map_err(|_| Tampered("not base64"))?;
    open_bytes(&key.0, aad, &bytes)
}

/// Moves the personal fields of a plain payload into `sealed`, sealed with `key` for this
/// event. A payload without personal fields is left as it is.
pub fn seal_payload(payload: &mut Value, key: &DataKey, aad: &[u8]) {
    let Some(fields) = payload.as_object_mut() else {
        return;
    };
    let personal: Map<String, Value> = PERSONAL_FIELDS
        .iter()
        .filter_map(|name| fields.remove(*name).map(|v| ((*name).to_owned(), v)))
        .collect();
    if personal.is_empty() {
        return;
    }
    let plain = Zeroizing::new(Value::Object(personal).to_string());
    fields.insert(
        SEALED.to_owned(),
        Value::String(seal_text(key, aad, plain.as_bytes())),
    );
}

/// Whether a payload holds personal fields in plain text (an older, version-1 event).
pub fn has_plain_personal_data(payload: &Value) -> bool {
    payload
        .as_object()
        .is_some_and(|fields| PERSONAL_FIELDS.iter().any(|f| fields.contains_key(*f)))
}

/// Whether a payload has sealed personal fields.
pub fn is_sealed(payload: &Value) -> bool {
    payload.get(SEALED).is_some()
}

/// Opens the sealed personal fields of a payload in place: with the user's key they are put
/// back as plain fields; without one (destroyed) the payload is marked erased. A plain
/// payload is left as it is.
pub fn open_payload(
    payload: &mut Value,
    key: Option<&DataKey>,
    aad: &[u8],
) -> Result<(), Tampered> {
    let Some(fields) = payload.as_object_mut() else {
        return Ok(());
    };
    if !fields.contains_key(SEALED) {
        return Ok(());
    }
    let Some(key) = key else {
        erase(fields);
        return Ok(());
    };
    open_payload_with(payload, &Opening::new(key), aad)
}

/// `open_payload` with the user's key made ready (`Opening`).
pub fn open_payload_with(payload: &mut Value, key: &Opening, aad: &[u8]) -> Result<(), Tampered> {
    let Some(fields) = payload.as_object_mut() else {
        return Ok(());
    };
    let Some(sealed) = fields.get(SEALED) else {
        return Ok(());
    };
    let sealed = sealed.as_str().ok_or(Tampered("not a string"))?;
    let plain = key.open_text(aad, sealed)?;
    let Ok(Value::Object(personal)) = serde_json::from_slice::<Value>(&plain) else {
        return Err(Tampered("not a JSON object"));
    };
    fields.remove(SEALED);
    for (name, value) in personal {
        if PERSONAL_FIELDS.contains(&name.as_str()) {
            fields.insert(name, value);
        }
    }
    Ok(())
}

/// Marks a payload's personal fields erased: they (plain or sealed) are removed and
/// `erased` is set. For the events of a user whose key is gone.
pub fn erase_payload(payload: &mut Value) {
    if let Some(fields) = payload.as_object_mut() {
        if PERSONAL_FIELDS.iter().any(|f| fields.contains_key(*f)) || fields.contains_key(SEALED) {
            erase(fields);
        }
    }
}

fn erase(fields: &mut Map<String, Value>) {
    fields.remove(SEALED);
    for name in PERSONAL_FIELDS {
        fields.remove(name);
    }
    fields.insert(ERASED.to_owned(), Value::Bool(true));
}

/// Whether a payload's personal fields were erased with their key.
pub fn is_erased(payload: &Value) -> bool {
    payload.get(ERASED).and_then(Value::as_bool) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keyring() -> Keyring {
        Keyring::new(vec![Kek::generate("k1")]).unwrap()
    }

    #[test]
    fn a_wrapped_key_unwraps_only_for_its_user_and_kek() {
        let ring = keyring();
        let key = DataKey::generate();
        let wrapped = ring.wrap("u1", &key);
        let back = ring.unwrap("u1", &wrapped).unwrap();
        assert_eq!(back.0.as_ref(), key.0.as_ref());
        assert_eq!(
            ring.unwrap("u2", &wrapped).unwrap_err(),
            KeyError::Damaged("u2".into())
        );
        let mut damaged = wrapped.clone();
        damaged.bytes[20] ^= 1;
        assert_eq!(
            ring.unwrap("u1", &damaged).unwrap_err(),
            KeyError::Damaged("u1".into())
        );
        let other = Keyring::new(vec![Kek::generate("k2")]).unwrap();
        assert_eq!(
            other.unwrap("u1", &wrapped).unwrap_err(),
            KeyError::UnknownKek("k1".into())
        );
    }

    #[test]
    fn a_check_value_tells_a_wrong_kek() {
        let ring = keyring();
        let check = ring.check_value("k1").unwrap();
        ring.verify("k1", &check).unwrap();
        let impostor = Keyring::new(vec![Kek::generate("k1")]).unwrap();
        assert_eq!(
            impostor.verify("k1", &check).unwrap_err(),
            KeyError::WrongKek("k1".into())
        );
    }

    #[test]
    fn rotation_wraps_with_the_first_and_unwraps_with_any() {
        let old = Kek::generate("old");
        let new = Kek::generate("new");
        let before = Keyring::new(vec![old.clone()]).unwrap();
        let key = DataKey::generate();
        let wrapped = before.wrap("u", &key);
        let after = Keyring::new(vec![new, old]).unwrap();
        let unwrapped = after.unwrap("u", &wrapped).unwrap();
        let rewrapped = after.wrap("u", &unwrapped);
        assert_eq!(rewrapped.kek_id, "new");
        assert_eq!(
            after.unwrap("u", &rewrapped).unwrap().0.as_ref(),
            key.0.as_ref()
        );
    }

    #[test]
    fn keks_are_parsed_with_clear_errors() {
        let kek = Kek::generate("a");
        let parsed = Kek::parse("a", &kek.to_base64()).unwrap();
        assert_eq!(parsed.key.as_ref(), kek.key.as_ref());
        assert!(
            matches!(Kek::parse("a", "not base64!"), Err(KeyError::BadKek(m)) if m.contains("base64"))
        );
        assert!(
            matches!(Kek::parse("a", "AAAA"), Err(KeyError::BadKek(m)) if m.contains("32 bytes"))
        );
        assert!(matches!(
            Kek::parse("", &kek.to_base64()),
            Err(KeyError::BadKek(_))
        ));
        assert!(Keyring::new(vec![kek.clone(), kek]).is_err());
        assert!(Keyring::new(vec![]).is_err());
    }

    fn created() -> Value {
        json!({
            "userId": "u1",
            "email": "zoe@example.com",
            "displayName": "Zoë",
            "bio": null,
            "avatarUrl": "https://example.com/a.png",
            "occurredAt": "2025-01-01T00:00:00Z"
        })
    }

    #[test]
    fn sealed_fields_open_only_in_their_own_event() {
        let key = DataKey::generate();
        let aad = event_aad("u1", 1, "UserCreated");
        let mut payload = created();
        seal_payload(&mut payload, &key, &aad);
        let text = payload.to_string();
        assert!(!text.contains("zoe@example.com") && !text.contains("Zoë"));
        assert_eq!(payload["userId"], "u1");
        assert!(is_sealed(&payload));

        let mut moved = payload.clone();
        let elsewhere = event_aad("u1", 2, "UserCreated");
        assert!(open_payload(&mut moved, Some(&key), &elsewhere).is_err());

        let mut altered = payload.clone();
        let mut sealed = BASE64.decode(altered[SEALED].as_str().unwrap()).unwrap();
        sealed[15] ^= 1;
        altered[SEALED] = Value::String(BASE64.encode(sealed));
        assert_eq!(
            open_payload(&mut altered, Some(&key), &aad),
            Err(Tampered("authentication failed"))
        );

        open_payload(&mut payload, Some(&key), &aad).unwrap();
        assert_eq!(payload, created());
    }

    #[test]
    fn without_its_key_a_payload_reads_as_erased() {
        let key = DataKey::generate();
        let aad = event_aad("u1", 1, "UserCreated");
        let mut payload = created();
        seal_payload(&mut payload, &key, &aad);
        open_payload(&mut payload, None, &aad).unwrap();
        assert_eq!(
            payload,
            json!({"userId": "u1", "occurredAt": "2025-01-01T00:00:00Z", "erased": true})
        );
        assert!(is_erased(&payload));

        let mut plain = created();
        erase_payload(&mut plain);
        assert_eq!(plain, payload);
    }

    #[test]
    fn redaction_leaves_only_what_is_not_personal() {
        let plain = pcf_domain::auth::redact_payload(&created());
        assert_eq!(
            plain,
            json!({"userId": "u1", "occurredAt": "2025-01-01T00:00:00Z"})
        );
        let key = DataKey::generate();
        let mut sealed = created();
        seal_payload(&mut sealed, &key, b"x");
        assert_eq!(pcf_domain::auth::redact_payload(&sealed), plain);
        let mut deleted = json!({"occurredAt": "2025-01-01T00:00:00Z"});
        seal_payload(&mut deleted, &key, b"x");
        assert!(!is_sealed(&deleted), "nothing personal, nothing sealed");
    }
}
