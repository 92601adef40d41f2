//! The GraphQL `SubscriptionRoot`: the event stream (replay from a position, then live) and a
//! user's changes.

use async_graphql::{Context, Subscription, ID};
use futures::stream::{BoxStream, StreamExt};
use pcf_domain::auth::{LogAccess, Principal};
use pcf_domain::{ErrorCode, Position};
use std::sync::Arc;
use uuid::Uuid;

use crate::errors::error;
use crate::events::{log_filter, EventObject};
use crate::live::{LiveFilter, LiveLog};
use crate::paging::cursor;
use crate::users::{ReadModels, UserObject, Waited};

/// Live events and user changes.
#[derive(Default)]
pub struct SubscriptionRoot;

fn principal(ctx: &Context<'_>) -> Principal {
    ctx.data_opt::<Principal>().cloned().unwrap_or_default()
}

/// The caller's access to the log, or the error to answer.
pub(crate) fn require_log_access(p: &Principal) -> async_graphql::Result<LogAccess> {
    match p.log_access() {
        Some(access) => Ok(access),
        None if !p.is_authenticated() => Err(error(
            ErrorCode::Unauthenticated,
            "sign in to read the event log",
        )),
        None => Err(error(
            ErrorCode::Forbidden,
            "reading the event log needs the auditor, analytics or admin role",
        )),
    }
}

#[Subscription]
impl SubscriptionRoot {
    /// Every event after `after` (a position; from now on when absent), optionally of one
    /// user and of some types: first replayed from the event store, then live, in commit
    /// order. Reconnect with the last position seen to miss nothing.
    async fn events(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        aggregate_id: Option<ID>,
        types: Option<Vec<String>>,
    ) -> async_graphql::Result<BoxStream<'static, EventObject>> {
        let access = require_log_access(&principal(ctx))?;
        let live = ctx.data::<Arc<LiveLog>>()?;
        let after = cursor::<Position>(after, "not a position returned by this API")?;
        let (aggregate_id, types) = log_filter(aggregate_id, types)?;
        let filter = LiveFilter {
            aggregate_id,
            types,
        };
        Ok(live
            .stream(after, filter)
            .map(move |e| EventObject::for_reader(e, access))
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
async fn wait_for_view(models: &ReadModels, id: Uuid, version: u64) -> Option<UserObject> {
    match models.user_at_least(id, version).await.ok()? {
        Waited::Reached(view) | Waited::Stale(view) => view.map(UserObject),
    }
}
