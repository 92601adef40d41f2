//! The query side of PCF: reads the views the projectors maintain and the event log, and
//! serves them as the GraphQL `QueryRoot`, waiting (bounded) for a version when asked to.
#![forbid(unsafe_code)]

pub mod errors;
pub mod events;
pub mod live;
mod paging;
pub mod projections;
pub mod readers;
pub mod subscriptions;
pub mod users;

pub use events::EventObject;
pub use live::LiveLog;
pub use readers::{FallbackReader, RedisUserReader, SqlUserReader};
pub use subscriptions::SubscriptionRoot;
pub use users::{QueryRoot, ReadModels, UserObject};
