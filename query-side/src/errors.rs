//! Public errors of the query side, from the one vocabulary (`pcf_adapters::errors`).

use pcf_domain::ports::PortError;

pub(crate) use pcf_adapters::errors::{error, invalid};

/// A failed read: logged, answered without details.
pub(crate) fn unavailable(e: PortError) -> async_graphql::Error {
    pcf_adapters::errors::dependency(e, "a read model")
}
