//! The `user` and `userByEmail` queries and the GraphQL `User` type.

use async_graphql::{Context, MergedObject, Object, ID};
use chrono::{DateTime, Utc};
use pcf_domain::ports::{EventLog, UserReader};
use pcf_domain::{Email, ErrorCode, UserView};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::errors::{error, unavailable};
use crate::events::EventQueries;

/// What the resolvers read from, put into the schema's data by the binary.
#[derive(Clone)]
pub struct ReadModels {
    pub users: Arc<dyn UserReader>,
    pub log: Arc<dyn EventLog>,
    /// How long `minVersion` waits for the view before answering `STALE_READ`.
    pub consistency_timeout: Duration,
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
        let Ok(id) = Uuid::parse_str(id.as_str()) else {
            return Ok(None);
        };
        let Some(min) = min_version.filter(|v| *v > 0) else {
            let view = models.users.user(id).await.map_err(unavailable)?;
            return Ok(live(view));
        };
        let deadline = Instant::now() + models.consistency_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let view = models.users.user(id).await.map_err(unavailable)?;
            if view.as_ref().is_some_and(|v| v.version >= min as u64) {
                return Ok(live(view));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(error(
                    ErrorCode::StaleRead,
                    "the view has not caught up with minVersion yet; try again",
                ));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// A user by email address (compared case-insensitively).
    async fn user_by_email(
        &self,
        ctx: &Context<'_>,
        email: String,
    ) -> async_graphql::Result<Option<UserObject>> {
        let models = ctx.data::<ReadModels>()?;
        let Ok(email) = Email::parse(&email) else {
            return Ok(None);
        };
        let view = models
            .users
            .user_by_email(&email)
            .await
            .map_err(unavailable)?;
        Ok(live(view))
    }
}

fn live(view: Option<UserView>) -> Option<UserObject> {
    view.filter(|v| !v.deleted).map(UserObject)
}

/// Every query of the public contract.
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(UserQueries, EventQueries);
