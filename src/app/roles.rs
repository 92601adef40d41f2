//! What a process does: its roles, and the projections the Kafka roles maintain.

/// What a process does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves GraphQL and HTTP.
    Api,
    /// Publishes the event store to the bus (one active across processes).
    Relay,
    /// Builds the views from the bus.
    Projector,
}

/// Every role.
pub const ALL_ROLES: [Role; 3] = [Role::Api, Role::Relay, Role::Projector];

/// Names of the Kafka projections, for status and rebuild.
pub const PROJECTIONS: [&str; 2] = ["users-redis", "users-sql"];
