//! The republish scenarios: `pcf events republish` of the first `republish_events` events of
//! the log against a raw Kafka produce of the same messages (same producer settings), and the
//! live relay's commit -> publish latency while a replay runs at half the republish's maximum
//! rate, against the same latency with no replay.

use super::*;
use pcf_command::kafka::{
    enqueue, prepare_topic, producer_config, EventMessage, KafkaConfig, KafkaPublisher,
};
use pcf_command::{RepublishConfig, Republisher, Selection};
use pcf_domain::ports::{EventLog, LogPages};
use pcf_domain::Position;
use rdkafka::consumer::BaseConsumer;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;

/// The share of the maximum command rate at which commands run while the relay's latency is
/// measured: the replay and the commands share the machine.
const COMMAND_LOAD: f64 = 0.25;

/// The thread that reads the live topic.
struct LiveWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl LiveWatch {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Arrivals on the live topic, and the commits waiting for theirs.
#[derive(Default)]
struct Arrivals {
    seen: HashMap<(Uuid, u64), Instant>,
    waiting: HashMap<(Uuid, u64), tokio::sync::oneshot::Sender<Instant>>,
}

impl Bench {
    /// Both republish rows.
    pub(super) async fn republish(&mut self) -> anyhow::Result<Vec<ScenarioResult>> {
        let wanted = self.options.republish_events.max(1);
        let in_log = self.app.store.count_after(Position::START).await?;
        if in_log < wanted {
            let per_user = 10u64;
            let users = (wanted - in_log).div_ceil(per_user);
            eprintln!(
                "bench: seeding {} events for the republish",
                users * per_user
            );
            let mut done = 0u64;
            while done < users {
                let n = 10_000u64.min(users - done);
                // Numbered apart from the rebuild's seeded users.
                self.seed_sealed(50_000_000 + done, n, per_user).await?;
                done += n;
            }
        }
        self.wait_caught_up().await?;
        self.settle_database().await?;
        let messages = self.first_messages(wanted).await?;
        let through = messages.last().map(|(p, _)| *p).unwrap_or(Position::START);
        let count = messages.len() as u64;
        let mut subject = Totals::default();
        let mut raw = Totals::default();
        for round in 0..self.options.rounds.max(1) {
            let replayed = self.republish_once(round, through, count).await?;
            let produced = self.raw_produce(round, &messages).await?;
            let rate = |d: Duration| rate_measurement(count, d).throughput;
            eprintln!(
                "bench: round {}: republish {:.0}/s, raw Kafka produce {:.0}/s",
                round + 1,
                rate(replayed),
                rate(produced)
            );
            subject.add(count, replayed);
            raw.add(count, produced);
        }
        drop(messages);
        let subject = rate_measurement(subject.count, subject.elapsed);
        let raw = rate_measurement(raw.count, raw.elapsed);
        let max_rate = subject.throughput;
        let throughput = ratio_result(
            &format!("events republish ({count} events)"),
            subject,
            "raw Kafka produce of the same messages",
            raw,
            0.5,
        );
        let latency = self.relay_during_replay(max_rate / 2.0).await?;
        Ok(vec![throughput, latency])
    }

    /// The first `n` events of the log as the republish publishes them (messages marked as
    /// a replay), with their positions.
    async fn first_messages(&self, n: u64) -> anyhow::Result<Vec<(Position, EventMessage)>> {
        let log: Arc<dyn EventLog> = self.app.store.clone();
        let mut pages = LogPages::new(log, Position::START, 5000);
        let mut messages = Vec::with_capacity(n as usize);
        while (messages.len() as u64) < n {
            let page = pages.next_page().await?;
            if page.is_empty() {
                break;
            }
            for e in page.iter().take((n - messages.len() as u64) as usize) {
                messages.push((e.position, EventMessage::of(e, true)?));
            }
        }
        Ok(messages)
    }

    fn kafka(&self, topic: &str) -> KafkaConfig {
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        let mut kafka = KafkaConfig::new(brokers, topic);
        kafka.partitions = self.config.kafka_partitions;
        kafka
    }

    /// What `pcf events republish --to <through>` does onto a new topic, timed.
    async fn republish_once(
        &self,
        round: u32,
        through: Position,
        count: u64,
    ) -> anyhow::Result<Duration> {
        let topic = format!("{}.replay{round}", self.config.kafka_topic);
        let mut kafka = self.kafka(&topic);
        kafka.replay = true;
        let started = Instant::now();
        prepare_topic(&kafka.brokers, &topic, None, kafka.partitions).await?;
        let selection = Selection {
            to: Some(through),
            ..Selection::default()
        };
        let republisher = Republisher::new(
            self.app.store.clone(),
            Arc::new(KafkaPublisher::new(kafka)?),
            RepublishConfig::new(topic, selection),
        );
        let done = republisher.run(&|_| {}, std::future::pending()).await?;
        anyhow::ensure!(
            done.published == count,
            "the republish published {} events, not {count}",
            done.published
        );
        Ok(started.elapsed())
    }

    /// The same messages produced onto a new topic with the same producer settings, until
    /// Kafka acknowledged them all.
    async fn raw_produce(
        &self,
        round: u32,
        messages: &[(Position, EventMessage)],
    ) -> anyhow::Result<Duration> {
        let topic = format!("{}.raw{round}", self.config.kafka_topic);
        let kafka = self.kafka(&topic);
        let producer: FutureProducer = producer_config(&kafka).create()?;
        let started = Instant::now();
        prepare_topic(&kafka.brokers, &topic, None, kafka.partitions).await?;
        let mut deliveries = Vec::with_capacity(messages.len());
        for (_, m) in messages {
            let record = FutureRecord::to(&topic)
                .key(&m.key)
                .payload(&m.value)
                .headers(m.headers.clone());
            deliveries.push(enqueue(&producer, record).await?);
        }
        for delivery in deliveries {
            delivery.await?.map_err(|(e, _)| e)?;
        }
        Ok(started.elapsed())
    }

    /// The live relay's commit -> publish p99 (commands at `COMMAND_LOAD` of the maximum
    /// command rate) while a replay of the whole log runs at `replay_rate`, against the same
    /// with no replay.
    async fn relay_during_replay(&mut self, replay_rate: f64) -> anyhow::Result<ScenarioResult> {
        let max = self.command_rate().await;
        let commands = (max * COMMAND_LOAD).max(1.0);
        self.wait_caught_up().await?;
        eprintln!("bench: live relay latency at {commands:.0} commands/s, no replay");
        let baseline = self.relay_latency(commands, None).await?;
        self.wait_caught_up().await?;
        eprintln!(
            "bench: live relay latency at {commands:.0} commands/s, replay at {replay_rate:.0}/s"
        );
        let subject = self.relay_latency(commands, Some(replay_rate)).await?;
        let limit = 2.0 * baseline.p99_ms + 5.0;
        Ok(ScenarioResult {
            scenario: "relay commit -> publish during a replay at half its max rate".to_owned(),
            metric: "p99".to_owned(),
            ratio: if baseline.p99_ms > 0.0 {
                subject.p99_ms / baseline.p99_ms
            } else {
                0.0
            },
            // Only a measurement of commands that all reached the live topic counts.
            met: Some(subject.ops > 0 && subject.errors == 0 && subject.p99_ms <= limit),
            target: format!("p99 <= {limit:.1} ms"),
            subject,
            baseline_name: "relay commit -> publish, no replay".to_owned(),
            baseline,
        })
    }

    /// Commit (the mutation's answer) -> the event read from the live topic, for commands at
    /// `rate`, while a replay runs at `replay` events a second if asked.
    async fn relay_latency(&self, rate: f64, replay: Option<f64>) -> anyhow::Result<Measurement> {
        let arrivals: Arc<Mutex<Arrivals>> = Arc::default();
        let watching = self.watch_live_topic(arrivals.clone()).await?;
        // In a store (and pools) of its own, as `pcf events republish` runs in a process of
        // its own.
        let replaying = match replay {
            Some(rate) => {
                let store = pcf::app::open_store(&self.config).await?.store;
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let live = self.kafka(&self.config.kafka_topic);
                let task = tokio::spawn(replay_until_stopped(store, live, rate, stopped));
                Some((stop, task))
            }
            None => None,
        };
        let recorder = Recorder::default();
        let rec = recorder.clone();
        let client = self.client.clone();
        let users = Arc::new(self.users.clone());
        let (interval, warmup) = (super::super::load::interval(rate), self.options.warmup);
        // A name no earlier measurement gave: an update to the name a user has already is no
        // change, and appends no event.
        let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let op: Op = Arc::new(move |n| {
            let client = client.clone();
            let id = users[n as usize % users.len()];
            let rec = rec.clone();
            let arrivals = arrivals.clone();
            let run = run.clone();
            async move {
                let v = client
                    .graphql(&json!({
                        "query": "mutation($id: ID!, $d: String!) { updateProfile(id: $id, input: {displayName: $d}) { version } }",
                        "variables": { "id": id, "d": format!("P{run}-{n}") }
                    }))
                    .await?;
                let committed = Instant::now();
                let version = v["data"]["updateProfile"]["version"].as_u64().unwrap_or(0);
                let (seen, arrived) = tokio::sync::oneshot::channel();
                {
                    let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                    match a.seen.remove(&(id, version)) {
                        Some(at) => {
                            let _ = seen.send(at);
                        }
                        None => {
                            a.waiting.insert((id, version), seen);
                        }
                    }
                }
                let at = tokio::time::timeout(Duration::from_secs(10), arrived)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .context("never on the live topic")?;
                if interval * n as u32 >= warmup {
                    rec.record(at.saturating_duration_since(committed));
                }
                Ok(())
            }
            .boxed()
        });
        let o = self.options.clone();
        let paced = open_loop(op, rate, o.warmup, o.duration).await;
        // Where the live relay stands: a backlog that grew means it was held back, not the
        // consumer.
        let relay = pcf::app::relay_name(&self.config);
        let checkpoint = self.app.store.load_checkpoint(&relay).await?;
        let backlog = self.app.store.count_after(checkpoint).await?;
        eprintln!("bench: live relay backlog after the measurement: {backlog} events");
        watching.stop();
        if let Some((stop, task)) = replaying {
            let _ = stop.send(true);
            let (runs, published) = task.await??;
            eprintln!(
                "bench: {published} events replayed meanwhile ({runs} whole replays finished)"
            );
        }
        let mut measured = recorder.measurement(o.duration);
        measured.errors = paced.errors;
        measured.machine_idle_percent = paced.machine_idle_percent;
        Ok(measured)
    }

    /// Reads the live topic from its end, telling each waiting commit when its event arrived.
    async fn watch_live_topic(&self, arrivals: Arc<Mutex<Arrivals>>) -> anyhow::Result<LiveWatch> {
        let brokers = self.config.kafka_brokers.clone().unwrap_or_default();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set(
                "group.id",
                format!("bench{}-live{}", self.run_id, Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("enable.partition.eof", "false")
            .create()?;
        // Every partition from its end as it is now, assigned rather than subscribed: a
        // group's assignment comes after a rebalance, and what is published before it would
        // be missed.
        let topic = self.config.kafka_topic.clone();
        let assignment = tokio::task::block_in_place(|| {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut tpl = TopicPartitionList::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) =
                        consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                    tpl.add_partition_offset(&topic, p.id(), Offset::Offset(high))?;
                }
            }
            anyhow::Ok(tpl)
        })?;
        consumer.assign(&assignment)?;
        // On a thread of its own: the replay and the server keep the runtime's threads
        // busy, and a late poll would be counted as the relay's delay.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let at = Instant::now();
                let Some(e) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<pcf_domain::EventEnvelope>(p).ok())
                else {
                    continue;
                };
                let key = (e.aggregate_id, e.sequence);
                let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                match a.waiting.remove(&key) {
                    Some(waiting) => {
                        let _ = waiting.send(at);
                    }
                    None => {
                        a.seen.insert(key, at);
                    }
                }
            }
        });
        Ok(LiveWatch { stop, thread })
    }
}

/// Replays the whole log at `rate` events a second onto fresh topics, one replay after
/// another, until `stopped`: so that a replay runs throughout a measurement, however short
/// the log. Returns how many replays finished and how many events were published.
async fn replay_until_stopped(
    store: Arc<dyn pcf_command::EventStore>,
    live: KafkaConfig,
    rate: f64,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(u64, u64)> {
    let published = std::sync::atomic::AtomicU64::new(0);
    let mut runs = 0;
    while !*stopped.borrow() {
        let mut kafka = live.clone();
        kafka.topic = format!("{}.paced{}", live.topic, Uuid::new_v4().simple());
        kafka.replay = true;
        prepare_topic(&kafka.brokers, &kafka.topic, None, kafka.partitions).await?;
        let mut config = RepublishConfig::new(kafka.topic.clone(), Selection::whole_log());
        config.rate = Some(rate.max(1.0) as u32);
        let republisher =
            Republisher::new(store.clone(), Arc::new(KafkaPublisher::new(kafka)?), config);
        let before = published.load(Ordering::Relaxed);
        let progress = |p: pcf_command::republish::RepublishProgress| {
            published.store(before + p.published, Ordering::Relaxed);
        };
        let mut until = stopped.clone();
        let stop = async move {
            let _ = until.wait_for(|s| *s).await;
        };
        match republisher.run(&progress, stop).await {
            Ok(_) => runs += 1,
            Err(pcf_command::RepublishError::Interrupted { .. }) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((runs, published.load(Ordering::Relaxed)))
}
