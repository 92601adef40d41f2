//! The public errors: every error a client sees carries one of the stable codes of
//! [`ErrorCode`] in `extensions.code` (and `extensions.field` for a validation failure).
//! The command side, the query side and the HTTP layer all build their errors here, so a
//! code becomes an extension in one place; internal details are logged by the caller,
//! never put in a message.

use async_graphql::{ErrorExtensionValues, ErrorExtensions, Pos, ServerError};
use pcf_domain::ports::PortError;
use pcf_domain::ErrorCode;

/// A resolver's error with `code`.
pub fn error(code: ErrorCode, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code.as_str()))
}

/// `VALIDATION_FAILED` for `field`, saying what is wrong with it.
pub fn invalid(field: &str, reason: &str) -> async_graphql::Error {
    async_graphql::Error::new(format!("invalid {field}: {reason}")).extend_with(|_, e| {
        e.set("code", ErrorCode::ValidationFailed.as_str());
        e.set("field", field);
    })
}

/// A request-level error (refused before any resolver ran) with `code`.
pub fn server_error(code: ErrorCode, message: impl Into<String>, pos: Option<Pos>) -> ServerError {
    let mut error = ServerError::new(message, pos);
    error.extensions = Some(extensions(code));
    error
}

/// `extensions` holding `code`.
pub fn extensions(code: ErrorCode) -> ErrorExtensionValues {
    let mut ext = ErrorExtensionValues::default();
    ext.set("code", code.as_str());
    ext
}

/// Whether the error already has its code.
pub fn has_code(error: &ServerError) -> bool {
    error
        .extensions
        .as_ref()
        .is_some_and(|ext| ext.get("code").is_some())
}

/// Gives `code` to an error that came without one.
pub fn set_code(error: &mut ServerError, code: ErrorCode) {
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", code.as_str());
}

/// A failed read or write of a dependency: logged here with its detail, answered without it.
pub fn dependency(e: PortError, what: &str) -> async_graphql::Error {
    match e {
        PortError::Unavailable(detail) => {
            tracing::error!(%detail, "{what} unavailable");
            error(
                ErrorCode::Unavailable,
                format!("{what} is unavailable; try again"),
            )
        }
        PortError::Internal(detail) => {
            tracing::error!(%detail, "{what} failed");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// The body of a response refused as a whole: `{"errors": [{message, extensions: {code}}]}`,
/// the shape GraphQL responses have.
pub fn refusal_body(code: ErrorCode, message: &str) -> serde_json::Value {
    serde_json::json!({ "errors": [{ "message": message, "extensions": { "code": code.as_str() } }] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_error_carries_its_code() {
        let e = error(ErrorCode::NotFound, "no such user");
        let ext = e.extensions.expect("extensions");
        assert_eq!(
            ext.get("code"),
            Some(&async_graphql::Value::from("NOT_FOUND"))
        );
        let e = invalid("email", "not an address");
        let ext = e.extensions.expect("extensions");
        assert_eq!(
            ext.get("code"),
            Some(&async_graphql::Value::from("VALIDATION_FAILED"))
        );
        assert_eq!(ext.get("field"), Some(&async_graphql::Value::from("email")));
        let mut s = ServerError::new("syntax", None);
        assert!(!has_code(&s));
        set_code(&mut s, ErrorCode::BadRequest);
        assert!(has_code(&s));
        assert!(has_code(&server_error(
            ErrorCode::RateLimited,
            "slow down",
            None
        )));
        assert_eq!(
            refusal_body(ErrorCode::RateLimited, "slow down")["errors"][0]["extensions"]["code"],
            "RATE_LIMITED"
        );
    }

    #[test]
    fn a_dependency_failure_says_nothing_of_its_detail() {
        let e = dependency(
            PortError::Internal("password authentication failed for user x".into()),
            "a read model",
        );
        assert_eq!(e.message, "internal error");
        let e = dependency(PortError::Unavailable("connection refused".into()), "Redis");
        assert!(!e.message.contains("refused"), "{}", e.message);
    }
}
