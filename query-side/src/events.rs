//! The `events` query: the audit trail, in commit order, paginated by position.

use async_graphql::connection::Connection;
use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::{Context, ErrorExtensions, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use pcf_adapters::keys::{Opener, Unopened};
use pcf_domain::auth::{redact_payload, LogAccess, Principal};
use pcf_domain::ports::{LogQuery, PortError, UserReader};
use pcf_domain::{ErrorCode, UserView};
use pcf_domain::{EventEnvelope, Position};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

use crate::errors::{error, invalid, unavailable};
use crate::paging::Page;
use crate::users::{ReadModels, UserObject};

const MAX_PAGE: i32 = 500;

/// Who and what caused an event.
#[derive(SimpleObject)]
#[graphql(name = "EventMetadata")]
pub struct MetadataObject {
    correlation_id: Option<String>,
    causation_id: Option<String>,
    command_id: Option<String>,
    actor: Option<String>,
    /// The W3C trace context of the command that caused the event, when it was traced.
    traceparent: Option<String>,
}

/// One event of the log, as in the event envelope.
pub struct EventObject(pub EventEnvelope);

impl EventObject {
    /// The event, read with `access` and opened if that needs it (`open_for`), as the reader
    /// sees it. Without personal data (`analytics`): no personal payload fields, plain or
    /// sealed (an erased marker stays), and no command id, which would let its holder ask for
    /// the command's result (nor the causation id, which is the command id today).
    fn for_reader(mut event: EventEnvelope, access: LogAccess) -> Self {
        if access == LogAccess::WithoutPersonalData {
            event.payload = redact_payload(&event.payload);
            event.metadata.command_id = None;
            event.metadata.causation_id = None;
        }
        Self(event)
    }
}

/// How `caller` may read the log when asking for the events of `aggregate_id` (every user's
/// when `None`): `admin` and `auditor` with personal data, and so a user reading their own
/// events; `analytics` without personal data. Anyone else is refused, before the arguments
/// are checked.
pub(crate) fn log_access(
    caller: &Principal,
    aggregate_id: Option<&ID>,
) -> async_graphql::Result<LogAccess> {
    let own = aggregate_id
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
        .is_some_and(|id| caller.may_access_user(id));
    match caller.log_access() {
        Some(LogAccess::Full) => Ok(LogAccess::Full),
        _ if own => Ok(LogAccess::Full),
        Some(access) => Ok(access),
        None if !caller.is_authenticated() => Err(error(
            ErrorCode::Unauthenticated,
            "sign in to read the event log",
        )),
        None => Err(error(
            ErrorCode::Forbidden,
            "reading the event log needs the auditor, analytics or admin role; \
             a user may read their own events (aggregateId: their id)",
        )),
    }
}

/// Opens the personal data of `events` in place: all of them at once, one batch of key
/// look-ups (never one per event). Returns the events that did not open. A reader without
/// personal data gets its events opened too, so that a deleted account's events read as
/// erased for every reader alike; its fields are then left out (`EventObject::for_reader`),
/// and an event that does not open is no error for it: nothing personal is shown either way.
pub(crate) async fn open_for(
    access: LogAccess,
    events: &mut [EventEnvelope],
    opener: &dyn Opener,
) -> Result<Vec<Unopened>, PortError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let unopened = opener.open(events).await?;
    match access {
        LogAccess::Full => Ok(unopened),
        LogAccess::WithoutPersonalData => Ok(Vec::new()),
    }
}

/// `events`, passed through `open_for` (which found `unopened`), as a reader with `access`
/// sees them, in order: an event that did not open is an `INTERNAL` error in its place
/// (logged with its id; its sealed payload is never shown).
pub(crate) fn as_read(
    events: Vec<EventEnvelope>,
    unopened: Vec<Unopened>,
    access: LogAccess,
) -> Vec<async_graphql::Result<EventObject>> {
    let mut unopened: HashMap<Uuid, Unopened> =
        unopened.into_iter().map(|u| (u.event_id, u)).collect();
    events
        .into_iter()
        .map(|event| match unopened.remove(&event.event_id) {
            Some(why) => Err(not_opened(&event, &why)),
            None => Ok(EventObject::for_reader(event, access)),
        })
        .collect()
}

/// `unreadable`, for an event that did not open; the reason is logged only.
fn not_opened(event: &EventEnvelope, why: &Unopened) -> async_graphql::Error {
    tracing::error!(
        event_id = %event.event_id,
        reason = %why.reason,
        "an event read from the log did not open; answered INTERNAL"
    );
    unreadable(event)
}

/// The public error for an event whose personal data cannot be read: `INTERNAL`, with the
/// event's id and position (public fields of the event) so the reader knows which one it
/// misses.
pub(crate) fn unreadable(event: &EventEnvelope) -> async_graphql::Error {
    let (event_id, position) = (event.event_id.to_string(), event.position.to_string());
    error(
        ErrorCode::Internal,
        "internal error: an event could not be read",
    )
    .extend_with(move |_, e| {
        e.set("eventId", event_id.as_str());
        e.set("position", position.as_str());
    })
}

/// A failed read of the data keys: logged, answered without details.
pub(crate) fn keys_unavailable(e: PortError) -> async_graphql::Error {
    pcf_adapters::errors::dependency(e, "the data keys")
}

#[Object(name = "Event")]
impl EventObject {
    async fn event_id(&self) -> ID {
        ID(self.0.event_id.to_string())
    }
    async fn aggregate_type(&self) -> &str {
        &self.0.aggregate_type
    }
    async fn aggregate_id(&self) -> ID {
        ID(self.0.aggregate_id.to_string())
    }
    async fn sequence(&self) -> i64 {
        self.0.sequence as i64
    }
    /// Opaque; orders like the log.
    async fn position(&self) -> String {
        self.0.position.to_string()
    }
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn event_version(&self) -> &str {
        &self.0.event_version
    }
    async fn recorded_at(&self) -> DateTime<Utc> {
        self.0.recorded_at
    }
    async fn metadata(&self) -> MetadataObject {
        let m = &self.0.metadata;
        MetadataObject {
            correlation_id: m.correlation_id.clone(),
            causation_id: m.causation_id.clone(),
            command_id: m.command_id.clone(),
            actor: m.actor.clone(),
            traceparent: m.traceparent.clone(),
        }
    }
    async fn payload(&self) -> Json<serde_json::Value> {
        Json(self.0.payload.clone())
    }

    /// The event's user as it is now (null once deleted, or when personal data is not
    /// readable by the caller). Loaded in batches across the page.
    async fn user(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<UserObject>> {
        let caller = ctx.data_opt::<Principal>().cloned().unwrap_or_default();
        if caller.log_access() != Some(LogAccess::Full)
            && !caller.may_access_user(self.0.aggregate_id)
        {
            return Ok(None);
        }
        let loader = ctx.data::<DataLoader<UserLoader>>()?;
        let view = loader
            .load_one(self.0.aggregate_id)
            .await
            .map_err(|e| unavailable((*e).clone()))?;
        Ok(view.filter(|v| !v.deleted).map(UserObject))
    }
}

/// Batches user look-ups of one request into one read.
pub struct UserLoader(pub Arc<dyn UserReader>);

impl Loader<Uuid> for UserLoader {
    type Value = UserView;
    type Error = Arc<PortError>;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, UserView>, Arc<PortError>> {
        let views = self.0.users(keys).await.map_err(Arc::new)?;
        Ok(views.into_iter().map(|v| (v.id, v)).collect())
    }
}

/// The `aggregateId` and `types` arguments of the log queries, checked.
pub(crate) fn log_filter(
    aggregate_id: Option<ID>,
    types: Option<Vec<String>>,
) -> async_graphql::Result<(Option<Uuid>, Vec<String>)> {
    let aggregate_id = aggregate_id
        .map(|id| Uuid::parse_str(id.as_str()))
        .transpose()
        .map_err(|_| invalid("aggregateId", "not a user id"))?;
    let types = types.unwrap_or_default();
    if types.len() > 20
        || types
            .iter()
            .any(|t| t.is_empty() || t.len() > 100 || t.chars().any(char::is_control))
    {
        return Err(invalid(
            "types",
            "at most 20 event type names of 1 to 100 characters, without control characters",
        ));
    }
    Ok((aggregate_id, types))
}

/// Audit queries.
#[derive(Default)]
pub struct EventQueries;

#[Object]
impl EventQueries {
    /// Events in commit order, after the cursor `after` (a position), optionally of one user
    /// and of some types.
    async fn events(
        &self,
        ctx: &Context<'_>,
        aggregate_id: Option<ID>,
        after: Option<String>,
        #[graphql(default = 50)] first: i32,
        types: Option<Vec<String>>,
    ) -> async_graphql::Result<Connection<String, EventObject>> {
        let models = ctx.data::<ReadModels>()?;
        let caller = ctx.data_opt::<Principal>().cloned().unwrap_or_default();
        let access = log_access(&caller, aggregate_id.as_ref())?;
        let page = Page::<Position>::new(first, after, MAX_PAGE)?;
        let (aggregate_id, types) = log_filter(aggregate_id, types)?;
        let query = LogQuery {
            after: page.after,
            aggregate_id,
            types,
            limit: page.limit(),
        };
        let events = models.log.read(&query).await.map_err(unavailable)?;
        // Only the page's events are opened (not the one read to tell whether more follow),
        // together; one that does not open fails the whole request.
        let (mut events, has_next) = page.split(events);
        let unopened = open_for(access, &mut events, &*models.opener)
            .await
            .map_err(keys_unavailable)?;
        let events = as_read(events, unopened, access)
            .into_iter()
            .collect::<async_graphql::Result<Vec<_>>>()?;
        Ok(page.edges(events, has_next, |e| e.0.position, |e| e))
    }
}

#[cfg(test)]
mod tests;
