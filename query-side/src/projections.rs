//! The `projections` query: operators' view of the read models.

use async_graphql::{Context, Object, SimpleObject};
use pcf_domain::ports::ProjectionMonitor;
use pcf_domain::ErrorCode;
use std::sync::Arc;

use crate::errors::{error, unavailable};
use crate::users::signed_in;

/// Where one projection stands.
#[derive(SimpleObject)]
#[graphql(name = "ProjectionStatus")]
pub struct ProjectionStatusObject {
    pub name: String,
    /// The generation readers use.
    pub generation: i64,
    /// The generation a rebuild is writing, if one runs.
    pub building: Option<i64>,
    /// Events not yet applied, if known.
    pub lag: Option<i64>,
}

/// Admin queries.
#[derive(Default)]
pub struct ProjectionQueries;

#[Object]
impl ProjectionQueries {
    /// Every projection's generation and lag (admin).
    async fn projections(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ProjectionStatusObject>> {
        let caller = signed_in(ctx)?;
        if !caller.is_admin() {
            return Err(error(
                ErrorCode::Forbidden,
                "projections need the admin role",
            ));
        }
        let monitor = ctx.data::<Arc<dyn ProjectionMonitor>>()?;
        let states = monitor.projections().await.map_err(unavailable)?;
        Ok(states
            .into_iter()
            .map(|s| ProjectionStatusObject {
                name: s.name,
                generation: s.generation as i64,
                building: s.building.map(|b| b as i64),
                lag: s.lag,
            })
            .collect())
    }
}
