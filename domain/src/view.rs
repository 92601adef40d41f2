//! The user read model: the document the projectors write and the query side serves.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::UserEvent;

/// A user as readers see it. `version` is the sequence of the last event applied. A deleted
/// account stays as a tombstone with its version and no personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    #[serde(deserialize_with = "crate::time::deserialize")]
    pub created_at: DateTime<Utc>,
    #[serde(deserialize_with = "crate::time::deserialize")]
    pub updated_at: DateTime<Utc>,
    pub version: u64,
    pub deleted: bool,
}

impl UserView {
    /// Applies event number `sequence` of user `id` whose personal fields are erased: a
    /// user's key is destroyed only with the account, so the user is deleted and the view is
    /// its tombstone (at this sequence), whatever the event was.
    pub fn fold_erased(
        current: Option<UserView>,
        id: Uuid,
        sequence: u64,
        occurred_at: DateTime<Utc>,
    ) -> UserView {
        let created_at = current.as_ref().map_or(occurred_at, |v| v.created_at);
        UserView {
            id,
            email: String::new(),
            display_name: String::new(),
            bio: None,
            avatar_url: None,
            created_at,
            updated_at: occurred_at,
            version: sequence,
            deleted: true,
        }
    }

    /// Applies event number `sequence` of user `id` to the current view (if any) and returns
    /// the new one. Events that need a view and find none leave it as it is.
    pub fn fold(
        current: Option<UserView>,
        id: Uuid,
        sequence: u64,
        event: &UserEvent,
    ) -> Option<UserView> {
        match (event, current) {
            (
                UserEvent::UserCreated {
                    email,
                    display_name,
                    bio,
                    avatar_url,
                    occurred_at,
                    ..
                },
                _,
            ) => Some(UserView {
                id,
                email: email.clone(),
                display_name: display_name.clone(),
                bio: bio.clone(),
                avatar_url: avatar_url.clone(),
                created_at: *occurred_at,
                updated_at: *occurred_at,
                version: sequence,
                deleted: false,
            }),
            (_, None) => None,
            (
                UserEvent::ProfileUpdated {
                    display_name,
                    bio,
                    avatar_url,
                    occurred_at,
                },
                Some(mut v),
            ) => {
                v.display_name = display_name.clone();
                v.bio = bio.clone();
                v.avatar_url = avatar_url.clone();
                v.updated_at = *occurred_at;
                v.version = sequence;
                Some(v)
            }
            (
                UserEvent::EmailChanged {
                    new_email,
                    occurred_at,
                    ..
                },
                Some(mut v),
            ) => {
                v.email = new_email.clone();
                v.updated_at = *occurred_at;
                v.version = sequence;
                Some(v)
            }
            (UserEvent::AccountDeleted { occurred_at }, Some(mut v)) => {
                v.email = String::new();
                v.display_name = String::new();
                v.bio = None;
                v.avatar_url = None;
                v.updated_at = *occurred_at;
                v.version = sequence;
                v.deleted = true;
                Some(v)
            }
        }
    }
}
