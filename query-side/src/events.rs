//! The `events` query: the audit trail, in commit order, paginated by position.

use async_graphql::connection::Connection;
use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::{Context, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use pcf_domain::auth::{redact_payload, LogAccess, Principal};
use pcf_domain::ports::{LogQuery, PortError, UserReader};
use pcf_domain::UserView;
use pcf_domain::{EventEnvelope, Position};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

use crate::errors::{invalid, unavailable};
use crate::paging::Page;
use crate::subscriptions::require_log_access;
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
}

/// One event of the log, as in the event envelope.
pub struct EventObject(pub EventEnvelope);

impl EventObject {
    /// The event as a reader with `access` sees it. Without personal data (`analytics`):
    /// no personal payload fields, and no command id, which would let its holder ask for
    /// the command's result (nor the causation id, which is the command id today).
    pub fn for_reader(mut event: EventEnvelope, access: LogAccess) -> Self {
        if access == LogAccess::WithoutPersonalData {
            event.payload = redact_payload(&event.payload);
            event.metadata.command_id = None;
            event.metadata.causation_id = None;
        }
        Self(event)
    }
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
        let access = require_log_access(&caller)?;
        let page = Page::<Position>::new(first, after, MAX_PAGE)?;
        let (aggregate_id, types) = log_filter(aggregate_id, types)?;
        let query = LogQuery {
            after: page.after,
            aggregate_id,
            types,
            limit: page.limit(),
        };
        let events = models.log.read(&query).await.map_err(unavailable)?;
        Ok(page.connection(
            events,
            |e| e.position,
            |e| EventObject::for_reader(e, access),
        ))
    }
}
