//! Kafka being down is logged once per kind of failure, then at a bounded rate, not at every
//! reconnect of librdkafka.

use crate::support::*;
use crate::WHOLE_PROCESS;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kafka_is_logged_once_then_at_a_bounded_rate() {
    let _alone = WHOLE_PROCESS.lock().await;
    // librdkafka calls back from its own threads: only a global subscriber sees them, set
    // up as `pcf` sets its own (with the bridge from the `log` crate). Only Kafka's lines are
    // counted.
    use tracing_subscriber::util::SubscriberInitExt;
    let log = CapturedLog::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish()
        .try_init()
        .expect("the only global subscriber");
    // A loopback port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let brokers = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut text = String::new();
    run(TestDb::create().await, async |db| {
        let files = tempfile::tempdir().unwrap();
        let config = pcf::Config {
            database_url: Some(db.url.clone()),
            read_database_urls: vec![db.url.clone()],
            kafka_brokers: Some(brokers.clone()),
            kafka_topic: format!("pcf.down.{}", uuid::Uuid::new_v4().simple()),
            ..base_config(files.path())
        };
        let app = pcf::build(&config).await.expect("starting with Kafka down");
        tokio::time::sleep(Duration::from_secs(4)).await;
        text = log.text();
        // Stopping waits on Kafka's clients, which wait on the brokers; not what is tested.
        let _ = tokio::time::timeout(Duration::from_secs(2), app.shutdown()).await;
    })
    .await;

    let kafka: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("librdkafka") || l.contains(&brokers))
        .collect();
    // It is logged...
    assert!(
        !kafka.is_empty(),
        "nothing said about Kafka being down:\n{text}"
    );
    // ...once per kind of failure (the producer, the admin client and the consumers each
    // report theirs), not at every reconnect: about 50 lines in 4 s before.
    eprintln!("{}", kafka.join("\n"));
    assert!(
        kafka.len() <= 12,
        "{} lines about Kafka in 4 s:\n{}",
        kafka.len(),
        kafka.join("\n")
    );
}
