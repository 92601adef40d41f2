//! `POST /graphql`: only JSON content types; the caller authenticated and rate limited
//! before anything runs; one operation per request, within the body limit and deadlines and
//! the document limits; every error with its `extensions.code`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pcf_adapters::errors;
use pcf_command::CommandContext;
use pcf_domain::auth::Principal;
use pcf_domain::ErrorCode;
use std::time::Instant;

use super::limits::Known;
use super::ratelimit::Decision;
use super::respond::{client_address, new_correlation_id, rate_limited, request_error};
use super::state::HttpState;

/// Authenticates and rate-limits; the error is the response to send.
async fn admit(
    state: &HttpState,
    headers: &HeaderMap,
    client: &str,
) -> Result<Principal, (Response, &'static str)> {
    let principal = match state.authenticator.authenticate(headers) {
        Ok(p) => p,
        Err(e) => {
            // Counted, so that a flood of bad credentials is answered 429 like any other.
            if let Decision::Limited { retry_after } =
                state.limiter.refused_credentials(client).await
            {
                return Err((rate_limited(retry_after), "rate_limited"));
            }
            tracing::info!(reason = %e, "credentials refused");
            let mut response = request_error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                "the credentials are not valid",
            );
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return Err((response, "unauthenticated"));
        }
    };
    if let Decision::Limited { retry_after } = state.limiter.check(&principal, client).await {
        return Err((rate_limited(retry_after), "rate_limited"));
    }
    Ok(principal)
}

/// Whether a request's `Content-Type` is one a GraphQL request over HTTP may have. Only
/// JSON runs: a browser sends a cross-site form or `text/plain` without asking the server
/// first (a "simple request"), so accepting those would let any page sign people up.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/graphql-response+json")
}

pub async fn graphql(State(state): State<HttpState>, req: Request) -> Response {
    let started = Instant::now();
    let client = client_address(&req, &state.trusted_proxies);
    let (parts, body) = req.into_parts();
    // Set once the request's document is known: the operation it runs.
    let mut operation = None;
    let (response, outcome) = if !json_content_type(&parts.headers) {
        (
            request_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "send the request as JSON (content-type: application/json)",
            ),
            "unsupported_media_type",
        )
    } else {
        match admit(&state, &parts.headers, &client).await {
            Ok(principal) => execute(&state, principal, parts.headers, body, &mut operation).await,
            Err(refused) => refused,
        }
    };
    let elapsed = started.elapsed();
    state.metrics.http_request("/graphql", outcome, elapsed);
    if let Some(operation) = operation {
        state.metrics.graphql_operation(operation, outcome, elapsed);
    }
    response
}

/// What a request ends as, besides its response: the outcome label of the metrics.
type Answer = (Response, &'static str);

async fn execute(
    state: &HttpState,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
    operation: &mut Option<&'static str>,
) -> Answer {
    let body = match read_body(state, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let request = match decode(&body) {
        Ok(request) => request,
        Err(message) => {
            return (
                request_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
                "bad_request",
            )
        }
    };
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_correlation_id);
    let request = request
        .data(CommandContext {
            correlation_id: Some(correlation_id.clone()),
            actor: None,
        })
        .data(principal);
    let (mut response, known) = match run(state, request, operation).await {
        Ok(ran) => ran,
        Err(refused) => return refused,
    };
    let rejected = give_codes(&mut response, known.as_deref());
    let (status, outcome) = if rejected {
        (StatusCode::BAD_REQUEST, "bad_request")
    } else if response.errors.is_empty() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::OK, "error")
    };
    let mut http = (status, Json(response)).into_response();
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        http.headers_mut().insert("x-correlation-id", v);
    }
    (http, outcome)
}

/// The body, within the size limit and the time it may take to arrive.
async fn read_body(state: &HttpState, body: Body) -> Result<axum::body::Bytes, Answer> {
    let read = axum::body::to_bytes(body, state.body_limit);
    match tokio::time::timeout(state.body_timeout, read).await {
        Ok(Ok(b)) => Ok(b),
        Err(_) => Err((
            request_error(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                "the request body took too long to arrive",
            ),
            "body_timeout",
        )),
        Ok(Err(_)) => Err((
            request_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadRequest,
                "the request body is too large",
            ),
            "too_large",
        )),
    }
}

/// The body as one GraphQL request, or what is wrong with it. Decoded straight into the
/// request; only a body that does not decode is looked at again, to say what is wrong.
fn decode(body: &[u8]) -> Result<async_graphql::Request, &'static str> {
    let batched = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    let decoded = if batched {
        None
    } else {
        serde_json::from_slice::<async_graphql::Request>(body).ok()
    };
    decoded.ok_or_else(|| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            "the body is not valid JSON"
        } else if batched {
            "batched requests are not supported; send one operation per request"
        } else {
            "the body must be a GraphQL request: {\"query\": ..., \"variables\": ...}"
        }
    })
}

/// Runs the request within the document limits and the request deadline, on the schema
/// with the fast validation when its document is known to allow it. With the response comes
/// what is known of a cached document that ran through the full validation. `operation`
/// is set to the metrics label of the operation once the document is admitted (`other`
/// for a document too long to be cached).
async fn run(
    state: &HttpState,
    request: async_graphql::Request,
    operation: &mut Option<&'static str>,
) -> Result<(async_graphql::Response, Option<std::sync::Arc<Known>>), Answer> {
    let (request, known) = match state.schemas.documents.admit(request) {
        // Over PCF's document limits: refused as a whole, with the limit's own code.
        Err(refused) => {
            let response = async_graphql::Response::from_errors(vec![refused]);
            return Err((
                (StatusCode::BAD_REQUEST, Json(response)).into_response(),
                "bad_request",
            ));
        }
        Ok(admitted) => admitted,
    };
    *operation = Some(
        known
            .as_ref()
            .map_or(super::metrics::operation::OTHER, |k| {
                k.label(request.operation_name.as_deref())
            }),
    );
    let (schema, known) = match known {
        Some(k) if k.fast(&request) => (&state.schemas.http_fast, None),
        k => (&state.schemas.http, k),
    };
    let executed = schema.execute(request);
    match tokio::time::timeout(state.request_timeout, executed).await {
        Ok(response) => Ok((response, known)),
        Err(_) => {
            tracing::warn!("request timed out");
            Err((
                request_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the request took too long",
                ),
                "timeout",
            ))
        }
    }
}

/// Gives a code to the errors that came without one, and says whether the request was
/// refused as a whole. Errors without a code come from GraphQL itself, not from a resolver
/// (PCF's own limits refuse a request before it runs, with their codes): syntax, validation, arguments that do not
/// fit their types, and async-graphql's depth and complexity limits. They are the client's:
/// they get a code, and when nothing else came back, the request is answered 400.
fn give_codes(response: &mut async_graphql::Response, known: Option<&Known>) -> bool {
    let from_graphql = |e: &async_graphql::ServerError| !errors::has_code(e);
    let rejected = !response.errors.is_empty()
        && response.data == async_graphql::Value::Null
        && response.errors.iter().all(from_graphql);
    // A document that ran through the full validation without an error from GraphQL itself
    // may skip it from now on, for variables that certainly fit.
    if let Some(known) = known {
        if !response.errors.iter().any(from_graphql) {
            known.validated();
        }
    }
    for e in &mut response.errors {
        if !from_graphql(e) {
            continue;
        }
        // async-graphql's own limits say what they are only in their message.
        let code =
            if e.message == "Query is too complex." || e.message == "Query is nested too deep." {
                ErrorCode::QueryTooComplex
            } else {
                ErrorCode::BadRequest
            };
        errors::set_code(e, code);
    }
    rejected
}
