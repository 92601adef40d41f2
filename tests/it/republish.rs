//! `pcf events republish` on the real services: a republish onto a new topic holds every event
//! of the log once, per user in sequence order, with the live stream's key, value and headers
//! plus `replay` (erased users' events as unopenable ciphertext, exactly as live), while the
//! live relay keeps publishing; an interrupted or killed republish resumes from its
//! checkpoint without a gap; `--types`, `--from` and `--to` select exactly what they say; bad
//! input and a broker that is down or dies get coded errors, and nothing is written that the
//! checkpoint does not account for; embedded mode refuses it. And the topic switch of
//! `docs/operations.md`, followed step by step while commands run.

use crate::support::*;
use pcf::app::Role;
use pcf::cli::republish::{republish, CodedError};
use pcf::cli::RepublishArgs;
use pcf_command::republish::{RepublishProgress, Republished};
use pcf_domain::ports::{EventLog, LogQuery};
use pcf_domain::{EventEnvelope, Position};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

/// Topics a test makes besides its cluster's, deleted at teardown.
struct ExtraTopics {
    brokers: String,
    names: Vec<String>,
}

impl Teardown for ExtraTopics {
    async fn teardown(self) {
        let Ok(admin) = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&names, &options).await {
            eprintln!("could not delete topics {names:?}: {e}");
        }
    }
}

/// A cluster and the topics `suffixes` name after its topic (`<topic>.<suffix>`).
async fn cluster_with(suffixes: &[&str]) -> (Cluster, ExtraTopics) {
    let c = Cluster::create().await;
    let names = suffixes
        .iter()
        .flat_map(|s| {
            let t = format!("{}.{s}", c.topic);
            [format!("{t}.dlq"), t]
        })
        .collect();
    let extra = ExtraTopics {
        brokers: c.brokers.clone(),
        names,
    };
    (c, extra)
}

fn args(topic: &str) -> RepublishArgs {
    RepublishArgs {
        topic: topic.to_owned(),
        ..RepublishArgs::default()
    }
}

/// `pcf events republish` as the command line runs it, without a stop.
async fn run(config: &pcf::Config, args: &RepublishArgs) -> Result<Republished, CodedError> {
    republish(config, args, &|_| {}, std::future::pending()).await
}

/// The cluster mode of `c` without Redis (these tests read Kafka, not the views).
fn config_of(c: &Cluster) -> pcf::Config {
    pcf::Config {
        redis_url: None,
        ..c.config()
    }
}

/// Users with profile updates, email changes and deletions: every event type.
async fn write_history(router: &axum::Router, tag: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = create_user(
            router,
            &format!("h{i}@{tag}.example.com"),
            &format!("H {i}"),
        )
        .await;
        update_profile(
            router,
            id,
            json!({ "displayName": format!("H {i} b"), "bio": "bio" }),
        )
        .await;
        if i % 3 == 1 {
            change_email(router, id, &format!("h{i}-new@{tag}.example.com")).await;
        }
        if i % 4 == 2 {
            delete_account(router, id).await;
        }
        ids.push(id);
    }
    ids
}

/// The whole readable log, in commit order.
async fn whole_log(log: &Arc<dyn EventLog>) -> Vec<EventEnvelope> {
    let query = LogQuery {
        after: Some(Position::START),
        limit: 1_000_000,
        ..LogQuery::default()
    };
    log.read(&query).await.expect("reading the log")
}

/// Waits until the log's readable prefix holds every stored event, and returns it.
async fn settled_log(c: &Cluster, log: &Arc<dyn EventLog>) -> Vec<EventEnvelope> {
    let stored = stored_event_ids(&c.pool).await;
    wait_until(CONVERGE, "every stored event to be readable", || async {
        let events = whole_log(log).await;
        let ids: BTreeSet<Uuid> = events.iter().map(|e| e.event_id).collect();
        if ids == stored {
            Ok(events)
        } else {
            Err(format!("{} of {} readable", ids.len(), stored.len()))
        }
    })
    .await
}

/// How long a test waits for a topic to hold what it expects. Generous: a transaction held
/// open anywhere on the shared PostgreSQL server (another test's bulk load) holds back every
/// relay and replay on it.
const TOPIC_WAIT: Duration = Duration::from_secs(180);

/// Reads `topic` until it holds every event of `expected`, then for a moment more; fails
/// naming how many are missing.
async fn read_topic(brokers: &str, topic: &str, expected: &BTreeSet<Uuid>) -> Vec<Record> {
    read_topic_explained(brokers, topic, expected, async |_| String::new()).await
}

/// `read_topic`, whose failure also says what `explain` tells of the missing events.
async fn read_topic_explained(
    brokers: &str,
    topic: &str,
    expected: &BTreeSet<Uuid>,
    explain: impl AsyncFnOnce(Vec<Uuid>) -> String,
) -> Vec<Record> {
    let mut tail = TopicTail::new(brokers, topic).await;
    let deadline = Instant::now() + TOPIC_WAIT;
    while !event_ids(&tail.records).is_superset(expected) {
        if Instant::now() >= deadline {
            let missing: Vec<Uuid> = expected
                .difference(&event_ids(&tail.records))
                .copied()
                .collect();
            panic!(
                "{} of {} events missing from {topic} after {TOPIC_WAIT:?} ({} messages read); {}",
                missing.len(),
                expected.len(),
                tail.records.len(),
                explain(missing).await
            );
        }
        tail.drain_for(Duration::from_millis(500)).await;
    }
    tail.drain_for(Duration::from_millis(500)).await;
    tail.records
}

/// Each user's messages are in one partition, keyed by the user, and in sequence order: a
/// message either repeats an event published before (a duplicate at a seam) or is the user's
/// next event. Returns the events in the order the partitions hold them.
fn assert_ordered_per_user(records: &[Record]) -> Vec<EventEnvelope> {
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut partition_of: HashMap<Uuid, i32> = HashMap::new();
    let mut next: HashMap<Uuid, u64> = HashMap::new();
    let mut all = Vec::new();
    for (partition, mut messages) in by_partition {
        messages.sort_by_key(|r| r.offset);
        for r in messages {
            let e = r
                .envelope()
                .unwrap_or_else(|| panic!("not an envelope: {r:?}"));
            assert_eq!(r.key, Some(e.aggregate_id.to_string()), "key of {r:?}");
            let p = *partition_of.entry(e.aggregate_id).or_insert(partition);
            assert_eq!(p, partition, "user {} in two partitions", e.aggregate_id);
            let expected = next.entry(e.aggregate_id).or_insert(1);
            if e.sequence >= *expected {
                assert_eq!(
                    e.sequence, *expected,
                    "user {}: sequence {} before {} (partition {partition}, offset {})",
                    e.aggregate_id, e.sequence, expected, r.offset
                );
                *expected += 1;
            }
            all.push(e);
        }
    }
    all
}

/// The ids of events that appear more than once.
fn duplicated(records: &[Record]) -> Vec<EventEnvelope> {
    let mut seen = BTreeSet::new();
    records
        .iter()
        .filter_map(Record::envelope)
        .filter(|e| !seen.insert(e.event_id))
        .collect()
}

/// The republish checkpoint rows of the test's database: topic, selection, position,
/// published, state, error.
async fn checkpoints(c: &Cluster) -> Vec<(String, String, String, i64, String, Option<String>)> {
    sqlx::query_as(
        "SELECT topic, selection, lpad(to_hex(transaction_id::text::bigint), 16, '0') || \
                lpad(to_hex(global_position), 16, '0'), published, state, error \
         FROM republish_checkpoints ORDER BY topic, selection",
    )
    .fetch_all(&c.pool)
    .await
    .expect("reading republish_checkpoints")
}

/// The partitions of each of `topics` that exist on the broker.
async fn topic_partitions(brokers: &str, topics: &[&str]) -> BTreeMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a metadata client");
    let wanted: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("Kafka metadata");
        metadata
            .topics()
            .iter()
            .filter(|t| wanted.iter().any(|w| w == t.name()) && t.error().is_none())
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect()
    })
    .await
    .expect("the metadata task")
}

// ---------------------------------------------------------------------------------------------
// A whole republish beside the live relay
// ---------------------------------------------------------------------------------------------

on_cluster_with! {
    a_republish_holds_every_event_once_in_order_as_live_while_the_live_relay_goes_on:
        ["replay"] => whole_republish,
}

/// Runs `scenario` on a cluster and the extra topics `suffixes` name, cleaning both up.
macro_rules! on_cluster_with {
    ($($test:ident: [$($suffix:literal),*] => $scenario:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            run_fixture(cluster_with(&[$($suffix),*]).await, $scenario).await;
        }
    )*};
}
use on_cluster_with;

async fn run_fixture(
    fixture: (Cluster, ExtraTopics),
    scenario: impl AsyncFnOnce(&mut Cluster) -> (),
) {
    crate::support::run(fixture, async |(c, _)| scenario(c).await).await;
}

async fn whole_republish(c: &mut Cluster) {
    let config = config_of(c);
    let node = c.start(&config, &[Role::Api, Role::Relay]).await;
    let tag = c.tag().to_owned();
    let ids = write_history(&node.router, &tag, 16).await;
    let deleted: Vec<Uuid> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 2)
        .map(|(_, id)| *id)
        .collect();
    let log = node.log();
    let before = settled_log(c, &log).await;

    // The live stream, watched from its end, while a paced replay runs and commands go on.
    let watch = LiveWatch::start(&c.brokers, &c.topic).await;
    let replay = format!("{}.replay", c.topic);
    let mut replay_args = args(&replay);
    replay_args.partitions = Some(3);
    replay_args.rate = Some(40);
    let reported = Mutex::new(Vec::new());
    let progress = |p: RepublishProgress| reported.lock().unwrap().push(p);
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (router, writing, ids) = (node.router.clone(), writing.clone(), ids.clone());
        let live: Vec<Uuid> = ids.into_iter().filter(|id| !deleted.contains(id)).collect();
        tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                let id = live[n % live.len()];
                let version =
                    update_profile(&router, id, json!({ "displayName": format!("L {n}") })).await;
                committed.push(((id, version as u64), Instant::now()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            committed
        })
    };
    let done = republish(&config, &replay_args, &progress, std::future::pending())
        .await
        .expect("the republish");
    writing.store(false, Ordering::Relaxed);
    let committed = writer.await.expect("the writer");

    // The replay: exactly the log up to its end when the run started (the history, and any
    // command that committed before the run looked), every event once.
    assert!(done.through >= before.last().unwrap().position, "{done:?}");
    let selected: Vec<EventEnvelope> = whole_log(&log)
        .await
        .into_iter()
        .filter(|e| e.position <= done.through)
        .collect();
    let n = selected.len() as u64;
    assert_eq!(done.published, n, "{done:?}");
    assert_eq!(done.resumed_after, None);
    let reported = reported.into_inner().unwrap();
    assert_eq!(
        reported.first().map(|p| (p.published, p.total)),
        Some((0, n))
    );
    assert_eq!(reported.last().map(|p| p.published), Some(n));
    let expected: BTreeSet<Uuid> = selected.iter().map(|e| e.event_id).collect();
    let replayed = read_topic(&c.brokers, &replay, &expected).await;
    let in_order = assert_ordered_per_user(&replayed);
    assert_eq!(in_order.len(), selected.len(), "a duplicate without a seam");
    assert_eq!(
        event_ids(&replayed),
        expected,
        "events outside the log as it was"
    );
    assert_eq!(
        topic_partitions(&c.brokers, &[&replay]).await.get(&replay),
        Some(&3)
    );
    let live_before = read_topic(&c.brokers, &c.topic, &expected).await;

    // Each message is the live one: the same key and value bytes, the same headers, plus
    // `replay`. Deleted users' events are the same ciphertext, which opens for nobody.
    let live: HashMap<Uuid, &Record> = live_before
        .iter()
        .map(|r| (r.envelope().unwrap().event_id, r))
        .collect();
    for r in &replayed {
        let e = r.envelope().unwrap();
        let l = live[&e.event_id];
        assert_eq!(r.key, l.key);
        assert_eq!(r.payload, l.payload, "value of {}", e.event_id);
        let mut headers = l.headers.clone();
        headers.insert("replay".to_owned(), "true".to_owned());
        assert_eq!(r.headers, headers, "headers of {}", e.event_id);
        assert!(
            !l.headers.contains_key("replay"),
            "the live stream says replay"
        );
    }
    let text = String::from_utf8_lossy(
        &replayed
            .iter()
            .flat_map(|r| r.payload.clone())
            .collect::<Vec<u8>>(),
    )
    .into_owned();
    assert!(
        !text.contains(&format!("@{tag}.example.com")),
        "an email in plain text"
    );
    let mut deleted_events: Vec<EventEnvelope> = replayed
        .iter()
        .filter_map(Record::envelope)
        .filter(|e| deleted.contains(&e.aggregate_id))
        .collect();
    assert!(
        !deleted_events.is_empty(),
        "the control: no deleted user replayed"
    );
    let sealed = deleted_events
        .iter()
        .filter(|e| e.payload.get("sealed").is_some())
        .count();
    assert!(sealed > 0, "the control: no sealed event of a deleted user");
    let unopened = node
        .keys
        .open(&mut deleted_events)
        .await
        .expect("opening the deleted users' events");
    assert!(unopened.is_empty(), "{unopened:?}");
    for e in &deleted_events {
        if e.event_type != "AccountDeleted" {
            assert_eq!(e.payload["erased"], true, "not erased: {e:?}");
            assert!(e.payload.get("email").is_none_or(|v| v.is_null()), "{e:?}");
        }
    }

    // The live relay published what was committed during the replay; how long it took.
    assert!(
        committed.len() >= 5,
        "too few commands during the replay: {}",
        committed.len()
    );
    let latencies = watch.latencies(&committed, CONVERGE).await;
    eprintln!(
        "live relay during a replay at 40 events/s: {} commands, commit -> on the live topic \
         p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    let rows = checkpoints(c).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, replay);
    assert_eq!(rows[0].1, "from=start;to=end;types=all");
    assert_eq!(rows[0].2, done.through.to_string());
    assert_eq!((rows[0].3, rows[0].4.as_str()), (n as i64, "finished"));
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The live topic read from its end: when each (user, sequence) arrived.
struct LiveWatch {
    arrived: Arc<Mutex<HashMap<(Uuid, u64), Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LiveWatch {
    async fn start(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("watch-{}", Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer");
        let partitions = topic_partitions(brokers, &[topic]).await[topic];
        // From each partition's end as it is now, by offset: `Offset::End` is resolved only
        // when fetching starts, and would skip what was published before that.
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            let (_, high) = tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(topic, p, Duration::from_secs(10))
            })
            .expect("the partition's end");
            tpl.add_partition_offset(topic, p, Offset::Offset(high))
                .expect("an offset");
        }
        consumer.assign(&tpl).expect("assigning");
        let arrived: Arc<Mutex<HashMap<(Uuid, u64), Instant>>> = Arc::default();
        let into = arrived.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let at = Instant::now();
                if let Some(e) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<EventEnvelope>(p).ok())
                {
                    into.lock()
                        .unwrap()
                        .entry((e.aggregate_id, e.sequence))
                        .or_insert(at);
                }
            }
        });
        // Let the assignment take effect before anything is committed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Self { arrived, task }
    }

    /// Waits until every commit has arrived; their latencies, sorted.
    async fn latencies(
        self,
        committed: &[((Uuid, u64), Instant)],
        timeout: Duration,
    ) -> Vec<Duration> {
        let arrived = self.arrived.clone();
        let mut latencies = wait_until(timeout, "the live topic to show every commit", || {
            let arrived = arrived.clone();
            async move {
                let arrived = arrived.lock().unwrap();
                committed
                    .iter()
                    .map(|(key, at)| {
                        arrived
                            .get(key)
                            .map(|seen| seen.saturating_duration_since(*at))
                            .ok_or_else(|| format!("{key:?} not on the live topic yet"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            }
        })
        .await;
        self.task.abort();
        latencies.sort();
        latencies
    }
}

// ---------------------------------------------------------------------------------------------
// Interrupted, killed, resumed
// ---------------------------------------------------------------------------------------------

on_cluster_with! {
    an_interrupted_or_killed_republish_resumes_from_its_checkpoint_without_a_gap:
        ["again"] => resumed_republish,
}

async fn resumed_republish(c: &mut Cluster) {
    let config = config_of(c);
    let node = c.start(&config, &[Role::Api, Role::Relay]).await;
    let tag = c.tag().to_owned();
    write_history(&node.router, &tag, 30).await;
    let log = node.log();
    let events = settled_log(c, &log).await;
    let topic = format!("{}.again", c.topic);
    let mut slow = args(&topic);
    slow.rate = Some(40);

    // Interrupted (Ctrl-C): what is acknowledged is saved, and the run says so.
    let started = Instant::now();
    let e = republish(
        &config,
        &slow,
        &|_| {},
        tokio::time::sleep(Duration::from_millis(700)),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(e.code, "INTERRUPTED", "{e}");
    let rows = checkpoints(c).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (first_stop, published) = (rows[0].2.parse::<Position>().unwrap(), rows[0].3);
    // `--rate 40`: never more than 40 a second, and one batch (a tenth of a second's) ahead.
    let allowed = 40.0 * elapsed.as_secs_f64() + 4.0;
    assert!(
        published as f64 <= allowed,
        "{published} events published in {elapsed:?} at --rate 40"
    );
    assert_eq!(rows[0].4, "interrupted");
    assert!(e.message.contains(&first_stop.to_string()), "{e}");
    assert!(
        published > 0 && (published as usize) < events.len(),
        "{rows:?}"
    );
    assert!(first_stop > Position::START && first_stop < events.last().unwrap().position);

    // Killed mid-run (no chance to save anything more): the checkpoint says it was
    // publishing, and stands at what Kafka acknowledged.
    let killed = {
        let (config, slow) = (config.clone(), slow.clone());
        tokio::spawn(async move { run(&config, &slow).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    killed.abort();
    let _ = killed.await;
    let rows = checkpoints(c).await;
    let second_stop = rows[0].2.parse::<Position>().unwrap();
    assert_eq!(rows[0].4, "publishing", "{rows:?}");
    assert!(second_stop >= first_stop, "{rows:?}");

    // Run again: it resumes after the checkpoint and finishes.
    let done = run(&config, &args(&topic)).await.expect("the resumed run");
    assert_eq!(done.resumed_after, Some(second_stop));
    assert_eq!(done.through, events.last().unwrap().position);
    let expected: BTreeSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    let records = read_topic(&c.brokers, &topic, &expected).await;
    assert_ordered_per_user(&records);
    assert_eq!(
        event_ids(&records),
        expected,
        "a gap, or events from elsewhere"
    );
    // Duplicates only at the seams: events handed over after a saved checkpoint, never one
    // at or before the first.
    let dups = duplicated(&records);
    for d in &dups {
        assert!(
            d.position > first_stop,
            "{} duplicated before the seam",
            d.position
        );
    }
    eprintln!(
        "{} events, {} duplicates at the seams",
        events.len(),
        dups.len()
    );
    let rows = checkpoints(c).await;
    assert_eq!(rows[0].4, "finished", "{rows:?}");
    assert_eq!(rows[0].5, None, "{rows:?}");

    // Once finished, the same command publishes only what the log gained since.
    let later = create_user(&node.router, &format!("later@{tag}.example.com"), "Later").await;
    let log_now = settled_log(c, &log).await;
    let again = run(&config, &args(&topic))
        .await
        .expect("a run after the end");
    assert_eq!(again.published, 1, "{again:?}");
    assert_eq!(again.resumed_after, Some(done.through));
    let tail = read_topic(
        &c.brokers,
        &topic,
        &log_now.iter().map(|e| e.event_id).collect(),
    )
    .await;
    let last = tail
        .iter()
        .filter_map(Record::envelope)
        .filter(|e| e.aggregate_id == later);
    assert_eq!(last.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Selections
// ---------------------------------------------------------------------------------------------

on_cluster_with! {
    types_from_and_to_select_exactly_what_they_say:
        ["some", "from"] => selections,
}

async fn selections(c: &mut Cluster) {
    let config = config_of(c);
    let node = c.start(&config, &[Role::Api, Role::Relay]).await;
    write_history(&node.router, c.tag(), 12).await;
    let events = settled_log(c, &node.log()).await;
    let (from, to) = (events[4].position, events[events.len() - 5].position);
    let types = ["ProfileUpdated", "AccountDeleted"];
    let expected: Vec<&EventEnvelope> = events
        .iter()
        .filter(|e| e.position >= from && e.position <= to)
        .filter(|e| types.contains(&e.event_type.as_str()))
        .collect();
    assert!(
        expected.iter().any(|e| e.event_type == "AccountDeleted")
            && expected.iter().any(|e| e.event_type == "ProfileUpdated"),
        "the control: both types are in the range"
    );
    let topic = format!("{}.some", c.topic);
    let some = RepublishArgs {
        from: Some(from.to_string()),
        to: Some(to.to_string()),
        types: types.iter().map(|t| (*t).to_owned()).collect(),
        ..args(&topic)
    };
    let total = Mutex::new(None);
    let done = republish(
        &config,
        &some,
        &|p| {
            total.lock().unwrap().get_or_insert(p.total);
        },
        std::future::pending(),
    )
    .await
    .expect("the republish of a selection");
    assert_eq!(done.published, expected.len() as u64);
    assert_eq!(total.into_inner().unwrap(), Some(expected.len() as u64));
    let ids: BTreeSet<Uuid> = expected.iter().map(|e| e.event_id).collect();
    let records = read_topic(&c.brokers, &topic, &ids).await;
    assert_eq!(
        event_ids(&records),
        ids,
        "other events than the selection's"
    );
    assert_eq!(records.len(), ids.len(), "duplicates");
    // In commit order within each partition.
    let mut by_partition: BTreeMap<i32, Vec<(i64, Position)>> = BTreeMap::new();
    for r in &records {
        by_partition
            .entry(r.partition)
            .or_default()
            .push((r.offset, r.envelope().unwrap().position));
    }
    for (p, mut v) in by_partition {
        v.sort();
        assert!(
            v.windows(2).all(|w| w[0].1 < w[1].1),
            "partition {p}: {v:?}"
        );
    }

    // `--from` alone, inclusive: from that event to the end of the log.
    let topic = format!("{}.from", c.topic);
    let tail = RepublishArgs {
        from: Some(to.to_string()),
        ..args(&topic)
    };
    let done = run(&config, &tail)
        .await
        .expect("the republish from a position");
    let expected: BTreeSet<Uuid> = events
        .iter()
        .filter(|e| e.position >= to)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(done.published, expected.len() as u64);
    let records = read_topic(&c.brokers, &topic, &expected).await;
    assert_eq!(event_ids(&records), expected);
    // Each selection keeps a checkpoint of its own.
    let rows = checkpoints(c).await;
    let selections: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        selections.contains(&format!("from={to};to=end;types=all").as_str()),
        "{rows:?}"
    );
    assert!(
        selections
            .contains(&format!("from={from};to={to};types=AccountDeleted,ProfileUpdated").as_str()),
        "{rows:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input, a broker that is down or dies, embedded mode
// ---------------------------------------------------------------------------------------------

on_cluster_with! {
    bad_input_and_a_broker_that_is_down_get_coded_errors_and_write_nothing:
        ["never", "never!"] => bad_input,
}

async fn bad_input(c: &mut Cluster) {
    let config = config_of(c);
    let node = c.start(&config, &[Role::Api, Role::Relay]).await;
    write_history(&node.router, c.tag(), 3).await;
    let events = settled_log(c, &node.log()).await;
    let (first, last) = (events[0].position, events.last().unwrap().position);
    let never = format!("{}.never", c.topic);
    let nowhere = Position::new(last.commit + 1000, last.global + 1000).to_string();

    let refused = |code: &'static str| {
        move |r: Result<Republished, CodedError>| {
            let e = r.expect_err("refused");
            assert_eq!(e.code, code, "{e}");
            assert!(e.to_string().starts_with(&format!("{code}: ")), "{e}");
            e
        }
    };
    let e = refused("UNKNOWN_POSITION")(
        run(
            &config,
            &RepublishArgs {
                from: Some(nowhere.clone()),
                ..args(&never)
            },
        )
        .await,
    );
    assert!(e.message.contains(&nowhere), "{e}");
    refused("UNKNOWN_POSITION")(
        run(
            &config,
            &RepublishArgs {
                to: Some(nowhere),
                ..args(&never)
            },
        )
        .await,
    );
    refused("INVALID_POSITION")(
        run(
            &config,
            &RepublishArgs {
                from: Some("last week".into()),
                ..args(&never)
            },
        )
        .await,
    );
    let e = refused("INVALID_RANGE")(
        run(
            &config,
            &RepublishArgs {
                from: Some(last.to_string()),
                to: Some(first.to_string()),
                ..args(&never)
            },
        )
        .await,
    );
    assert!(e.message.contains("is after"), "{e}");
    refused("UNKNOWN_EVENT_TYPE")(
        run(
            &config,
            &RepublishArgs {
                types: vec!["UserRenamed".into()],
                ..args(&never)
            },
        )
        .await,
    );
    let bad_name = format!("{}.never!", c.topic);
    let e = refused("INVALID_TOPIC")(run(&config, &args(&bad_name)).await);
    assert!(e.message.contains(&bad_name), "{e}");
    // The live topic exists with 4 partitions.
    let e = refused("PARTITIONS_MISMATCH")(
        run(
            &config,
            &RepublishArgs {
                partitions: Some(PARTITIONS + 1),
                ..args(&c.topic)
            },
        )
        .await,
    );
    assert!(
        e.message.contains(&format!("{PARTITIONS} partitions")),
        "{e}"
    );
    // A broker that does not answer.
    let down = pcf::Config {
        kafka_brokers: Some(format!("127.0.0.1:{}", free_port())),
        ..config.clone()
    };
    let started = Instant::now();
    let e = refused("KAFKA_UNAVAILABLE")(run(&down, &args(&never)).await);
    eprintln!(
        "a broker that is down answered in {:?}: {e}",
        started.elapsed()
    );

    // Nothing was written: no checkpoint, no topic.
    assert_eq!(checkpoints(c).await, vec![]);
    let made = topic_partitions(&c.brokers, &[&never, &bad_name]).await;
    assert!(made.is_empty(), "topics made by refused runs: {made:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_dies_mid_run_leaves_a_checkpoint_that_says_so() {
    let kafka = PrivateKafka::start().await;
    let mut cluster = Cluster::create().await;
    cluster.use_private_kafka(kafka.brokers());
    crate::support::run(cluster, async |c| broker_dies(c, kafka).await).await;
}

async fn broker_dies(c: &mut Cluster, mut kafka: PrivateKafka) {
    let config = config_of(c);
    let node = c.start(&config, &[Role::Api]).await;
    write_history(&node.router, c.tag(), 20).await;
    let events = settled_log(c, &node.log()).await;
    let topic = "replay.dies";
    let slow = RepublishArgs {
        rate: Some(20),
        ..args(topic)
    };
    let running = {
        let config = config.clone();
        tokio::spawn(async move { run(&config, &slow).await })
    };
    // Killed once the run has published a little.
    wait_until(
        Duration::from_secs(60),
        "a first acknowledged batch",
        || async {
            let rows = checkpoints(c).await;
            match rows.first() {
                Some(r) if r.3 > 0 => Ok(()),
                _ => Err(format!("{rows:?}")),
            }
        },
    )
    .await;
    kafka.kill();
    let e = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the run ends once deliveries time out")
        .expect("the run's task")
        .unwrap_err();
    assert_eq!(e.code, "KAFKA_UNAVAILABLE", "{e}");
    let rows = checkpoints(c).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (position, published, state, error) = (&rows[0].2, rows[0].3, &rows[0].4, &rows[0].5);
    assert_eq!(state, "interrupted");
    assert!(
        error.as_deref().is_some_and(|e| e.contains("publishing")),
        "{rows:?}"
    );
    assert!(
        published > 0 && (published as usize) < events.len(),
        "{rows:?}"
    );
    assert!(e.message.contains(position.as_str()), "{e}");
    // What the checkpoint counts is what the topic holds, at least. (A crashed broker's
    // high watermarks can lag until each partition's next write: one is made.)
    kafka.restart().await;
    eprintln!("after the restart: {}", partition_report(&c.brokers, topic));
    nudge_partitions(&c.brokers, topic).await;
    let acknowledged: BTreeSet<Uuid> = events
        .iter()
        .filter(|e| e.position.to_string() <= *position)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(acknowledged.len() as i64, published);
    let records = read_topic_explained(&c.brokers, topic, &acknowledged, async |_| {
        partition_report(&c.brokers, topic)
    })
    .await;
    assert_ordered_per_user(&events_only(&records));
    // And the same command finishes the job.
    let done = run(&config, &args(topic))
        .await
        .expect("the run after the restart");
    assert_eq!(
        done.resumed_after.map(|p| p.to_string()).as_ref(),
        Some(position)
    );
    let all: BTreeSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    let records = read_topic(&c.brokers, topic, &all).await;
    assert_ordered_per_user(&events_only(&records));
}

/// `records` without the messages `nudge_partitions` wrote.
fn events_only(records: &[Record]) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.key.as_deref() != Some(NUDGE_KEY))
        .cloned()
        .collect()
}

#[test]
fn embedded_mode_refuses_republish_with_a_code_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pcf"))
        .args(["events", "republish", "--topic", "pcf.users.v2"])
        .current_dir(dir.path())
        .env_clear()
        .env("PCF_DATA_DIR", &data)
        .env("PCF_LOG", "warn")
        .output()
        .expect("running pcf");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("KAFKA_NOT_CONFIGURED: "), "{stderr}");
    assert!(stderr.contains("PCF_KAFKA_BROKERS"), "{stderr}");
    assert!(!data.exists(), "the data directory was created");
    // Bad arguments are refused by the command line itself.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pcf"))
        .args(["events", "republish", "--topic", "t", "--rate", "0"])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .expect("running pcf");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
}

// ---------------------------------------------------------------------------------------------
// Switching the live topic (docs/operations.md), while commands run
// ---------------------------------------------------------------------------------------------

on_cluster_with! {
    the_documented_topic_switch_loses_nothing_while_commands_run:
        ["v2"] => topic_switch,
}

async fn topic_switch(c: &mut Cluster) {
    let old = c.topic.clone();
    let new = format!("{old}.v2");
    let config = config_of(c);
    let api = c.start(&config, &[Role::Api]).await;
    let relay = c.start(&config, &[Role::Relay]).await;
    let tag = c.tag().to_owned();
    write_history(&api.router, &tag, 6).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (router, writing, tag) = (api.router.clone(), writing.clone(), tag.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                let id = create_user(&router, &format!("w{n}@{tag}.example.com"), "W").await;
                update_profile(&router, id, json!({ "displayName": format!("W {n}") })).await;
                if n % 5 == 0 {
                    delete_account(&router, id).await;
                }
                n += 1;
            }
            n
        })
    };
    let pause = || tokio::time::sleep(Duration::from_millis(1500));
    pause().await;

    // 1. Republish the log into the new topic, with another partition count.
    let mut into_new = args(&new);
    into_new.partitions = Some(PARTITIONS - 1);
    let replayed = run(&config, &into_new).await.expect("the republish");
    pause().await;
    // 2. The relay publishes to both: relay processes with the new topic as an extra topic
    //    replace the old ones.
    let both = pcf::Config {
        kafka_extra_topics: vec![new.clone()],
        ..config.clone()
    };
    let relay_both = c.start(&both, &[Role::Relay]).await;
    c.stop(&relay).await;
    pause().await;
    // 3. Consumers move to the new topic (and 4.) the event topic switches, the old one
    //    still fed while the last consumers move.
    let switched = pcf::Config {
        kafka_topic: new.clone(),
        kafka_extra_topics: vec![old.clone()],
        ..config.clone()
    };
    let relay_switched = c.start(&switched, &[Role::Relay]).await;
    c.stop(&relay_both).await;
    pause().await;
    // 5. The old topic is retired.
    let retired = pcf::Config {
        kafka_topic: new.clone(),
        ..config.clone()
    };
    let _relay_new = c.start(&retired, &[Role::Relay]).await;
    c.stop(&relay_switched).await;
    pause().await;
    writing.store(false, Ordering::Relaxed);
    let written = writer.await.expect("the writer");
    assert!(
        written >= 5,
        "too few commands during the switch: {written}"
    );

    // Every stored event is on the new topic, each user's in sequence order.
    let stored = stored_event_ids(&c.pool).await;
    let log = api.log();
    let pool = c.pool.clone();
    let explain = async |missing: Vec<Uuid>| {
        let positions: Vec<String> = whole_log(&log)
            .await
            .iter()
            .filter(|e| missing.contains(&e.event_id))
            .map(|e| e.position.to_string())
            .collect();
        let relays: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, lpad(to_hex(transaction_id::text::bigint), 16, '0') || \
                    lpad(to_hex(global_position), 16, '0') FROM relay_checkpoints",
        )
        .fetch_all(&pool)
        .await
        .expect("relay checkpoints");
        format!(
            "the republish went through {}; missing positions (readable ones) {positions:?}; \
             relay checkpoints {relays:?}",
            replayed.through
        )
    };
    let records = read_topic_explained(&c.brokers, &new, &stored, explain).await;
    assert_ordered_per_user(&records);
    assert_eq!(event_ids(&records), stored);
    let partitions = topic_partitions(&c.brokers, &[&new, &format!("{new}.dlq")]).await;
    assert_eq!(partitions.get(&new), Some(&((PARTITIONS - 1) as usize)));
    assert!(
        partitions.contains_key(&format!("{new}.dlq")),
        "{partitions:?}"
    );
    // The relay of the new topic went on from the republish: what it published first
    // follows the replay without repeating it all.
    let replays = records
        .iter()
        .filter(|r| r.headers.contains_key("replay"))
        .count();
    let dups = duplicated(&records).len();
    eprintln!(
        "{} events: {replays} messages replayed, {} by the relays, {dups} duplicates",
        stored.len(),
        records.len() - replays
    );
    assert!(replays > 0 && records.len() > replays);
    assert!(dups < replays, "the relay published the whole log again");
}
