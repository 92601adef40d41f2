//! Kafka for the tests: a topic and consumer-group prefix per test (deleted at teardown),
//! reading a whole topic, plain producers and group consumers, and a broker of a test's own
//! for the tests that take Kafka down.

use super::auth::b64url;
use super::cleanup::Teardown;
use super::services::{env_or, free_port, port_open, shared_brokers, ChildServer};
use super::wait::wait_until;
use pcf_domain::EventEnvelope;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The topic and consumer groups of one test on a broker, deleted at teardown.
pub struct KafkaTopic {
    pub brokers: String,
    /// `pcf.test.<id>`; its dead letters go to `<topic>.dlq`.
    pub topic: String,
    /// The prefix of the projectors' consumer groups.
    pub group_prefix: String,
    /// Groups of the test's own besides the projectors'.
    pub extra_groups: Vec<String>,
}

impl KafkaTopic {
    /// Names of the test `id` on the shared broker.
    pub fn new(id: &str) -> Self {
        Self {
            brokers: shared_brokers(),
            topic: format!("pcf.test.{id}"),
            group_prefix: format!("t{id}-"),
            extra_groups: Vec::new(),
        }
    }

    /// Deletes the topic, its dead-letter topic and the groups (best effort: groups that
    /// never formed are not found).
    pub async fn delete(&self) {
        let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
        {
            Ok(a) => a,
            Err(e) => {
                eprintln!("no Kafka admin client for cleanup: {e}");
                return;
            }
        };
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let dlq = format!("{}.dlq", self.topic);
        if let Err(e) = admin
            .delete_topics(&[self.topic.as_str(), dlq.as_str()], &options)
            .await
        {
            eprintln!("could not delete topics {}, {dlq}: {e}", self.topic);
        }
        let mut groups: Vec<String> = pcf::app::PROJECTIONS
            .iter()
            .map(|p| format!("{}{p}", self.group_prefix))
            .collect();
        groups.extend(self.extra_groups.iter().cloned());
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let _ = admin.delete_groups(&groups, &options).await;
    }
}

impl Teardown for KafkaTopic {
    async fn teardown(self) {
        self.delete().await;
    }
}

/// Fails the test, naming the fix, unless a broker accepts a TCP connection.
pub fn require_kafka(brokers: &str) {
    use std::net::{TcpStream, ToSocketAddrs};
    let mut errors = Vec::new();
    for broker in brokers.split(',').map(str::trim) {
        let addrs = match broker.to_socket_addrs() {
            Ok(a) => a,
            Err(e) => {
                errors.push(format!("{broker}: {e}"));
                continue;
            }
        };
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(_) => return,
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
    }
    panic!(
        "Kafka is unreachable at {brokers} ({}); this test needs it: start it with \
         `scripts/services.sh up` or point PCF_TEST_KAFKA_BROKERS at a broker",
        errors.join("; ")
    );
}

/// A message as read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }

    /// The event envelope carried, if the payload is one.
    pub fn envelope(&self) -> Option<EventEnvelope> {
        serde_json::from_slice(&self.payload).ok()
    }
}

/// The ids of the events among `records`.
pub fn event_ids(records: &[Record]) -> BTreeSet<Uuid> {
    records
        .iter()
        .filter_map(Record::envelope)
        .map(|e| e.event_id)
        .collect()
}

/// Reads a whole topic from the beginning, every partition, without a consumer group.
pub struct TopicTail {
    consumer: StreamConsumer,
    pub topic: String,
    pub records: Vec<Record>,
}

impl TopicTail {
    pub async fn new(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("tail-{}", Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("a Kafka consumer");
        let partitions = Self::partitions(brokers, topic).await;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("a partition offset");
        }
        consumer.assign(&tpl).expect("assigning the partitions");
        Self {
            consumer,
            topic: topic.to_owned(),
            records: Vec::new(),
        }
    }

    /// The partitions of `topic`, once its metadata names some.
    pub async fn partitions(brokers: &str, topic: &str) -> Vec<i32> {
        let client: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("a Kafka client");
        wait_until(Duration::from_secs(30), "the topic's metadata", || async {
            let metadata = tokio::task::block_in_place(|| {
                client
                    .fetch_metadata(Some(topic), Duration::from_secs(2))
                    .map_err(|e| e.to_string())
            })?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                Err(format!("topic {topic} has no partitions yet"))
            } else {
                Ok(partitions)
            }
        })
        .await
    }

    /// Reads until `done(records)` holds; panics after `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Record]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.records) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {timeout:?} waiting for {what} on {}; read {} messages",
                self.topic,
                self.records.len()
            );
            let wait = (deadline - now).min(Duration::from_millis(500));
            if let Ok(m) = tokio::time::timeout(wait, self.consumer.recv()).await {
                match m {
                    Ok(m) => self.records.push(Record::from_message(&m)),
                    Err(e) => eprintln!("consume error (retrying): {e}"),
                }
            }
        }
    }

    /// Reads whatever arrives within `period`.
    pub async fn drain_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(Ok(m)) = tokio::time::timeout(left, self.consumer.recv()).await {
                self.records.push(Record::from_message(&m));
            }
        }
    }

    /// The envelopes read so far, in the order read.
    pub fn envelopes(&self) -> Vec<EventEnvelope> {
        self.records.iter().filter_map(Record::envelope).collect()
    }
}

/// Where each partition of `topic` stands: leader, in-sync replicas, low and high
/// watermarks (what a consumer can read ends at the high one).
pub fn partition_report(brokers: &str, topic: &str) -> String {
    let consumer: rdkafka::consumer::BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
    {
        Ok(c) => c,
        Err(e) => return format!("no client: {e}"),
    };
    let timeout = Duration::from_secs(5);
    let metadata =
        match tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), timeout)) {
            Ok(m) => m,
            Err(e) => return format!("no metadata: {e}"),
        };
    let mut lines = Vec::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let marks =
                tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, p.id(), timeout));
            lines.push(format!(
                "partition {}: leader {}, isr {:?}, error {:?}, watermarks {marks:?}",
                p.id(),
                p.leader(),
                p.isr(),
                p.error()
            ));
        }
    }
    lines.join("; ")
}

/// The key of the messages `nudge_partitions` writes.
pub const NUDGE_KEY: &str = "pcf-test-nudge";

/// Writes one message that is no event (keyed `NUDGE_KEY`) into every partition of `topic`.
/// A broker that crashed takes its partitions' high watermarks from a checkpoint it writes
/// every few seconds, so what was acknowledged after it can stay out of consumers' sight
/// until the partition's next write moves the watermark to the log's end (live traffic
/// does that).
pub async fn nudge_partitions(brokers: &str, topic: &str) {
    let partitions = TopicTail::partitions(brokers, topic).await;
    let producer = producer(brokers);
    for p in partitions {
        let record = rdkafka::producer::FutureRecord::to(topic)
            .partition(p)
            .key(NUDGE_KEY)
            .payload("nudge");
        if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
            panic!(
                "writing into partition {p} of {topic}: {e}; {}",
                partition_report(brokers, topic)
            );
        }
    }
}

/// A plain producer for tests that inject messages.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("a Kafka producer")
}

/// A consumer in a projector's consumer group (as the projector configures it).
pub fn group_consumer(brokers: &str, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .expect("a group consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    consumer
}

/// A single-node KRaft Kafka broker of the test's own, on free ports with a temporary data
/// directory, run like `scripts/services.sh` runs the shared one.
pub struct PrivateKafka {
    pub server: ChildServer,
    pub controller_port: u16,
}

fn kafka_libs() -> PathBuf {
    let cache = std::env::var("PCF_CACHE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}/.cache/pcf",
                std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned())
            )
        });
    let version = env_or("PCF_KAFKA_VERSION", "4.1.1");
    PathBuf::from(cache)
        .join(format!("kafka-{version}"))
        .join("libs")
}

fn kafka_scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka")
}

/// A random Kafka cluster id: 16 bytes, URL-safe base64 without padding.
fn kafka_cluster_id() -> String {
    // As Kafka's own `Uuid.randomUuid()` does: an id starting with '-' would be read by the
    // storage tool as an option (1 in 64 ids).
    loop {
        let id = b64url(Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

impl PrivateKafka {
    /// Formats the storage and starts the broker; returns when it serves metadata.
    pub async fn start() -> Self {
        let mut kafka = Self::format();
        kafka.spawn().await;
        kafka
    }

    /// Picks the ports and formats the storage, without starting the broker. Like a
    /// production cluster, the broker does not create topics on first use: the application
    /// must create them.
    pub fn format() -> Self {
        let libs = kafka_libs();
        assert!(
            libs.join(".complete").exists(),
            "Kafka's jars are not cached in {} (run scripts/services.sh up)",
            libs.display()
        );
        let kafka = Self {
            server: ChildServer::new(),
            controller_port: free_port(),
        };
        let data = kafka.server.dir.path().join("data");
        let config = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{c}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={d}\n\
             auto.create.topics.enable=false\n\
             num.partitions=1\n\
             default.replication.factor=1\n\
             min.insync.replicas=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n",
            p = kafka.server.port,
            c = kafka.controller_port,
            d = data.display()
        );
        std::fs::write(kafka.config_path(), config).expect("writing server.properties");
        let output = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                kafka_scripts().join("tools-log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .args(["kafka.tools.StorageTool", "format", "--standalone", "-t"])
            .arg(kafka_cluster_id())
            .arg("-c")
            .arg(kafka.config_path())
            .output()
            .expect("running kafka.tools.StorageTool");
        assert!(
            output.status.success(),
            "formatting the private broker's storage failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        kafka
    }

    /// Starts a formatted broker for the first time.
    pub async fn launch(&mut self) {
        self.spawn().await;
    }

    fn config_path(&self) -> PathBuf {
        self.server.dir.path().join("server.properties")
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }

    async fn spawn(&mut self) {
        let logs = self.server.dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("a log directory");
        let mut command = Command::new("java");
        command
            .args([
                "-Xms128m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xshare:auto",
                "-Djava.awt.headless=true",
            ])
            .arg(format!("-Dkafka.logs.dir={}", logs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                kafka_scripts().join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", kafka_libs().display()))
            .arg("kafka.Kafka")
            .arg(self.config_path());
        self.server.spawn(
            &mut command,
            &logs.join("kafka.out"),
            "the private Kafka broker",
        );
        let brokers = self.brokers();
        let port = self.server.port;
        let started = Instant::now();
        let probe: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("a probe client");
        wait_until(Duration::from_secs(90), "the private Kafka broker", || {
            let alive = self.server.alive();
            let probe = &probe;
            async move {
                assert!(alive, "the private Kafka broker exited during start");
                if !port_open(port) {
                    return Err("the port is not open yet".to_owned());
                }
                let metadata = tokio::task::block_in_place(|| {
                    probe
                        .fetch_metadata(None, Duration::from_secs(2))
                        .map_err(|e| e.to_string())
                })?;
                if metadata.brokers().is_empty() {
                    return Err("no broker in the metadata yet".to_owned());
                }
                Ok(())
            }
        })
        .await;
        eprintln!(
            "private Kafka on {brokers} ready after {:?}",
            started.elapsed()
        );
    }

    /// Kills the broker (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts the broker again on the same ports and data directory.
    pub async fn restart(&mut self) {
        assert!(!self.server.is_running(), "kill it first");
        self.spawn().await;
    }
}
