//! Personal data on the write path: what an append stores (events with their personal fields
//! sealed with the user's data key, the key a new user gets, the key an account deletion
//! destroys, a command result without personal data in plain text), and how a load or a
//! command-id replay opens it again.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use pcf_adapters::keys::Keys;
use pcf_adapters::personal::{self, DataKey, WrappedKey};
use pcf_domain::events::CURRENT_EVENT_VERSION;
use pcf_domain::{UserEvent, UserView};
use serde_json::Value;
use uuid::Uuid;

use super::{CommandResult, StoreError};

/// The stored command result's field holding its user view, sealed with the user's key.
const SEALED_USER: &str = "sealedUser";

/// What an append writes besides the request: computed before the statement, in memory.
pub struct Sealed {
    /// The events' stored (externally tagged) payloads, personal fields sealed.
    pub payloads: Vec<Value>,
    /// The version each event is stored with.
    pub version: &'static str,
    /// A key to insert: a new user's, or an older user's that had none yet.
    pub new_key: Option<WrappedKey>,
    /// The key is destroyed with the append (an account deletion): when.
    pub key_destroyed_at: Option<DateTime<Utc>>,
    /// The user view of the command result, sealed, for the stored result.
    sealed_user: Option<String>,
}

impl Sealed {
    /// Seals the events `events` of `user`, numbered from `first_sequence`, and the user view
    /// of the command's result (under `command_id`, if the caller gave one).
    pub(crate) async fn prepare(
        keys: &Keys,
        user: Uuid,
        first_sequence: u64,
        events: &[UserEvent],
        user_after: Option<&UserView>,
        command_id: Option<&str>,
    ) -> Result<Self, StoreError> {
        let creating = matches!(events.first(), Some(UserEvent::UserCreated { .. }));
        let deleting = events
            .iter()
            .any(|e| matches!(e, UserEvent::AccountDeleted { .. }));
        let existing = if creating {
            None
        } else {
            keys.key_for_writing(user).await?
        };
        let (key, new_key) = match existing {
            Some(key) => (Some(key), None),
            // A deletion of a user that never had a key seals nothing and destroys nothing.
            None if deleting => (None, None),
            None => {
                let key = DataKey::generate();
                let wrapped = keys.keyring().wrap(&user.to_string(), &key);
                (Some(key), Some(wrapped))
            }
        };
        // Only a key that exists is destroyed (an account from before keys has none).
        let key_destroyed_at = (deleting && key.is_some()).then(Utc::now);
        let mut payloads = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let event_type = event.event_type();
            let mut inner = event.payload();
            if let Some(key) = &key {
                let aad = personal::event_aad(user, first_sequence + i as u64, &event_type);
                personal::seal_payload(&mut inner, key, &aad);
            }
            if let (UserEvent::AccountDeleted { .. }, Some(at), Some(fields)) =
                (event, key_destroyed_at, inner.as_object_mut())
            {
                fields.insert("keyDestroyedAt".into(), Value::String(rfc3339(at)));
            }
            payloads.push(serde_json::json!({ event_type: inner }));
        }
        let sealed_user = match (&key, user_after, command_id) {
            (Some(key), Some(view), Some(command_id)) if !view.deleted => {
                let text = serde_json::to_vec(view).map_err(internal)?;
                let aad = personal::command_aad(&user.to_string(), command_id);
                Some(personal::seal_text(key, &aad, &text))
            }
            _ => None,
        };
        Ok(Self {
            payloads,
            version: CURRENT_EVENT_VERSION,
            new_key,
            key_destroyed_at,
            sealed_user,
        })
    }

    /// The command result as stored with its command id: its user view sealed.
    pub(crate) fn stored_result(&self, result: &CommandResult) -> Result<Value, StoreError> {
        let mut value = serde_json::to_value(result).map_err(internal)?;
        let Some(fields) = value.as_object_mut() else {
            return Ok(value);
        };
        if let Some(sealed) = &self.sealed_user {
            fields.insert("user".into(), Value::Null);
            fields.insert(SEALED_USER.into(), Value::String(sealed.clone()));
        }
        if let Some(at) = self.key_destroyed_at {
            fields.insert("keyDestroyedAt".into(), Value::String(rfc3339(at)));
        }
        Ok(value)
    }
}

/// Opens a stored command result's user view: with the user's key it is the view again;
/// with the key destroyed, none.
pub(crate) async fn open_result(
    keys: &Keys,
    command_id: &str,
    mut stored: Value,
) -> Result<Value, StoreError> {
    let Some(sealed) = stored
        .as_object_mut()
        .and_then(|fields| fields.remove(SEALED_USER))
    else {
        return Ok(stored);
    };
    let user: Uuid = stored
        .get("userId")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Internal("a stored command result without its user".into()))?;
    let view = match keys.fetch(&[user]).await?.get(&user) {
        Some(key) => {
            let aad = personal::command_aad(&user.to_string(), command_id);
            let plain = personal::open_text(key, &aad, sealed.as_str().unwrap_or_default())
                .map_err(|e| {
                    keys.integrity_error(
                        format_args!("the stored result of a command of user {user}"),
                        &e.to_string(),
                    );
                    StoreError::Internal(format!(
                        "the stored result of a command of user {user}: {e}"
                    ))
                })?;
            serde_json::from_slice(&plain).map_err(internal)?
        }
        None => Value::Null,
    };
    stored["user"] = view;
    Ok(stored)
}

/// Opens one stored event of `user` for a load: its personal fields with `key`, or erased
/// without one (a deleted user's). The event comes back as the domain event.
pub(crate) fn open_stored(
    keys: &Keys,
    user: Uuid,
    sequence: u64,
    event_type: &str,
    mut stored: Value,
    key: Option<&DataKey>,
) -> Result<UserEvent, StoreError> {
    if let Some(inner) = stored.get_mut(event_type) {
        let aad = personal::event_aad(user, sequence, event_type);
        personal::open_payload(inner, key, &aad).map_err(|e| {
            keys.integrity_error(
                format_args!("event {sequence} of user {user}"),
                &e.to_string(),
            );
            StoreError::Internal(format!("event {sequence} of user {user}: {e}"))
        })?;
    }
    serde_json::from_value(stored).map_err(internal)
}

/// Whether a stored (externally tagged) payload has sealed fields.
pub(crate) fn stored_is_sealed(stored: &Value, event_type: &str) -> bool {
    stored.get(event_type).is_some_and(personal::is_sealed)
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

impl From<pcf_domain::ports::PortError> for StoreError {
    fn from(e: pcf_domain::ports::PortError) -> Self {
        match e {
            pcf_domain::ports::PortError::Unavailable(m) => StoreError::Unavailable(m),
            pcf_domain::ports::PortError::Internal(m) => StoreError::Internal(m),
        }
    }
}
