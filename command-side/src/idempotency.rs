//! What a command id stands for. A client's `commandId` is a key it chose, so anyone may send
//! the same one: a repeat is answered with the first result only when it comes from the same
//! caller with the same command, target and input. The store keeps a fingerprint of those
//! beside the id, and a stored answer only for `COMMAND_ID_RETENTION`.

use pcf_domain::UserCommand;
use sha2::{Digest, Sha256};
use std::time::Duration;
use uuid::Uuid;

/// How long a command id answers with its first result. After that it is as if it had never
/// been used: the same id runs its command again. Long enough for any client's retries
/// (minutes at most), short enough that the table of stored answers stays small.
pub const COMMAND_ID_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Who sent a command, as far as its command id is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No credentials (sign-up): every anonymous caller shares one scope, so an anonymous
    /// repeat is answered only when its input is identical, which a stranger would have to
    /// know already.
    Anonymous,
    /// The token's subject or the API key's name.
    Subject(String),
}

impl Caller {
    /// The caller named by `subject`, anonymous when there is none.
    pub fn from_subject(subject: Option<&str>) -> Self {
        match subject {
            Some(s) => Self::Subject(s.to_owned()),
            None => Self::Anonymous,
        }
    }

    fn scope(&self) -> String {
        match self {
            Self::Anonymous => "anonymous".to_owned(),
            Self::Subject(s) => format!("sub:{s}"),
        }
    }
}

/// The fingerprint stored with a command id: the SHA-256 (hex) of the caller's scope, the
/// command's name, its target and its input. The target is left out of `createUser`, whose
/// user id is made afresh for every request; the command's time (`at`) is left out of every
/// command, as a retry is sent later than the first try.
pub fn fingerprint(caller: &Caller, user_id: Uuid, command: &UserCommand) -> String {
    // Every field is named (no `..`), so that a field added to a command cannot be left out
    // of the fingerprint unnoticed.
    let (target, input) = match command {
        UserCommand::CreateUser {
            user_id: _,
            email,
            display_name,
            bio,
            avatar_url,
            at: _,
        } => (
            None,
            serde_json::json!([email, display_name, bio, avatar_url]),
        ),
        UserCommand::UpdateProfile {
            display_name,
            bio,
            avatar_url,
            expected_version,
            at: _,
        } => (
            Some(user_id),
            serde_json::json!([display_name, bio, avatar_url, expected_version]),
        ),
        UserCommand::ChangeEmail {
            email,
            expected_version,
            at: _,
        } => (Some(user_id), serde_json::json!([email, expected_version])),
        UserCommand::DeleteAccount {
            expected_version,
            at: _,
        } => (Some(user_id), serde_json::json!([expected_version])),
    };
    // A JSON array: each part is delimited, so no two different commands give one text.
    let text = serde_json::json!([
        "pcf-command-id-v1",
        caller.scope(),
        command.name(),
        target,
        input
    ])
    .to_string();
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use pcf_domain::ProfilePatch;

    fn update(name: &str, bio: ProfilePatch, expected: Option<u64>, at: i64) -> UserCommand {
        UserCommand::UpdateProfile {
            display_name: Some(name.to_owned()),
            bio,
            avatar_url: ProfilePatch::Keep,
            expected_version: expected,
            at: Utc.timestamp_opt(at, 0).unwrap(),
        }
    }

    fn create(user_id: Uuid, email: &str, at: i64) -> UserCommand {
        UserCommand::CreateUser {
            user_id,
            email: email.to_owned(),
            display_name: "A".to_owned(),
            bio: None,
            avatar_url: None,
            at: Utc.timestamp_opt(at, 0).unwrap(),
        }
    }

    #[test]
    fn a_retry_later_has_the_same_fingerprint() {
        let user = Uuid::new_v4();
        let alice = Caller::Subject("alice".into());
        assert_eq!(
            fingerprint(&alice, user, &update("A", ProfilePatch::Keep, None, 1)),
            fingerprint(&alice, user, &update("A", ProfilePatch::Keep, None, 2)),
        );
        // A sign-up gets a new user id on every request.
        assert_eq!(
            fingerprint(
                &Caller::Anonymous,
                Uuid::new_v4(),
                &create(Uuid::new_v4(), "a@x.io", 1)
            ),
            fingerprint(
                &Caller::Anonymous,
                Uuid::new_v4(),
                &create(Uuid::new_v4(), "a@x.io", 2)
            ),
        );
    }

    #[test]
    fn another_caller_command_target_or_input_has_another_fingerprint() {
        let user = Uuid::new_v4();
        let alice = Caller::Subject("alice".into());
        let base = fingerprint(&alice, user, &update("A", ProfilePatch::Keep, None, 1));
        let others = [
            fingerprint(
                &Caller::Subject("bob".into()),
                user,
                &update("A", ProfilePatch::Keep, None, 1),
            ),
            fingerprint(
                &Caller::Anonymous,
                user,
                &update("A", ProfilePatch::Keep, None, 1),
            ),
            fingerprint(
                &alice,
                Uuid::new_v4(),
                &update("A", ProfilePatch::Keep, None, 1),
            ),
            fingerprint(&alice, user, &update("B", ProfilePatch::Keep, None, 1)),
            fingerprint(&alice, user, &update("A", ProfilePatch::Clear, None, 1)),
            fingerprint(&alice, user, &update("A", ProfilePatch::Keep, Some(1), 1)),
            fingerprint(
                &alice,
                user,
                &UserCommand::DeleteAccount {
                    expected_version: None,
                    at: Utc.timestamp_opt(1, 0).unwrap(),
                },
            ),
        ];
        for other in others {
            assert_ne!(other, base);
        }
        // A subject that looks like the anonymous scope is still a subject.
        assert_ne!(
            fingerprint(
                &Caller::Subject("anonymous".into()),
                user,
                &create(user, "a@x.io", 1)
            ),
            fingerprint(&Caller::Anonymous, user, &create(user, "a@x.io", 1)),
        );
        assert_eq!(base.len(), 64);
    }
}
