//! Who is calling, and the access rules of the public contract: sign-up is open; users read
//! and change only their own account; `admin` may do everything; `auditor` reads the log
//! with personal data, `analytics` without it.

use std::collections::BTreeSet;
use uuid::Uuid;

/// A role a token or API key may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessRole {
    Admin,
    Auditor,
    Analytics,
}

impl AccessRole {
    /// Parses a role name as written in tokens and key files.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "auditor" => Some(Self::Auditor),
            "analytics" => Some(Self::Analytics),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::Analytics => "analytics",
        }
    }
}

/// Rate-limit tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    #[default]
    Standard,
    Premium,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// The token's `sub` (a user id for end users) or the API key's name; none when anonymous.
    pub subject: Option<String>,
    pub roles: BTreeSet<AccessRole>,
    pub tier: Tier,
}

/// How much of the log a caller may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAccess {
    /// Every field.
    Full,
    /// Personal data left out.
    WithoutPersonalData,
}

/// Payload fields that hold personal data, left out for `analytics`.
pub const PERSONAL_FIELDS: [&str; 6] = [
    "email",
    "displayName",
    "bio",
    "avatarUrl",
    "oldEmail",
    "newEmail",
];

impl Principal {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn is_authenticated(&self) -> bool {
        self.subject.is_some()
    }

    pub fn has(&self, role: AccessRole) -> bool {
        self.roles.contains(&role)
    }

    pub fn is_admin(&self) -> bool {
        self.has(AccessRole::Admin)
    }

    /// Whether the caller may read or change user `id`: its owner or an admin.
    pub fn may_access_user(&self, id: Uuid) -> bool {
        self.is_admin()
            || self
                .subject
                .as_deref()
                .and_then(|s| Uuid::parse_str(s).ok())
                == Some(id)
    }

    /// What the caller may read of the log, if anything.
    pub fn log_access(&self) -> Option<LogAccess> {
        if self.is_admin() || self.has(AccessRole::Auditor) {
            Some(LogAccess::Full)
        } else if self.has(AccessRole::Analytics) {
            Some(LogAccess::WithoutPersonalData)
        } else {
            None
        }
    }
}

/// Removes personal fields, plain or sealed (`envelope::SEALED`), from an event payload.
pub fn redact_payload(payload: &serde_json::Value) -> serde_json::Value {
    match payload {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    !PERSONAL_FIELDS.contains(&k.as_str()) && k.as_str() != crate::envelope::SEALED
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(subject: &str, roles: &[AccessRole]) -> Principal {
        Principal {
            subject: Some(subject.to_owned()),
            roles: roles.iter().copied().collect(),
            tier: Tier::Standard,
        }
    }

    #[test]
    fn a_user_may_access_only_their_own_account() {
        let me = Uuid::now_v7();
        let other = Uuid::now_v7();
        let p = with(&me.to_string(), &[]);
        assert!(p.may_access_user(me));
        assert!(!p.may_access_user(other));
        assert!(!Principal::anonymous().may_access_user(me));
        assert!(with("ops", &[AccessRole::Admin]).may_access_user(other));
    }

    #[test]
    fn log_access_follows_roles() {
        assert_eq!(
            with("a", &[AccessRole::Auditor]).log_access(),
            Some(LogAccess::Full)
        );
        assert_eq!(
            with("a", &[AccessRole::Analytics]).log_access(),
            Some(LogAccess::WithoutPersonalData)
        );
        assert_eq!(with("a", &[]).log_access(), None);
        assert_eq!(Principal::anonymous().log_access(), None);
    }

    #[test]
    fn redaction_removes_every_personal_field() {
        let payload = serde_json::json!({
            "userId": "u", "email": "a@b.co", "displayName": "A", "bio": "b",
            "avatarUrl": "https://x.io", "oldEmail": "o@b.co", "newEmail": "n@b.co",
            "occurredAt": "t"
        });
        let r = redact_payload(&payload);
        assert_eq!(r, serde_json::json!({"userId": "u", "occurredAt": "t"}));
    }
}
