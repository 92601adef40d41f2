//! Events of the `User` aggregate, in the past tense, each with a version. Payloads hold
//! plain strings (already validated when written) so that old events always load even if a
//! rule later tightens.
//!
//! The personal fields (email, names, bio, avatar) are stored sealed with the user's data key
//! (`pcf_adapters::personal`); a reader gets them back in plain text, or, once the key is
//! destroyed with the account, not at all: an erased event reads with those fields empty
//! (hence their defaults) and its envelope says it is erased (`EventEnvelope::is_erased`).

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Something that happened to a user. Serialised externally tagged by event type, which is
/// also how postgres-es and sqlite-es store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all_fields = "camelCase")]
pub enum UserEvent {
    UserCreated {
        user_id: Uuid,
        #[serde(default)]
        email: String,
        #[serde(default)]
        display_name: String,
        bio: Option<String>,
        avatar_url: Option<String>,
        #[serde(deserialize_with = "crate::time::deserialize")]
        occurred_at: DateTime<Utc>,
    },
    /// Carries the whole new profile, so a reader never needs the previous state.
    ProfileUpdated {
        #[serde(default)]
        display_name: String,
        bio: Option<String>,
        avatar_url: Option<String>,
        #[serde(deserialize_with = "crate::time::deserialize")]
        occurred_at: DateTime<Utc>,
    },
    EmailChanged {
        #[serde(default)]
        old_email: String,
        #[serde(default)]
        new_email: String,
        #[serde(deserialize_with = "crate::time::deserialize")]
        occurred_at: DateTime<Utc>,
    },
    AccountDeleted {
        #[serde(deserialize_with = "crate::time::deserialize")]
        occurred_at: DateTime<Utc>,
    },
}

/// The version every event type is written with today: "2", personal fields sealed (and
/// `AccountDeleted` saying when the key was destroyed). Version "1" events hold them in plain
/// text; they are read alike.
pub const CURRENT_EVENT_VERSION: &str = "2";

impl UserEvent {
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::UserCreated { occurred_at, .. }
            | Self::ProfileUpdated { occurred_at, .. }
            | Self::EmailChanged { occurred_at, .. }
            | Self::AccountDeleted { occurred_at } => *occurred_at,
        }
    }

    /// The payload alone (without the type tag), as published in the envelope.
    pub fn payload(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut map)) => map
                .remove(&self.event_type())
                .unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::Null,
        }
    }

    /// Rebuilds an event from its type name and payload, as found in an envelope.
    pub fn from_payload(
        event_type: &str,
        payload: &serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        // `{event_type: payload}` as an externally tagged enum, read in place (no copy of
        // the payload).
        use serde::de::value::{MapAccessDeserializer, MapDeserializer};
        use serde::Deserialize;
        let tagged =
            MapDeserializer::<_, serde_json::Error>::new(std::iter::once((event_type, payload)));
        Self::deserialize(MapAccessDeserializer::new(tagged))
    }

    /// The event's type name, as stored and published.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::UserCreated { .. } => "UserCreated",
            Self::ProfileUpdated { .. } => "ProfileUpdated",
            Self::EmailChanged { .. } => "EmailChanged",
            Self::AccountDeleted { .. } => "AccountDeleted",
        }
    }

    /// Whether events of this type carry personal fields (`PersonalFields`).
    pub fn has_personal_fields(&self) -> bool {
        !matches!(self, Self::AccountDeleted { .. })
    }

    /// Puts `fields` (opened from the event's sealed personal data) in place of its personal
    /// fields; a field the event type does not have is ignored, one it lacks is emptied.
    pub fn fill_personal(&mut self, fields: PersonalFields) {
        let PersonalFields {
            email,
            display_name: name,
            bio: b,
            avatar_url: avatar,
            old_email: old,
            new_email: new,
        } = fields;
        match self {
            Self::UserCreated {
                email: e,
                display_name,
                bio,
                avatar_url,
                ..
            } => {
                *e = email.unwrap_or_default();
                *display_name = name.unwrap_or_default();
                *bio = b;
                *avatar_url = avatar;
            }
            Self::ProfileUpdated {
                display_name,
                bio,
                avatar_url,
                ..
            } => {
                *display_name = name.unwrap_or_default();
                *bio = b;
                *avatar_url = avatar;
            }
            Self::EmailChanged {
                old_email,
                new_email,
                ..
            } => {
                *old_email = old.unwrap_or_default();
                *new_email = new.unwrap_or_default();
            }
            Self::AccountDeleted { .. } => {}
        }
    }
}

/// The personal fields of an event (`auth::PERSONAL_FIELDS`), as sealed together: the
/// plaintext of a payload's `sealed` field.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersonalFields {
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub old_email: Option<String>,
    pub new_email: Option<String>,
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        CURRENT_EVENT_VERSION.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_through_the_envelope_shape() {
        let event = UserEvent::EmailChanged {
            old_email: "a@example.com".into(),
            new_email: "b@example.com".into(),
            occurred_at: Utc::now(),
        };
        let payload = event.payload();
        assert_eq!(payload["newEmail"], "b@example.com");
        let back = UserEvent::from_payload(&event.event_type(), &payload).unwrap();
        assert_eq!(back, event);
    }
}
