//! The Kafka side of a projector: consume a batch, have the projection open it and write it
//! to every live generation of the view, then commit the offsets (at-least-once; the views
//! skip what they already have). Events the projection sets aside as never appliable (their
//! personal data does not open, or they do not fold) go to the dead-letter topic as they
//! were received, sealed; a dependency that is down (the view, the log, the keys) is waited
//! for, never dead-lettered, and no offset moves past it.

use pcf_adapters::kafka::QuietContext;
use pcf_domain::EventEnvelope;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use crate::projection::{LiveBatch, Projection};

/// How long the Kafka client postpones fetching a partition whose local queue is over its
/// thresholds (`queued.min.messages`, 100,000 messages, or `queued.max.messages.kbytes`).
/// The client's default, 1 s, leaves a consumer idle once it drains its queue faster than
/// that, as a projector catching up on a backlog can: a consumer doing nothing with its
/// messages read 400,000 a second at 80 % of the machine idle with it, 1.6 million with
/// 10 ms. Looking again every 10 ms while the queue is full costs nothing to speak of.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// How a projector consumes.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka's bootstrap servers.
    pub brokers: String,
    /// The topic of the events.
    pub topic: String,
    /// Put before the projection's name to make the consumer group's id.
    pub group_prefix: String,
    /// The most messages in one batch.
    pub batch_size: usize,
    /// How long to wait for more messages once a batch has begun. Zero (the default): a
    /// batch is what the consumer holds already when its first message is taken, the rest
    /// of that fetch; waiting longer only delays every batch, as a fetch rarely follows
    /// within a millisecond. A view that gathers larger batches on purpose says so
    /// (`ViewStore::batch_wait`: the SQL view's 20 ms).
    pub batch_wait: Duration,
}

impl ConsumerConfig {
    /// Batches of up to 500 messages of `topic`, taken as they come.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            group_prefix: String::new(),
            batch_size: 500,
            batch_wait: Duration::ZERO,
        }
    }

    /// Where events that can never be applied go.
    pub fn dead_letter_topic(&self) -> String {
        pcf_adapters::kafka::dead_letter_topic(&self.topic)
    }
}

/// Counters a projector keeps for metrics and status.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Events written to the view.
    pub applied: AtomicU64,
    /// Messages published to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// A message as read from the topic.
struct Received {
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    /// Its `traceparent` header: the relay's span that published it.
    traceparent: Option<String>,
}

fn received(m: &BorrowedMessage<'_>) -> Received {
    let traceparent = m.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == pcf_adapters::kafka::headers::TRACEPARENT)
            .and_then(|h| h.value)
            .filter(|v| v.len() <= pcf_adapters::trace::MAX_LEN)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    Received {
        partition: m.partition(),
        offset: m.offset(),
        payload: m.payload().unwrap_or_default().to_vec(),
        key: m.key().map(<[u8]>::to_vec),
        traceparent,
    }
}

/// Links kept at most on a batch's span, to the messages after its first.
const MAX_LINKS: usize = 128;

/// Consumes the topic into a projection until `shutdown` completes.
pub struct KafkaProjector {
    config: ConsumerConfig,
    projection: Arc<Projection>,
    stats: Arc<ProjectorStats>,
    dead_letters: FutureProducer<QuietContext>,
}

impl KafkaProjector {
    /// A projector of the topic into `projection` (its consumer group is named after it).
    pub fn new(
        config: ConsumerConfig,
        projection: Arc<Projection>,
        stats: Arc<ProjectorStats>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let dead_letters = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create_with_context(QuietContext::default())?;
        Ok(Self {
            config,
            projection,
            stats,
            dead_letters,
        })
    }

    /// The consumer group's id.
    pub fn group(&self) -> String {
        format!("{}{}", self.config.group_prefix, self.projection.name())
    }

    fn consumer(&self) -> Result<StreamConsumer<QuietContext>, rdkafka::error::KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", self.group())
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
        // A projector that gathers its batches over a while (the SQL view's 20 ms) has the
        // broker hold each fetch as long, instead of answering one as soon as any message
        // arrives: a fetch answered per produce request, for a consumer that then waits
        // anyway, was work for the broker and the client for nothing.
        if self.config.batch_wait >= Duration::from_millis(5) {
            config
                .set(
                    "fetch.wait.max.ms",
                    self.config.batch_wait.as_millis().to_string(),
                )
                .set("fetch.min.bytes", "1048576");
        }
        let consumer: StreamConsumer<QuietContext> =
            config.create_with_context(QuietContext::default())?;
        consumer.subscribe(&[&self.config.topic])?;
        Ok(consumer)
    }

    /// Runs until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        tokio::pin!(shutdown);
        let consumer = Arc::new(self.consumer()?);
        tracing::info!(projection = self.projection.name(), topic = %self.config.topic, "projector consuming");
        let mut offsets = Uncommitted::default();
        loop {
            let first = tokio::select! {
                _ = &mut shutdown => {
                    offsets.commit_last(&consumer, &self.config.topic).await;
                    close(consumer).await;
                    return Ok(());
                }
                _ = tokio::time::sleep_until(offsets.due()), if offsets.waiting() => {
                    offsets.commit(&consumer, &self.config.topic, CommitMode::Async);
                    continue;
                }
                _ = tokio::time::sleep_until(offsets.check_at()), if offsets.unconfirmed() => {
                    offsets.confirm(&consumer).await;
                    continue;
                }
                m = consumer.recv() => m,
            };
            let first = match first {
                Ok(m) => received(&m),
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Whatever else arrives within `batch_wait` of the first message joins its batch
            // (with no wait, what is there already: `timeout_at` polls before it checks).
            // The wait is counted from the first message, not from each one: under a steady
            // stream a wait per message would hold the batch until it is full.
            let deadline = tokio::time::Instant::now() + self.config.batch_wait;
            let mut batch = vec![first];
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(received(&m)),
                    _ => break,
                }
            }
            let next = next_offsets(&batch);
            if !self.process(&batch, &next, &mut shutdown).await {
                offsets.commit_last(&consumer, &self.config.topic).await;
                close(consumer).await;
                return Ok(());
            }
            offsets.add(&next);
            if offsets.due() <= tokio::time::Instant::now() {
                offsets.commit(&consumer, &self.config.topic, CommitMode::Async);
            }
        }
    }

    /// Writes a batch, retrying while dependencies are down and dead-lettering what can
    /// never be applied. Returns false if shutdown came first (nothing is committed then).
    async fn process(
        &self,
        batch: &[Received],
        offsets: &[(i32, i64)],
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        // The batch joins the trace of its first message (the relay's publish span, from the
        // message's traceparent), linked to those of the others.
        let span = tracing::debug_span!(
            "projection_batch",
            otel.kind = "consumer",
            projection = self.projection.name(),
            size = batch.len()
        );
        let mut traced = batch.iter().filter_map(|m| m.traceparent.as_deref());
        if let Some(first) = traced.next() {
            pcf_adapters::trace::set_parent(&span, first);
            for other in traced.take(MAX_LINKS) {
                pcf_adapters::trace::add_link(&span, other);
            }
        }
        self.process_in_span(batch, offsets, shutdown)
            .instrument(span)
            .await
    }

    async fn process_in_span(
        &self,
        batch: &[Received],
        offsets: &[(i32, i64)],
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let mut events: LiveBatch<&Received> = LiveBatch::new();
        for message in batch {
            match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                Ok(e) => events.push(e, message),
                Err(e) => {
                    self.dead_letter(message, &format!("not an event envelope: {e}"))
                        .await
                }
            }
        }
        write_live(
            &self.projection,
            &self.stats,
            &mut events,
            offsets,
            |message: &Received, reason: String| async move {
                self.dead_letter(message, &reason).await
            },
            shutdown,
        )
        .await
    }

    /// Publishes the message, as received, to the dead-letter topic with the reason;
    /// retries until the broker has it, so no event is lost.
    async fn dead_letter(&self, message: &Received, reason: &str) {
        let topic = self.config.dead_letter_topic();
        let partition = message.partition.to_string();
        let offset = message.offset.to_string();
        let group = self.group();
        let mut pause = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: pcf_adapters::kafka::headers::ERROR,
                    value: Some(reason.as_bytes()),
                })
                .insert(Header {
                    key: pcf_adapters::kafka::headers::SOURCE_TOPIC,
                    value: Some(self.config.topic.as_bytes()),
                })
                .insert(Header {
                    key: pcf_adapters::kafka::headers::SOURCE_PARTITION,
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: pcf_adapters::kafka::headers::SOURCE_OFFSET,
                    value: Some(offset.as_bytes()),
                })
                .insert(Header {
                    key: pcf_adapters::kafka::headers::CONSUMER_GROUP,
                    value: Some(group.as_bytes()),
                });
            let mut record = FutureRecord::to(&topic)
                .payload(&message.payload)
                .headers(headers);
            if let Some(key) = &message.key {
                record = record.key(key);
            }
            match self
                .dead_letters
                .send(record, Duration::from_secs(10))
                .await
            {
                Ok(_) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Writes a live batch into `projection` with its `offsets`, retrying while a dependency is
/// down (the view, the log, the opener: nothing is skipped then) and handing each event that
/// can never be applied to `dead_letter` as it is set aside. Returns false if `shutdown`
/// came first: nothing of the batch is to be committed then.
async fn write_live<T: Send, D: Future<Output = ()>>(
    projection: &Projection,
    stats: &ProjectorStats,
    events: &mut LiveBatch<T>,
    offsets: &[(i32, i64)],
    dead_letter: impl Fn(T, String) -> D,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let mut failures = 0u32;
    loop {
        // What can never be applied is set aside and the rest written without it; what
        // was already written is skipped by version.
        let written = projection.apply_live_batch(events, offsets).await;
        for aside in events.take_set_aside() {
            tracing::error!(event_id = %aside.event_id, reason = %aside.reason, "dead-lettering event");
            dead_letter(aside.source, aside.reason).await;
        }
        match written {
            Ok(()) => {
                stats
                    .applied
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                return true;
            }
            Err(e) => {
                failures += 1;
                let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %e, failures, "projection batch failed; retrying");
                tokio::select! {
                    _ = shutdown.as_mut() => return false,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// The offset to resume from, per partition: one past the last message of the batch.
fn next_offsets(batch: &[Received]) -> Vec<(i32, i64)> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for m in batch {
        let e = next.entry(m.partition).or_insert(m.offset + 1);
        *e = (*e).max(m.offset + 1);
    }
    next.into_iter().collect()
}

/// How often a projector commits the offsets of the batches it wrote. Each commit is a
/// write on the broker; committing after every batch of a steady stream made the broker
/// one of the busiest processes on the machine. Offsets committed later only mean more
/// messages come again after a crash or a rebalance, and the views skip them by version.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// The longest a stopping projector waits for its last offset commit.
const LAST_COMMIT_WAIT: Duration = Duration::from_secs(2);

/// How long a stopping projector waits for its consumer to leave the group.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs `work` on a thread of its own, outside the runtime; its result when it ends. A call
/// that never returns (librdkafka waiting on a broker that is down) holds only that thread:
/// neither a worker of the runtime, nor the runtime's shutdown, which waits for its
/// blocking pool.
fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("pcf-kafka".into())
        .spawn(move || {
            let _ = done.send(work());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a Kafka call; it is dropped unanswered");
    }
    result
}

/// Closes `consumer` (dropping the last reference leaves the consumer group, which waits
/// for the broker), at most `CLOSE_WAIT`: a broker that is down must not hold the shutdown
/// up; the group then notices the member gone after its session timeout.
async fn close(consumer: Arc<StreamConsumer<QuietContext>>) {
    let closed = off_runtime(move || drop(consumer));
    if tokio::time::timeout(CLOSE_WAIT, closed).await.is_err() {
        tracing::warn!(
            "the Kafka consumer did not leave its group within {CLOSE_WAIT:?}; stopping without it"
        );
    }
}

/// How long after its last asynchronous commit a projector checks that the broker holds those
/// offsets. An asynchronous commit that fails (a rebalance in progress: another instance
/// joined or left) reports nowhere but the client's log; with no message after it, the
/// partition's committed offset would stay behind what the views hold, its lag above 0 for
/// as long as the stream is quiet, and a restart would read those messages again.
const CONFIRM_AFTER: Duration = Duration::from_secs(1);

/// Offsets of written batches not committed yet, and those committed asynchronously not yet
/// seen on the broker.
struct Uncommitted {
    next: BTreeMap<i32, i64>,
    committed_at: tokio::time::Instant,
    sent: BTreeMap<i32, i64>,
}

impl Default for Uncommitted {
    fn default() -> Self {
        Self {
            next: BTreeMap::new(),
            committed_at: tokio::time::Instant::now(),
            sent: BTreeMap::new(),
        }
    }
}

impl Uncommitted {
    /// Adds a written batch's next offsets (`next_offsets`).
    fn add(&mut self, next: &[(i32, i64)]) {
        for &(partition, offset) in next {
            let e = self.next.entry(partition).or_insert(offset);
            *e = (*e).max(offset);
        }
    }

    /// Whether offsets wait to be committed.
    fn waiting(&self) -> bool {
        !self.next.is_empty()
    }

    /// When the offsets waiting are to be committed.
    fn due(&self) -> tokio::time::Instant {
        self.committed_at + COMMIT_EVERY
    }

    fn commit(&mut self, consumer: &StreamConsumer<QuietContext>, topic: &str, mode: CommitMode) {
        let pending = self.next.clone();
        let Some(tpl) = self.take(topic) else {
            return;
        };
        // A failed commit only means some messages come again; the views skip them. An
        // asynchronous one is checked once the stream is quiet (`confirm`).
        match consumer.commit(&tpl, mode) {
            Ok(()) if matches!(mode, CommitMode::Async) => self.sent.extend(pending),
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }

    /// Whether asynchronous commits wait to be checked.
    fn unconfirmed(&self) -> bool {
        !self.sent.is_empty()
    }

    /// When to check them: `CONFIRM_AFTER` after the last commit.
    fn check_at(&self) -> tokio::time::Instant {
        self.committed_at + CONFIRM_AFTER
    }

    /// Compares the offsets committed asynchronously with those the broker holds for the
    /// partitions this consumer still owns; what the broker lacks is committed again.
    async fn confirm(&mut self, consumer: &Arc<StreamConsumer<QuietContext>>) {
        let sent = std::mem::take(&mut self.sent);
        let asked = consumer.clone();
        let stored = off_runtime(move || asked.committed(LAST_COMMIT_WAIT))
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read.map_err(|e| e.to_string()));
        let stored = match stored {
            Ok(tpl) => tpl,
            // Unknown: the next check (after the next commit) or a restart settles it.
            Err(error) => {
                tracing::warn!(%error, "reading the committed offsets failed");
                return;
            }
        };
        let mut lost = Vec::new();
        for element in stored.elements() {
            let Some(&offset) = sent.get(&element.partition()) else {
                continue;
            };
            let held = match element.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            if held < offset {
                lost.push((element.partition(), offset));
            }
        }
        if !lost.is_empty() {
            tracing::info!(
                partitions = lost.len(),
                "committing offsets again that a commit lost"
            );
            self.add(&lost);
            // Due at once: the next turn of the loop commits them.
            self.committed_at = tokio::time::Instant::now() - COMMIT_EVERY;
        }
    }

    /// On shutdown: commits what waits and waits for the broker's answer, at most
    /// `LAST_COMMIT_WAIT` (a broker that is down must not hold the shutdown up; the
    /// offsets not committed then only mean messages come again).
    async fn commit_last(&mut self, consumer: &Arc<StreamConsumer<QuietContext>>, topic: &str) {
        let Some(tpl) = self.take(topic) else {
            return;
        };
        let consumer = consumer.clone();
        let committed = off_runtime(move || consumer.commit(&tpl, CommitMode::Sync));
        match tokio::time::timeout(LAST_COMMIT_WAIT, committed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "offset commit failed"),
            Ok(Err(_)) => tracing::warn!("offset commit failed: its thread ended"),
            Err(_) => tracing::warn!("offset commit unanswered; stopping without it"),
        }
    }

    /// The offsets waiting, as a commit's partition list; none wait after it.
    fn take(&mut self, topic: &str) -> Option<TopicPartitionList> {
        if self.next.is_empty() {
            return None;
        }
        self.committed_at = tokio::time::Instant::now();
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in std::mem::take(&mut self.next) {
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
                tracing::warn!(error = %e, "building the offset commit failed");
                return None;
            }
        }
        Some(tpl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{history, tamper, FakeKeys, InterferingViews, MemoryLog};
    use pcf_domain::ports::UserReader;
    use std::sync::Mutex;
    use uuid::Uuid;

    #[tokio::test]
    async fn a_batch_dead_letters_what_does_not_open_and_its_offsets_wait_out_the_keys() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = Arc::new(FakeKeys::default());
        let mut log = keys.seal_all(history(a, 2));
        log[1] = tamper(log[1].clone());
        log.extend(keys.seal_all(history(b, 2)));
        let views = Arc::new(InterferingViews::failing_to_open(0));
        let projection = Projection::new(views.clone(), Arc::new(MemoryLog::of(log.clone())))
            .with_opener(keys.clone());
        let stats = ProjectorStats::default();
        let dead = Mutex::new(Vec::new());
        let dead_letter = |message: usize, reason: String| {
            dead.lock().unwrap().push((message, reason));
            std::future::ready(())
        };
        let mut batch = LiveBatch::new();
        for (offset, event) in log.iter().enumerate() {
            batch.push(event.clone(), offset);
        }

        // Stopped while the keys are down: nothing written, dead-lettered or checkpointed.
        keys.fail(0, 1);
        let stop = std::future::ready(());
        tokio::pin!(stop);
        let done = write_live(
            &projection,
            &stats,
            &mut batch,
            &[(0, 4)],
            &dead_letter,
            &mut stop,
        )
        .await;
        assert!(!done);
        assert!(dead.lock().unwrap().is_empty());
        assert!(views.checkpoints.lock().unwrap().is_empty());
        assert!(views.views.is_empty());
        assert_eq!(stats.applied.load(Ordering::Relaxed), 0);

        // The keys down twice more: waited out, then the batch is written without the event
        // that does not open, which is dead-lettered once; its offsets are recorded once.
        keys.fail(0, 2);
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let done = write_live(
            &projection,
            &stats,
            &mut batch,
            &[(0, 4)],
            &dead_letter,
            &mut never,
        )
        .await;
        assert!(done);
        assert_eq!(keys.calls(), [4, 4, 4, 4]);
        let dead = dead.lock().unwrap().clone();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("does not open"), "{}", dead[0].1);
        assert_eq!(*views.checkpoints.lock().unwrap(), [vec![(0, 4)]]);
        assert_eq!(stats.applied.load(Ordering::Relaxed), 3);
        let version = async |user| views.views.user(user).await.unwrap().map(|v| v.version);
        assert_eq!(version(a).await, Some(1));
        assert_eq!(version(b).await, Some(2));
    }
}
