//! Commands of the `User` aggregate, in the imperative. They carry raw input: the aggregate
//! parses it into value types, so every rule is checked in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How an optional profile field changes: left alone, cleared, or set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProfilePatch {
    #[default]
    Keep,
    Clear,
    Set(String),
}

/// A request to change a user. `at` is the command's time, supplied by the caller so that the
/// aggregate stays free of clocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserCommand {
    CreateUser {
        user_id: Uuid,
        email: String,
        display_name: String,
        bio: Option<String>,
        avatar_url: Option<String>,
        at: DateTime<Utc>,
    },
    UpdateProfile {
        display_name: Option<String>,
        bio: ProfilePatch,
        avatar_url: ProfilePatch,
        expected_version: Option<u64>,
        at: DateTime<Utc>,
    },
    ChangeEmail {
        email: String,
        expected_version: Option<u64>,
        at: DateTime<Utc>,
    },
    DeleteAccount {
        expected_version: Option<u64>,
        at: DateTime<Utc>,
    },
}

impl UserCommand {
    /// The command's name as clients and metrics see it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CreateUser { .. } => "createUser",
            Self::UpdateProfile { .. } => "updateProfile",
            Self::ChangeEmail { .. } => "changeEmail",
            Self::DeleteAccount { .. } => "deleteAccount",
        }
    }

    /// The version the caller expects the user to be at, if it said.
    pub fn expected_version(&self) -> Option<u64> {
        match self {
            Self::CreateUser { .. } => None,
            Self::UpdateProfile {
                expected_version, ..
            }
            | Self::ChangeEmail {
                expected_version, ..
            }
            | Self::DeleteAccount {
                expected_version, ..
            } => *expected_version,
        }
    }
}
