//! What a read model's storage does for the projection, and nothing more: load the current
//! documents it is asked for, write batches of them (each user's write guarded by the
//! version it was folded from) together with the batch's checkpoint, and keep generations.
//! What the events mean, and the log, are the projection's (`crate::projection`).

use async_trait::async_trait;
use pcf_domain::ports::PortError;
use pcf_domain::UserView;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// Where a Kafka batch came from: `(partition, next offset)` pairs.
pub type Offsets = [(i32, i64)];

/// The active generation, and the one being built if a rebuild runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationState {
    /// The generation readers use.
    pub active: u64,
    /// The generation a rebuild is writing, if one runs.
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

/// Which generations a batch of writes reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every generation live events must reach (`GenerationState::targets`) as the state
    /// stands when the batch opens. The store lands the batch's writes only while that
    /// state holds: a `begin` or `switch` either waits for the batch or makes its writes
    /// answer `Written::GenerationsMoved`, so a rebuild needs no pause for live writers.
    Live,
    /// This one generation, whatever the state (a rebuild's writes).
    Generation(u64),
}

/// The generations a batch writes, as its store opened it: for a live batch, the targets of
/// the generation state it was opened with (kept, for the store to check its writes
/// against); else the one generation of its scope.
#[derive(Debug, Clone)]
pub(crate) struct BatchGenerations {
    targets: Vec<u64>,
    opened_with: Option<GenerationState>,
}

impl BatchGenerations {
    /// The generations of a batch of `scope`. `live_state` reads the generation state from
    /// the store; it is awaited (and so run) only for a live batch.
    pub(crate) async fn of(
        scope: Scope,
        live_state: impl Future<Output = Result<GenerationState, PortError>>,
    ) -> Result<Self, PortError> {
        Ok(match scope {
            Scope::Live => {
                let state = live_state.await?;
                Self {
                    targets: state.targets(),
                    opened_with: Some(state),
                }
            }
            Scope::Generation(generation) => Self {
                targets: vec![generation],
                opened_with: None,
            },
        })
    }

    /// Every generation the batch writes.
    pub(crate) fn targets(&self) -> &[u64] {
        &self.targets
    }

    /// For a live batch, the generation state it was opened with; `None` for a batch of one
    /// generation.
    pub(crate) fn opened_with(&self) -> Option<GenerationState> {
        self.opened_with
    }
}

/// What a guarded write of several users came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// For each change, in order: true when written (or the stored document was already at
    /// or past it), false when the stored document is no longer at the version the change
    /// was folded from (another writer moved it; nothing written for that user).
    Users(Vec<bool>),
    /// Nothing written: the generation state changed since the batch opened.
    GenerationsMoved,
}

/// A read model of users with generations: its storage, as the projection uses it.
#[async_trait]
pub trait ViewStore: Send + Sync {
    /// The projection's name (also its Kafka consumer group).
    fn name(&self) -> &str;

    /// How long a live batch of this view waits for more events after its first, when the
    /// view prefers a wait of its own to the consumer's default.
    fn batch_wait(&self) -> Option<Duration> {
        None
    }

    /// The generation readers use, and the one being built.
    async fn state(&self) -> Result<GenerationState, PortError>;

    /// Creates empty storage for `generation` and marks it as being built.
    async fn begin(&self, generation: u64) -> Result<(), PortError>;

    /// Makes `generation` the one readers use, atomically, and ends the build.
    async fn switch(&self, generation: u64) -> Result<(), PortError>;

    /// Removes a generation no reader uses any more.
    async fn drop_generation(&self, generation: u64) -> Result<(), PortError>;

    /// Opens a batch of reads and writes: a transaction where the store has them.
    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError>;
}

/// One batch of writes to a store, ended by `commit` (dropped uncommitted, what the store
/// can take back is taken back).
#[async_trait]
pub trait ViewBatch: Send {
    /// The generations this batch writes.
    fn generations(&self) -> &[u64];

    /// The stored documents of these users in `generation` (missing ones left out),
    /// tombstones included.
    async fn load(
        &mut self,
        generation: u64,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, UserView>, PortError>;

    /// Replaces each user's document with the new one where the stored one is still at the
    /// version of the previous one (absent for none), keeping the email index in step: each
    /// user atomically, distinct users.
    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError>;

    /// Writes whole states (distinct users) where the store can decide by version by
    /// itself, in one round trip; answers for each, in order, whether it is settled
    /// (written, or the stored one already at or past it). The unsettled ones go the guarded
    /// way. By default none is settled.
    async fn write_newer(
        &mut self,
        _generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        Ok(vec![false; states.len()])
    }

    /// Ends the batch, recording `offsets` (when any) as the checkpoint of every generation
    /// it wrote, atomically with its writes where the store keeps checkpoints.
    async fn commit(self: Box<Self>, offsets: &Offsets) -> Result<(), PortError>;
}
