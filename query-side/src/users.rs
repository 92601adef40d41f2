//! The `user` and `userByEmail` queries and the GraphQL `User` type.

use async_graphql::connection::Connection;
use async_graphql::{Context, InputObject, MergedObject, Object, ID};
use chrono::{DateTime, Utc};
use pcf_adapters::keys::Opener;
use pcf_domain::auth::Principal;
use pcf_domain::ports::UserFilter;
use pcf_domain::ports::{EventLog, PortError, UserReader};
use pcf_domain::{Email, ErrorCode, UserView};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::errors::{error, invalid, unavailable};
use crate::events::EventQueries;
use crate::paging::Page;
use crate::projections::ProjectionQueries;

/// What the resolvers read from, put into the schema's data by the binary.
#[derive(Clone)]
pub struct ReadModels {
    pub users: Arc<dyn UserReader>,
    pub log: Arc<dyn EventLog>,
    /// Opens the personal data of the log's events for the readers allowed to see it.
    pub opener: Arc<dyn Opener>,
    /// How long `minVersion` waits for the view before answering `STALE_READ`.
    pub consistency_timeout: Duration,
}

/// What a bounded wait for a user's version found.
pub enum Waited {
    /// The view has the version (or a later one).
    Reached(Option<UserView>),
    /// The wait ran out first; the newest view read.
    Stale(Option<UserView>),
}

impl ReadModels {
    /// The user's view once it has reached `version`, waiting at most `consistency_timeout`
    /// (read your writes: `minVersion`, and `userChanged` after each event). Reads again
    /// after a pause that doubles from 1 ms to at most 20 ms.
    #[tracing::instrument(level = "debug", name = "wait.min_version", skip(self))]
    pub async fn user_at_least(&self, id: Uuid, version: u64) -> Result<Waited, PortError> {
        let deadline = Instant::now() + self.consistency_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let view = self.users.user(id).await?;
            if view.as_ref().is_some_and(|v| v.version >= version) {
                return Ok(Waited::Reached(view));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Waited::Stale(view));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// A user account as readers see it.
#[derive(Clone)]
pub struct UserObject(pub UserView);

impl From<UserView> for UserObject {
    fn from(v: UserView) -> Self {
        Self(v)
    }
}

#[Object(name = "User")]
impl UserObject {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    /// Normalised (lower case).
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn display_name(&self) -> &str {
        &self.0.display_name
    }
    async fn bio(&self) -> Option<&str> {
        self.0.bio.as_deref()
    }
    async fn avatar_url(&self) -> Option<&str> {
        self.0.avatar_url.as_deref()
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// The sequence of the last event applied to this view.
    async fn version(&self) -> i64 {
        self.0.version as i64
    }
}

const MAX_USERS_PAGE: i32 = 100;

/// Which users `users` returns; all conditions must hold.
#[derive(InputObject, Default)]
#[graphql(name = "UserFilter")]
pub struct UserFilterInput {
    /// Exactly this email (compared case-insensitively).
    pub email: Option<String>,
    /// Display names containing this text, case-insensitively.
    pub display_name_contains: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

impl UserFilterInput {
    fn into_filter(self) -> async_graphql::Result<UserFilter> {
        let email = self
            .email
            .map(|e| Email::parse(&e).map(|e| e.as_str().to_owned()))
            .transpose()
            .map_err(|e| invalid("filter.email", &e.reason))?;
        if self
            .display_name_contains
            .as_ref()
            .is_some_and(|s| s.chars().count() > 100 || s.chars().any(char::is_control))
        {
            return Err(invalid(
                "filter.displayNameContains",
                "at most 100 characters, without control characters",
            ));
        }
        Ok(UserFilter {
            email,
            display_name_contains: self.display_name_contains,
            created_after: self.created_after,
            created_before: self.created_before,
        })
    }
}

/// User look-ups.
#[derive(Default)]
pub struct UserQueries;

#[Object]
impl UserQueries {
    /// A user by id. With `minVersion`, waits (bounded) until the view has caught up to that
    /// version, else answers `STALE_READ`.
    async fn user(
        &self,
        ctx: &Context<'_>,
        id: ID,
        min_version: Option<i64>,
    ) -> async_graphql::Result<Option<UserObject>> {
        let models = ctx.data::<ReadModels>()?;
        let caller = signed_in(ctx)?;
        // Someone else's account reads exactly like one that does not exist.
        let Some(id) = Uuid::parse_str(id.as_str())
            .ok()
            .filter(|id| caller.may_access_user(*id))
        else {
            return Ok(None);
        };
        let Some(min) = min_version.filter(|v| *v > 0) else {
            let view = models.users.user(id).await.map_err(unavailable)?;
            return Ok(live(view));
        };
        match models
            .user_at_least(id, min as u64)
            .await
            .map_err(unavailable)?
        {
            Waited::Reached(view) => Ok(live(view)),
            Waited::Stale(_) => Err(error(
                ErrorCode::StaleRead,
                "the view has not caught up with minVersion yet; try again",
            )),
        }
    }

    /// Live users in creation order, a page at a time (keyset pagination on the id), from
    /// the read replicas in cluster mode.
    async fn users(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
        filter: Option<UserFilterInput>,
    ) -> async_graphql::Result<Connection<String, UserObject>> {
        let models = ctx.data::<ReadModels>()?;
        let caller = signed_in(ctx)?;
        if !caller.is_admin() {
            return Err(error(
                ErrorCode::Forbidden,
                "listing users needs the admin role",
            ));
        }
        let page = Page::<Uuid>::new(first, after, MAX_USERS_PAGE)?;
        let filter = filter
            .map(UserFilterInput::into_filter)
            .transpose()?
            .unwrap_or_default();
        let users = models
            .users
            .list(page.after, page.limit(), &filter)
            .await
            .map_err(unavailable)?;
        Ok(page.connection(users, |u| u.id, UserObject))
    }

    /// A user by email address (compared case-insensitively).
    async fn user_by_email(
        &self,
        ctx: &Context<'_>,
        email: String,
    ) -> async_graphql::Result<Option<UserObject>> {
        let models = ctx.data::<ReadModels>()?;
        let caller = signed_in(ctx)?;
        let Ok(email) = Email::parse(&email) else {
            return Ok(None);
        };
        let view = models
            .users
            .user_by_email(&email)
            .await
            .map_err(unavailable)?;
        Ok(live(view.filter(|v| caller.may_access_user(v.id))))
    }
}

/// The caller, who must be signed in.
pub(crate) fn signed_in(ctx: &Context<'_>) -> async_graphql::Result<Principal> {
    let caller = ctx.data_opt::<Principal>().cloned().unwrap_or_default();
    if caller.is_authenticated() {
        Ok(caller)
    } else {
        Err(error(ErrorCode::Unauthenticated, "sign in to read users"))
    }
}

fn live(view: Option<UserView>) -> Option<UserObject> {
    view.filter(|v| !v.deleted).map(UserObject)
}

/// Every query of the public contract.
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(UserQueries, EventQueries, ProjectionQueries);
