//! The interface the projectors had before `Projection` and `ViewStore`, kept as thin
//! wrappers over them while the root crate and its tests still call it. Each item names its
//! replacement; nothing new should use this module.

use async_trait::async_trait;
use pcf_domain::ports::{Change, EventLog, PortError};
use pcf_domain::{EventEnvelope, Position, UserView};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::consumer::{ConsumerConfig, KafkaProjector, ProjectorStats};
use crate::memory::MemoryUserViews;
use crate::projection::{write_states, Engine, Projection, ProjectionError};
use crate::rebuild::{rebuild_targets, Progress, RebuildOptions, Target};
use crate::redis_view::RedisUserViews;
use crate::store::{GenerationState, Offsets, Scope, ViewStore};

/// A read model with generations, as projectors and rebuilds took it before. Every
/// `ViewStore` is one. Replaced by `ViewStore` (storage) and `Projection` (applying events).
#[async_trait]
pub trait Generational: Send + Sync {
    /// `ViewStore::name`.
    fn name(&self) -> &str;

    /// `ViewStore::state`.
    async fn state(&self) -> Result<GenerationState, PortError>;

    /// `ViewStore::batch_wait`.
    fn batch_wait(&self) -> Option<Duration> {
        None
    }

    /// `ViewStore::begin`.
    async fn begin(&self, generation: u64) -> Result<(), PortError>;

    /// `ViewStore::switch`.
    async fn switch(&self, generation: u64) -> Result<(), PortError>;

    /// `ViewStore::drop_generation`.
    async fn drop_generation(&self, generation: u64) -> Result<(), PortError>;

    /// `Projection::apply_to`.
    async fn apply(
        &self,
        generation: u64,
        events: &[EventEnvelope],
        offsets: Option<&Offsets>,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError>;

    /// `Projection::write_states`.
    async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError>;

    /// `Projection::apply_live`.
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

    /// The view store this is, if it is one (every `ViewStore` is).
    fn view_store(self: Arc<Self>) -> Option<Arc<dyn ViewStore>> {
        None
    }
}

#[async_trait]
impl<S: ViewStore + 'static> Generational for S {
    fn name(&self) -> &str {
        ViewStore::name(self)
    }

    async fn state(&self) -> Result<GenerationState, PortError> {
        ViewStore::state(self).await
    }

    fn batch_wait(&self) -> Option<Duration> {
        ViewStore::batch_wait(self)
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        ViewStore::begin(self, generation).await
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        ViewStore::switch(self, generation).await
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        ViewStore::drop_generation(self, generation).await
    }

    async fn apply(
        &self,
        generation: u64,
        events: &[EventEnvelope],
        offsets: Option<&Offsets>,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let engine = Engine {
            store: self,
            log: &*log,
        };
        engine
            .apply(
                Scope::Generation(generation),
                events,
                offsets.unwrap_or_default(),
            )
            .await
    }

    async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError> {
        write_states(self, generation, states).await
    }

    async fn apply_live(
        &self,
        events: &[EventEnvelope],
        offsets: &Offsets,
        log: Arc<dyn EventLog>,
    ) -> Result<(), ProjectionError> {
        let engine = Engine {
            store: self,
            log: &*log,
        };
        engine.apply(Scope::Live, events, offsets).await
    }

    fn view_store(self: Arc<Self>) -> Option<Arc<dyn ViewStore>> {
        Some(self)
    }
}

/// A rebuild target of the older interface that is not a `ViewStore` (a wrapper of one).
struct GenerationalTarget {
    view: Arc<dyn Generational>,
    log: Arc<dyn EventLog>,
}

#[async_trait]
impl Target for GenerationalTarget {
    fn name(&self) -> &str {
        self.view.name()
    }
    async fn state(&self) -> Result<GenerationState, PortError> {
        self.view.state().await
    }
    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        self.view.begin(generation).await
    }
    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        self.view.switch(generation).await
    }
    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        self.view.drop_generation(generation).await
    }
    async fn write_states(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<(), ProjectionError> {
        self.view.write_states(generation, states).await
    }
    /// This interface takes whole envelopes: the users' events are read again.
    async fn apply_changes(
        &self,
        generation: u64,
        changes: &[&Change],
    ) -> Result<(), ProjectionError> {
        let wanted: HashSet<Uuid> = changes.iter().map(|c| c.event_id).collect();
        let mut envelopes = Vec::with_capacity(changes.len());
        let mut users = HashSet::new();
        for change in changes {
            if users.insert(change.aggregate_id) {
                let from = change.sequence.saturating_sub(1);
                let events = self
                    .log
                    .user_events(change.aggregate_id, from)
                    .await
                    .map_err(ProjectionError::Log)?;
                envelopes.extend(events.into_iter().filter(|e| wanted.contains(&e.event_id)));
            }
        }
        envelopes.sort_by_key(|e| e.position);
        self.view
            .apply(generation, &envelopes, None, self.log.clone())
            .await
    }
}

/// The targets of a rebuild of `views`: a `Projection` for each view store.
fn targets(views: &[Arc<dyn Generational>], log: &Arc<dyn EventLog>) -> Vec<Box<dyn Target>> {
    views
        .iter()
        .map(|view| match view.clone().view_store() {
            Some(store) => Box::new(Projection::new(store, log.clone())) as Box<dyn Target>,
            None => Box::new(GenerationalTarget {
                view: view.clone(),
                log: log.clone(),
            }),
        })
        .collect()
}

/// Rebuilds `view` from `log`; returns the new active generation. Replaced by
/// `Projection::rebuild`.
pub async fn rebuild(
    view: Arc<dyn Generational>,
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<u64, ProjectionError> {
    let generations = rebuild_all(&[view], log, options, progress).await?;
    Ok(generations[0])
}

/// Rebuilds every view of `views` from one reading of `log`; returns the new generations,
/// in order. Replaced by `rebuild_views`.
pub async fn rebuild_all(
    views: &[Arc<dyn Generational>],
    log: Arc<dyn EventLog>,
    options: &RebuildOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Vec<u64>, ProjectionError> {
    let targets = targets(views, &log);
    let targets: Vec<&dyn Target> = targets.iter().map(|t| &**t).collect();
    Ok(rebuild_targets(&targets, log, options, progress)
        .await?
        .generations)
}

impl KafkaProjector {
    /// A projector of the topic into `view`, filling gaps from `log`. Replaced by
    /// `KafkaProjector::with_projection(config, Arc::new(Projection::new(store, log)),
    /// stats)`. Fails for a view that is not a `ViewStore`.
    pub fn new(
        config: ConsumerConfig,
        view: Arc<dyn Generational>,
        log: Arc<dyn EventLog>,
        stats: Arc<ProjectorStats>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let name = view.name().to_owned();
        let store = view.view_store().ok_or_else(|| {
            rdkafka::error::KafkaError::ClientCreation(format!("{name} is not a view store"))
        })?;
        Self::with_projection(config, Arc::new(Projection::new(store, log)), stats)
    }
}

/// The in-memory projection of embedded mode, as it was built. Replaced by
/// `Projection::new(views, log)`, `Projection::rebuild` and `Projection::run`.
pub struct UserProjector {
    projection: Projection,
}

impl UserProjector {
    /// The projection of `log` into `views`.
    pub fn new(views: Arc<dyn ViewStore>, log: Arc<dyn EventLog>) -> Self {
        Self {
            projection: Projection::new(views, log),
        }
    }

    /// Builds the views from the whole log, `batch_size` events at a time, as a rebuild
    /// does; returns the position reached.
    pub async fn catch_up(&self, batch_size: usize) -> Result<Position, ProjectionError> {
        let options = RebuildOptions {
            batch_size,
            linger: Duration::ZERO,
        };
        Ok(self.projection.rebuild(&options, &|_| {}).await?.position)
    }

    /// `Projection::run`.
    pub async fn run(self, batches: mpsc::UnboundedReceiver<Arc<Vec<EventEnvelope>>>) {
        self.projection.run(batches).await
    }
}

/// Reading one user's document, as views were read back before. Replaced by
/// `UserReader::user` (memory) and `RedisUserViews::document`.
#[async_trait]
pub trait UserViewWriter: Send + Sync {
    /// The user's current document, tombstones included.
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError>;
}

#[async_trait]
impl UserViewWriter for MemoryUserViews {
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        pcf_domain::ports::UserReader::user(self, id).await
    }
}

/// One generation of the Redis view, to read documents back. Replaced by
/// `RedisUserViews::document`.
pub struct RedisGenerationWriter {
    views: RedisUserViews,
    generation: u64,
}

#[async_trait]
impl UserViewWriter for RedisGenerationWriter {
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        self.views.document(self.generation, id).await
    }
}

impl RedisUserViews {
    /// One generation's documents. Replaced by `RedisUserViews::document`.
    pub fn writer(&self, generation: u64) -> RedisGenerationWriter {
        RedisGenerationWriter {
            views: self.clone(),
            generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{history, MemoryLog};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn the_embedded_projector_builds_the_views_as_a_rebuild_then_follows_the_bus() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let log = Arc::new(MemoryLog::of(history(a, 3)));
        let views = Arc::new(MemoryUserViews::new());
        let projector = UserProjector::new(views.clone(), log.clone());
        let reached = projector.catch_up(2).await.unwrap();
        assert_eq!(reached, log.events().last().unwrap().position);
        assert_eq!(views.current(a).await.unwrap().unwrap().version, 3);
        assert_eq!(Generational::state(&*views).await.unwrap().active, 2);
        let (send, batches) = mpsc::unbounded_channel();
        send.send(Arc::new(history(b, 2))).unwrap();
        drop(send);
        projector.run(batches).await;
        assert_eq!(views.current(b).await.unwrap().unwrap().version, 2);
    }

    /// A view of the older interface that is not a store: it counts its page writes.
    struct Wrapper {
        inner: Arc<MemoryUserViews>,
        writes: AtomicUsize,
    }

    #[async_trait]
    impl Generational for Wrapper {
        fn name(&self) -> &str {
            "wrapper"
        }
        async fn state(&self) -> Result<GenerationState, PortError> {
            Generational::state(&*self.inner).await
        }
        async fn begin(&self, generation: u64) -> Result<(), PortError> {
            Generational::begin(&*self.inner, generation).await
        }
        async fn switch(&self, generation: u64) -> Result<(), PortError> {
            Generational::switch(&*self.inner, generation).await
        }
        async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
            Generational::drop_generation(&*self.inner, generation).await
        }
        async fn apply(
            &self,
            generation: u64,
            events: &[EventEnvelope],
            offsets: Option<&Offsets>,
            log: Arc<dyn EventLog>,
        ) -> Result<(), ProjectionError> {
            self.inner.apply(generation, events, offsets, log).await
        }
        async fn write_states(
            &self,
            generation: u64,
            states: &[UserView],
        ) -> Result<(), ProjectionError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Generational::write_states(&*self.inner, generation, states).await
        }
    }

    #[tokio::test]
    async fn the_older_rebuild_and_views_write_through_the_projection() {
        let a = Uuid::now_v7();
        let log: Arc<dyn EventLog> = Arc::new(MemoryLog::of(history(a, 4)));
        let memory = Arc::new(MemoryUserViews::new());
        let wrapper = Arc::new(Wrapper {
            inner: memory.clone(),
            writes: AtomicUsize::new(0),
        });
        let options = RebuildOptions {
            batch_size: 3,
            linger: Duration::ZERO,
        };
        let generation = rebuild(wrapper.clone(), log.clone(), &options, &|_| {})
            .await
            .unwrap();
        assert_eq!(generation, 2);
        assert_eq!(wrapper.writes.load(Ordering::SeqCst), 2, "a write per page");
        assert_eq!(memory.current(a).await.unwrap().unwrap().version, 4);
        // `apply_live` and `apply` reach the engine with the log for gaps.
        let b = Uuid::now_v7();
        let events = history(b, 2);
        let log: Arc<dyn EventLog> = Arc::new(MemoryLog::of(events.clone()));
        Generational::apply_live(&*memory, &events[1..], &[], log.clone())
            .await
            .unwrap();
        assert_eq!(memory.current(b).await.unwrap().unwrap().version, 2);
        Generational::apply(&*memory, 1, &events, None, log)
            .await
            .unwrap();
        let mut batch = memory.open(Scope::Generation(1)).await.unwrap();
        assert_eq!(batch.load(1, &[b]).await.unwrap()[&b].version, 2);
    }
}
