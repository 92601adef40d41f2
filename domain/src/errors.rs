//! Domain errors, one variant per rule, and the stable codes clients receive.

use crate::values::ValueError;

/// The stable `extensions.code` values of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    ValidationFailed,
    EmailTaken,
    NotFound,
    Conflict,
    /// A `commandId` that was used before by another caller, or for another command,
    /// target or input.
    IdempotencyKeyReused,
    AccountDeleted,
    Unauthenticated,
    Forbidden,
    RateLimited,
    StaleRead,
    QueryTooComplex,
    Unavailable,
    BadRequest,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationFailed => "VALIDATION_FAILED",
            Self::EmailTaken => "EMAIL_TAKEN",
            Self::NotFound => "NOT_FOUND",
            Self::Conflict => "CONFLICT",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::AccountDeleted => "ACCOUNT_DELETED",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::RateLimited => "RATE_LIMITED",
            Self::StaleRead => "STALE_READ",
            Self::QueryTooComplex => "QUERY_TOO_COMPLEX",
            Self::Unavailable => "UNAVAILABLE",
            Self::BadRequest => "BAD_REQUEST",
            Self::Internal => "INTERNAL",
        }
    }
}

/// Why the `User` aggregate refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("invalid {}: {}", .0.field, .0.reason)]
    Validation(#[from] ValueError),
    #[error("the email address is already in use")]
    EmailTaken,
    #[error("no such user")]
    NotFound,
    #[error("the user already exists")]
    AlreadyExists,
    #[error("expected version {expected} but the user is at version {actual}")]
    Conflict { expected: u64, actual: u64 },
    #[error("the account has been deleted")]
    AccountDeleted,
    #[error("the email directory could not be consulted: {0}")]
    Directory(String),
}

impl UserError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Validation(_) => ErrorCode::ValidationFailed,
            Self::EmailTaken => ErrorCode::EmailTaken,
            Self::NotFound => ErrorCode::NotFound,
            Self::AlreadyExists | Self::Conflict { .. } => ErrorCode::Conflict,
            Self::AccountDeleted => ErrorCode::AccountDeleted,
            Self::Directory(_) => ErrorCode::Unavailable,
        }
    }
}
