//! The GraphQL `SubscriptionRoot`: the event stream (replay from a position, then live) and a
//! user's changes.

use async_graphql::{Context, Subscription, ID};
use futures::stream::{self, BoxStream, StreamExt};
use pcf_adapters::keys::Opener;
use pcf_domain::auth::{LogAccess, Principal};
use pcf_domain::ports::PortError;
use pcf_domain::{ErrorCode, EventEnvelope, Position};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use crate::errors::error;
use crate::events::{as_read, log_access, log_filter, open_for, unreadable, EventObject};
use crate::live::{LiveFilter, LiveLog};
use crate::paging::cursor;
use crate::users::{ReadModels, UserObject, Waited};

/// Live events and user changes.
#[derive(Default)]
pub struct SubscriptionRoot;

fn principal(ctx: &Context<'_>) -> Principal {
    ctx.data_opt::<Principal>().cloned().unwrap_or_default()
}

#[Subscription]
impl SubscriptionRoot {
    /// Every event after `after` (a position; from now on when absent), optionally of one
    /// user and of some types: first replayed from the event store, then live, in commit
    /// order. Reconnect with the last position seen to miss nothing.
    //
    // An event whose personal data does not open comes as an error in its place (`INTERNAL`,
    // with its `eventId` and `position` in the extensions), and the stream goes on with the
    // next event: such an event stays unreadable, so a stream that ended there would end
    // again for every client that reconnects from its last position, and never get past it.
    // (A comment, not documentation: the schema's text stays as published.)
    async fn events(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        aggregate_id: Option<ID>,
        types: Option<Vec<String>>,
    ) -> async_graphql::Result<BoxStream<'static, async_graphql::Result<EventObject>>> {
        let access = log_access(&principal(ctx), aggregate_id.as_ref())?;
        let live = ctx.data::<Arc<LiveLog>>()?;
        let opener = ctx.data::<ReadModels>()?.opener.clone();
        let after = cursor::<Position>(after, "not a position returned by this API")?;
        let (aggregate_id, types) = log_filter(aggregate_id, types)?;
        let filter = LiveFilter {
            aggregate_id,
            types,
        };
        Ok(live
            .batches(after, filter)
            .then(move |batch| read_batch(batch, access, opener.clone()))
            .flat_map(stream::iter)
            .boxed())
    }

    /// The user's new state after each change, once the view has it. Ends when the account
    /// is deleted.
    async fn user_changed(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<BoxStream<'static, UserObject>> {
        let p = principal(ctx);
        if !p.is_authenticated() {
            return Err(error(
                ErrorCode::Unauthenticated,
                "sign in to follow a user",
            ));
        }
        let id = Uuid::parse_str(id.as_str())
            .ok()
            .filter(|id| p.may_access_user(*id))
            .ok_or_else(|| error(ErrorCode::NotFound, "no such user"))?;
        let live = ctx.data::<Arc<LiveLog>>()?;
        let models = ctx.data::<ReadModels>()?.clone();
        let filter = LiveFilter {
            aggregate_id: Some(id),
            types: Vec::new(),
        };
        let stream = live
            .stream(None, filter)
            .then(move |event| {
                let models = models.clone();
                async move { wait_for_view(&models, id, event.sequence).await }
            })
            .take_while(|view| {
                let go_on = view.as_ref().is_some_and(|v| !v.0.deleted);
                async move { go_on }
            })
            .filter_map(|view| async move { view });
        Ok(stream.boxed())
    }
}

/// The user's view once it has reached `version` (bounded wait; the newest one otherwise).
/// Each delivery is a trace of its own (`subscription.user_changed`, with the wait's reads).
#[tracing::instrument(level = "debug", name = "subscription.user_changed", skip(models))]
async fn wait_for_view(models: &ReadModels, id: Uuid, version: u64) -> Option<UserObject> {
    match models.user_at_least(id, version).await.ok()? {
        Waited::Reached(view) | Waited::Stale(view) => view.map(UserObject),
    }
}

/// A batch of the event stream as the reader sees it, opened at once. While the data keys
/// are unavailable, tries again (the stream waits, as it does while the log cannot be read):
/// the batch is already past the stream's position, so it must not be dropped. A failure
/// that trying again will not mend (a damaged key) makes each event of the batch an
/// `INTERNAL` error in its place, as an event that does not open is.
/// Each batch is a trace of its own (`subscription.events`, with the opening's key reads).
#[tracing::instrument(level = "debug", name = "subscription.events", skip_all, fields(events = events.len()))]
async fn read_batch(
    mut events: Vec<EventEnvelope>,
    access: LogAccess,
    opener: Arc<dyn Opener>,
) -> Vec<async_graphql::Result<EventObject>> {
    let mut pause = Duration::from_millis(100);
    loop {
        // Opening is idempotent: what opened (or was erased) before a failure stays so.
        match open_for(access, &mut events, &*opener).await {
            Ok(unopened) => return as_read(events, unopened, access),
            Err(PortError::Unavailable(detail)) => {
                tracing::warn!(%detail, "subscription could not read the data keys; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(PortError::Internal(detail)) => {
                tracing::error!(
                    %detail,
                    events = events.len(),
                    "subscription could not open personal data; its events answered INTERNAL"
                );
                return events.iter().map(|e| Err(unreadable(e))).collect();
            }
        }
    }
}
