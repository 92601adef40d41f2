//! The relays of the extra topics (`PCF_KAFKA_EXTRA_TOPICS`): while topics are switched, the
//! relay processes publish every event to each extra topic too, each from a checkpoint of its
//! own and under a leadership of its own, exactly like the event topic's relay (one relay per
//! topic, named `kafka:<topic>`, so a topic keeps its checkpoint when it becomes, or stops
//! being, the event topic).
//!
//! A topic onto which `pcf events republish` has published the whole log gets its relay's
//! first checkpoint from that republish: the topic then holds the log once, in order, the
//! replay first and the live events after it, with nothing between them missing.

use anyhow::Context;
use async_trait::async_trait;
use pcf_command::kafka::{prepare_topic, KafkaConfig, KafkaPublisher};
use pcf_command::store::Lease;
use pcf_command::{
    Backlog, CommitFeed, EventStore, Relay, RelayConfig, RelayStore, Selection, StoreError,
};
use pcf_domain::ports::{Change, EventLog, LogQuery, PortError};
use pcf_domain::{EventEnvelope, Position};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

use super::background::{kafka_relay_name, stopped_during};
use super::process::Process;

/// Starts a relay for each extra topic of the configuration.
pub fn start_relays(p: &mut Process<'_>, kafka: &KafkaConfig) -> anyhow::Result<()> {
    for topic in p.config.kafka_extra_topics.clone() {
        let mut extra = kafka.clone();
        extra.topic = topic.clone();
        let publisher = Arc::new(
            KafkaPublisher::new(extra.clone())
                .with_context(|| format!("creating the Kafka producer of {topic}"))?,
        );
        let config = RelayConfig {
            name: kafka_relay_name(&topic),
            ..RelayConfig::default()
        };
        let wakeups = OwnWakeups::new(p.store.clone());
        let forwarding = wakeups.forward(p.stopped());
        p.spawn(forwarding);
        let relay = Relay::new(Arc::new(wakeups), publisher, config.clone());
        p.metrics.watch_relay(config, p.store.clone());
        let store = p.store.clone();
        let mut shutdown = p.shutdown.clone();
        let stopped = p.stopped();
        p.spawn(async move {
            // Until Kafka answers and the store is reachable, like the event topic's relay.
            let mut pause = Duration::from_millis(200);
            let mut failures = pcf_adapters::Repeats::new(pcf_adapters::repeats::DEFAULT_EVERY);
            loop {
                match prepare(&*store, &extra).await {
                    Ok(()) => break,
                    Err(e) => {
                        if let Some(repeats) = failures.admit() {
                            tracing::warn!(error = %format!("{e:#}"), repeats, topic = %extra.topic,
                                "the relay of an extra topic cannot start yet; retrying");
                        }
                    }
                }
                if stopped_during(&mut shutdown, pause).await {
                    return;
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            relay.run(stopped).await;
        });
    }
    Ok(())
}

/// Creates the extra topic if it does not exist, and gives its relay the checkpoint of the
/// republish of the whole log onto it when the relay has none of its own yet.
async fn prepare(store: &dyn EventStore, kafka: &KafkaConfig) -> anyhow::Result<()> {
    prepare_topic(&kafka.brokers, &kafka.topic, None, kafka.partitions).await?;
    let name = kafka_relay_name(&kafka.topic);
    if store.load_checkpoint(&name).await? != Position::START {
        return Ok(());
    }
    let whole = Selection::whole_log().key();
    if let Some(replayed) = store.republish_checkpoint(&kafka.topic, &whole).await? {
        if replayed.position > Position::START {
            store.save_checkpoint(&name, replayed.position).await?;
            tracing::info!(topic = %kafka.topic, position = %replayed.position,
                "the relay of an extra topic goes on from its republish's checkpoint");
        }
    }
    Ok(())
}

/// The store as the relay of an extra topic sees it: the same store, with a commit signal of
/// its own. The store's relay signal wakes one waiter per commit, which is the event topic's
/// relay; this one is woken from the store's commit feed, which every watcher sees.
struct OwnWakeups {
    store: Arc<dyn EventStore>,
    committed: Arc<Notify>,
}

impl OwnWakeups {
    fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            committed: Arc::new(Notify::new()),
        }
    }

    /// Signals this relay at every commit the store's feed announces, until `stopped`.
    fn forward(
        &self,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut commits = self.store.commits();
        let committed = self.committed.clone();
        async move {
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    changed = commits.changed() => match changed {
                        Ok(()) => committed.notify_one(),
                        Err(_) => return,
                    },
                }
            }
        }
    }
}

#[async_trait]
impl EventLog for OwnWakeups {
    async fn read(&self, query: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
        self.store.read(query).await
    }

    async fn read_changes(&self, query: &LogQuery) -> Result<Vec<Change>, PortError> {
        self.store.read_changes(query).await
    }

    async fn user_events(
        &self,
        user: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, PortError> {
        self.store.user_events(user, after_sequence).await
    }

    async fn last_position(&self) -> Result<Option<Position>, PortError> {
        self.store.last_position().await
    }

    async fn event_count(&self) -> Result<Option<u64>, PortError> {
        self.store.event_count().await
    }
}

#[async_trait]
impl CommitFeed for OwnWakeups {
    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.commits()
    }

    async fn watch_commits(&self) -> Result<(), StoreError> {
        // The event topic's relay listens already; a second listener would replace its.
        Ok(())
    }
}

#[async_trait]
impl RelayStore for OwnWakeups {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        self.store.load_checkpoint(name).await
    }

    async fn count_after(&self, position: Position) -> Result<u64, StoreError> {
        self.store.count_after(position).await
    }

    async fn backlog_after(&self, position: Position) -> Result<Backlog, StoreError> {
        self.store.backlog_after(position).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.store.save_checkpoint(name, position).await
    }

    fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    async fn try_lead(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        self.store.try_lead(name).await
    }
}
