//! The GraphQL schema PCF serves: the command side's mutations, the query side's queries and
//! subscriptions, with the configured limits.

use async_graphql::dataloader::DataLoader;
use async_graphql::Schema;
use pcf_command::{CommandService, MutationRoot};
use pcf_domain::ports::ProjectionMonitor;
use pcf_query::{LiveLog, QueryRoot, ReadModels, SubscriptionRoot, UserObject};
use std::sync::Arc;

use super::limits::DocumentLimits;
use super::ratelimit::{RateLimiter, WebSocketLimit};
use crate::config::{Config, Environment};

/// The GraphQL schema PCF serves.
pub type PcfSchema = Schema<QueryRoot, MutationRoot<UserObject>, SubscriptionRoot>;

/// The schemas of a server, with the configured limits.
pub struct Schemas {
    /// For websockets (and in-process callers): rate limits and document limits run as
    /// extensions.
    pub full: PcfSchema,
    /// For HTTP, where the handler has rate-limited the request and runs `documents`
    /// itself: no extensions, so that fields resolve without the extension chain.
    pub http: PcfSchema,
    /// As `http`, with async-graphql's fast validation: for requests whose document passed
    /// the full validation before and whose variables certainly fit it
    /// ([`super::limits::Known`]).
    pub http_fast: PcfSchema,
    pub documents: DocumentLimits,
}

/// Builds the schemas with the configured limits.
pub fn schemas(
    config: &Config,
    commands: Arc<CommandService>,
    models: ReadModels,
    live: Arc<LiveLog>,
    monitor: Arc<dyn ProjectionMonitor>,
    limiter: Arc<RateLimiter>,
) -> Schemas {
    let documents = DocumentLimits::new(config.max_aliases, config.max_complexity);
    let build = |extended: bool, mode: async_graphql::ValidationMode| {
        let mut builder = Schema::build(
            QueryRoot::default(),
            MutationRoot::<UserObject>::default(),
            SubscriptionRoot,
        )
        .data(commands.clone())
        .data(DataLoader::new(
            pcf_query::events::UserLoader(models.users.clone()),
            tokio::spawn,
        ))
        .data(models.clone())
        .data(live.clone())
        .data(monitor.clone())
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity)
        .validation_mode(mode);
        if extended {
            builder = builder
                .extension(WebSocketLimit(limiter.clone()))
                .extension(documents.clone());
        }
        if crate::telemetry::exporting() {
            // The operation's spans (parse, validation, execution, fields) in its trace.
            builder = builder.extension(async_graphql::extensions::Tracing);
        }
        if config.environment == Environment::Production {
            builder = builder.disable_introspection().disable_suggestions();
        }
        builder.finish()
    };
    Schemas {
        full: build(true, async_graphql::ValidationMode::Strict),
        http: build(false, async_graphql::ValidationMode::Strict),
        http_fast: build(false, async_graphql::ValidationMode::Fast),
        documents: documents.clone(),
    }
}

/// The schema with nothing behind it, for printing the SDL.
pub fn sdl() -> String {
    Schema::build(
        QueryRoot::default(),
        MutationRoot::<UserObject>::default(),
        SubscriptionRoot,
    )
    .finish()
    .sdl()
}
