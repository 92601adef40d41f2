//! Generations of a read model: readers use the active one; a rebuild writes a new one
//! beside it, and live projectors write both until the rebuild switches readers over.

use async_trait::async_trait;
use pcf_domain::ports::{EventLog, PortError};
use pcf_domain::{EventEnvelope, UserView};
use std::sync::Arc;

use crate::projector::ProjectionError;

/// Where a Kafka batch came from: `(partition, next offset)` pairs.
pub type Offsets = [(i32, i64)];

/// The active generation, and the one being built if a rebuild runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationState {
    pub active: u64,
    pub building: Option<u64>,
}

impl GenerationState {
    /// Every generation live events must reach.
    pub fn targets(&self) -> Vec<u64> {
        let mut t = vec![self.active];
        t.extend(self.building.filter(|b| *b != self.active));
        t
    }
}

/// A read model with generations.
#[async_trait]
pub trait Generational: Send + Sync {
    /// The projection's name (also its Kafka consumer group).
    fn name(&self) -> &str;

    async fn state(&self) -> Result<GenerationState, PortError>;

    /// How long a live batch of this view waits for more events after its first, when
    /// the view prefers a wait of its own to the consumer's default.
    fn batch_wait(&self) -> Option<std::time::Duration> {
        None
    }

    /// Creates empty storage for `generation` and marks it as being built.
    async fn begin(&self, generation: u64) -> Result<(), PortError>;

    /// Makes `generation` the one readers use, atomically, and ends the build.
    async fn switch(&self, generation: u64) -> Result<(), PortError>;

    /// Removes a generation no reader uses any more.
    async fn drop_generation(&self, generation: u64) -> Result<(), PortError>;

    /// Applies a batch to one generation; `offsets`, when given, is recorded with it.
    async fn apply(
        &self,
        generation: u64,
        events: &[EventEnvelope],
        offsets: Option<&Offsets>,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError>;

    /// Writes users' states, folded from the log elsewhere (a rebuild), to one generation
    /// where it is behind them.
    async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError>;

    /// Applies a batch of the live stream to every generation that must have it (see
    /// `GenerationState::targets`). Adapters make this a handshake with `begin` and
    /// `switch`: a batch is never written with a state that changed before its write
    /// landed, so a rebuild needs no pause for live projectors to notice it.
    async fn apply_live(
        &self,
        events: &[EventEnvelope],
        offsets: &Offsets,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let state = self.state().await.map_err(ProjectionError::View)?;
        for generation in state.targets() {
            self.apply(generation, events, Some(offsets), log.clone())
                .await?;
        }
        Ok(())
    }
}
