//! Public errors of the query side, with their stable codes.

use async_graphql::ErrorExtensions;
use pcf_domain::ports::PortError;
use pcf_domain::ErrorCode;

pub(crate) fn error(code: ErrorCode, message: &str) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code.as_str()))
}

pub(crate) fn invalid(field: &str, message: &str) -> async_graphql::Error {
    async_graphql::Error::new(format!("invalid {field}: {message}")).extend_with(|_, e| {
        e.set("code", ErrorCode::ValidationFailed.as_str());
        e.set("field", field);
    })
}

/// A failed read: logged here, answered without details.
pub(crate) fn unavailable(e: PortError) -> async_graphql::Error {
    match e {
        PortError::Unavailable(detail) => {
            tracing::error!(%detail, "read model unavailable");
            error(
                ErrorCode::Unavailable,
                "a read model is unavailable; try again",
            )
        }
        PortError::Internal(detail) => {
            tracing::error!(%detail, "read failed");
            error(ErrorCode::Internal, "internal error")
        }
    }
}
