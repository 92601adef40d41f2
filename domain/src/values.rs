//! Value types that can only hold valid values. Each `parse` enforces one profile rule of the
//! public contract and names the offending field in its error.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a value was refused; `field` is the GraphQL argument name clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    pub field: &'static str,
    pub reason: String,
}

impl ValueError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

const MAX_EMAIL_LEN: usize = 254;
const MAX_LOCAL_LEN: usize = 64;
const MAX_DISPLAY_NAME: usize = 100;
const MAX_BIO: usize = 2000;
const MAX_AVATAR_URL: usize = 2048;

/// An email address, trimmed and lower-cased so that comparisons are case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses and normalises an address: one `@`, a non-empty local part of at most 64
    /// characters, a dotted domain of letters, digits and hyphens, no spaces or control
    /// characters, at most 254 characters in all.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "email";
        let s = raw.trim().to_lowercase();
        if s.is_empty() {
            return Err(ValueError::new(field, "must not be empty"));
        }
        if s.chars().count() > MAX_EMAIL_LEN {
            return Err(ValueError::new(field, "must be at most 254 characters"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ValueError::new(
                field,
                "must not contain spaces or control characters",
            ));
        }
        let (local, domain) = match s.split_once('@') {
            Some((l, d)) if !d.contains('@') => (l, d),
            _ => return Err(ValueError::new(field, "must contain exactly one '@'")),
        };
        if local.is_empty() || local.chars().count() > MAX_LOCAL_LEN {
            return Err(ValueError::new(
                field,
                "the part before '@' must be 1 to 64 characters",
            ));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(ValueError::new(field, "the part before '@' is malformed"));
        }
        let local_ok = local
            .chars()
            .all(|c| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
        if !local_ok {
            return Err(ValueError::new(
                field,
                "the part before '@' has a character that is not allowed",
            ));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err(ValueError::new(field, "the domain must contain a dot"));
        }
        for label in &labels {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-');
            if !ok {
                return Err(ValueError::new(field, "the domain is malformed"));
            }
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A display name: 1–100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "displayName";
        let s = raw.trim();
        let len = s.chars().count();
        if len == 0 {
            return Err(ValueError::new(field, "must not be empty"));
        }
        if len > MAX_DISPLAY_NAME {
            return Err(ValueError::new(field, "must be at most 100 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(ValueError::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A biography of at most 2000 characters; line breaks and tabs are allowed, other control
/// characters are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bio(String);

impl Bio {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "bio";
        if raw.chars().count() > MAX_BIO {
            return Err(ValueError::new(field, "must be at most 2000 characters"));
        }
        if raw
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValueError::new(
                field,
                "must not contain control characters other than line breaks and tabs",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An avatar address: an `https` URL with a host, at most 2048 characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AvatarUrl(String);

impl AvatarUrl {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "avatarUrl";
        let s = raw.trim();
        if s.chars().count() > MAX_AVATAR_URL {
            return Err(ValueError::new(field, "must be at most 2048 characters"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ValueError::new(
                field,
                "must not contain spaces or control characters",
            ));
        }
        let rest = match s.get(..8) {
            Some(scheme) if scheme.eq_ignore_ascii_case("https://") => &s[8..],
            _ => return Err(ValueError::new(field, "must be an https URL")),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = host.split(':').next().unwrap_or("");
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ValueError::new(field, "must name a host"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalised_to_lower_case_and_trimmed() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
    }

    #[test]
    fn malformed_emails_are_refused_naming_the_field() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@@example.com",
            "ada@exa mple.com",
            "ada@-example.com",
            "ada@example..com",
            ".ada@example.com",
            "ada\u{0}@example.com",
            "'; DROP TABLE events;--@x.com",
        ] {
            let err = Email::parse(bad).expect_err(bad);
            assert_eq!(err.field, "email", "{bad}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long_local).is_err());
        let long = format!("a@{}.com", "b".repeat(260));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn display_name_is_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"é".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert_eq!(
            DisplayName::parse("Ada\u{7}").unwrap_err().field,
            "displayName"
        );
    }

    #[test]
    fn bio_is_bounded_and_allows_line_breaks() {
        assert!(Bio::parse("line one\nline two\ttab").is_ok());
        assert!(Bio::parse(&"x".repeat(2000)).is_ok());
        assert!(Bio::parse(&"x".repeat(2001)).is_err());
        assert_eq!(Bio::parse("bell\u{7}").unwrap_err().field, "bio");
    }

    #[test]
    fn avatar_url_must_be_https_with_a_host() {
        assert!(AvatarUrl::parse("https://cdn.example.com/a.png").is_ok());
        assert!(AvatarUrl::parse("HTTPS://cdn.example.com").is_ok());
        for bad in [
            "http://cdn.example.com/a.png",
            "https://",
            "https:///path",
            "ftp://x.com",
            "javascript:alert(1)",
            "https://exa mple.com",
        ] {
            assert_eq!(
                AvatarUrl::parse(bad).unwrap_err().field,
                "avatarUrl",
                "{bad}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(AvatarUrl::parse(&long).is_err());
    }
}
