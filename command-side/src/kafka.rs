//! The relay's Kafka adapter: one topic per aggregate type, keyed by user id so that a user's
//! events stay ordered in one partition; idempotent producer with `acks=all`. The message of
//! an event (`EventMessage`) is built here once, for the live relay and for
//! `pcf events republish` alike, which also prepares its topic here (`prepare_topic`).

use async_trait::async_trait;
use pcf_adapters::kafka::{headers, QuietContext};
use pcf_domain::ports::{Acknowledgements, EventPublisher, PortError};
use pcf_domain::EventEnvelope;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::time::Duration;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// Partitions of the topic when PCF creates it.
    pub partitions: i32,
    /// How long one message may wait for acknowledgement before the batch fails.
    pub delivery_timeout: Duration,
    /// Marks every message as a replay of the log (the `replay` header): set by
    /// `pcf events republish`, never by the live relay.
    pub replay: bool,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            partitions: 12,
            delivery_timeout: Duration::from_secs(10),
            replay: false,
        }
    }

    /// The dead-letter topic beside the event topic.
    pub fn dead_letter_topic(&self) -> String {
        pcf_adapters::kafka::dead_letter_topic(&self.topic)
    }
}

/// The W3C `traceparent` of an event's Kafka message. When traces are exported, it names the
/// message's producer span (`publish`), a child of the span that appended the event (the
/// event's `metadata.traceparent`), so every consumer joins the command's trace. Otherwise it
/// is the event's stored trace context, or, for an event appended untraced, one derived from
/// it: the trace is its correlation id when that is a UUID (so one request's events share a
/// trace), else the event id; the span is the event's.
pub fn traceparent(event: &EventEnvelope) -> String {
    let stored = event.metadata.traceparent.as_deref();
    let span = tracing::debug_span!(
        "publish",
        otel.kind = "producer",
        event_id = %event.event_id,
        event_type = %event.event_type,
    );
    if let Some(parent) = stored {
        pcf_adapters::trace::set_parent(&span, parent);
    }
    if let Some(traceparent) = pcf_adapters::trace::traceparent_of(&span) {
        return traceparent;
    }
    if let Some(stored) = stored.filter(|s| pcf_adapters::trace::parse(s).is_some()) {
        return stored.to_owned();
    }
    let trace = event
        .metadata
        .correlation_id
        .as_deref()
        .and_then(|c| uuid::Uuid::parse_str(c).ok())
        .unwrap_or(event.event_id);
    let span = &event.event_id.simple().to_string()[16..];
    format!("00-{}-{}-01", trace.simple(), span)
}

/// The Kafka message of an event, as every PCF producer writes it: the user id as key, the
/// envelope as JSON value, and the headers of `docs/events.md` (with `replay` on a replay).
pub struct EventMessage {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
}

impl EventMessage {
    /// The message of `event`; `replay` adds the header that marks a replay of the log.
    pub fn of(event: &EventEnvelope, replay: bool) -> Result<Self, PortError> {
        let key = event.aggregate_id.to_string();
        let value = serde_json::to_vec(event).map_err(|e| PortError::Internal(e.to_string()))?;
        let trace = traceparent(event);
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::EVENT_TYPE,
                value: Some(event.event_type.as_bytes()),
            })
            .insert(Header {
                key: headers::EVENT_VERSION,
                value: Some(event.event_version.as_bytes()),
            })
            .insert(Header {
                key: headers::TRACEPARENT,
                value: Some(trace.as_bytes()),
            });
        if let Some(correlation) = &event.metadata.correlation_id {
            headers = headers.insert(Header {
                key: headers::CORRELATION_ID,
                value: Some(correlation.as_bytes()),
            });
        }
        if replay {
            headers = headers.insert(Header {
                key: headers::REPLAY,
                value: Some(headers::REPLAY_VALUE.as_bytes()),
            });
        }
        Ok(Self {
            key,
            value,
            headers,
        })
    }
}

/// The settings of PCF's event producer: idempotent, `acks=all`, lz4 batches.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        );
    client
}

/// Hands `record` to `producer`; while the producer's local queue is full, waits for
/// deliveries to drain it. The delivery completes when Kafka acknowledged the message.
pub async fn enqueue<C, K, P>(
    producer: &FutureProducer<C>,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    C: ClientContext + 'static,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Publishes envelopes to Kafka.
pub struct KafkaPublisher {
    producer: FutureProducer<QuietContext>,
    config: KafkaConfig,
}

impl KafkaPublisher {
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        let producer: FutureProducer<QuietContext> =
            producer_config(&config).create_with_context(QuietContext::default())?;
        Ok(Self { producer, config })
    }

    /// Creates the event topic and its dead-letter topic if they do not exist.
    pub async fn ensure_topics(&self) -> Result<(), KafkaError> {
        ensure_topics(&self.config).await
    }

    /// Succeeds when a broker answers with the topic's metadata.
    pub async fn ping(&self) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map(|_| ())
        })
        .await
        .map_err(|_| KafkaError::Canceled)?
    }
}

/// Creates the configured topics, leaving existing ones alone.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<QuietContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create_with_context(QuietContext::default())?;
    let dlq = config.dead_letter_topic();
    // Replication -1 takes the broker's default, so the same code fits one broker and many.
    let topics = [
        NewTopic::new(
            &config.topic,
            config.partitions,
            TopicReplication::Fixed(-1),
        ),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(-1)),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "creating topic failed");
                })
            }
        }
    }
    Ok(())
}

#[async_trait]
impl EventPublisher for KafkaPublisher {
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), PortError> {
        self.enqueue(events).await?.await
    }

    async fn enqueue(&self, events: &[EventEnvelope]) -> Result<Acknowledgements, PortError> {
        let mut deliveries = Vec::with_capacity(events.len());
        for event in events {
            let EventMessage {
                key,
                value,
                headers,
            } = EventMessage::of(event, self.config.replay)?;
            let record = FutureRecord::to(&self.config.topic)
                .key(&key)
                .payload(&value)
                .headers(headers);
            let delivery = enqueue(&self.producer, record)
                .await
                .map_err(|e| PortError::Unavailable(e.to_string()))?;
            deliveries.push(delivery);
        }
        // The idempotent producer keeps per-partition order across retries, and messages
        // leave in the order they were enqueued, so each user's events stay in sequence
        // whenever their acknowledgements are awaited.
        Ok(Box::pin(async move {
            for delivery in deliveries {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(PortError::Unavailable(e.to_string())),
                    Err(_) => return Err(PortError::Unavailable("delivery canceled".into())),
                }
            }
            Ok(())
        }))
    }
}

/// Why a topic cannot be published to (`prepare_topic`).
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("Kafka at {brokers} does not answer: {cause}")]
    Unavailable { brokers: String, cause: String },
    #[error("Kafka refuses the topic {topic:?}: {cause}")]
    Refused { topic: String, cause: String },
    #[error(
        "topic {topic} exists with {existing} partitions, not {asked}: choose another topic, \
         or leave --partitions out to publish into it as it is"
    )]
    Partitions {
        topic: String,
        existing: i32,
        asked: i32,
    },
}

/// How `prepare_topic` found the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicReady {
    /// Created with this many partitions.
    Created(i32),
    /// It existed, with this many partitions.
    Existed(i32),
}

/// Makes sure `topic` exists: created with `partitions` (else `default_partitions`) if it
/// does not, and, if it does and `partitions` is given, with that many partitions. Kafka is
/// asked first for its topics (which creates none, whatever the broker's auto-creation), so
/// that a broker that is down is told apart from a name it refuses, before anything is made.
pub async fn prepare_topic(
    brokers: &str,
    topic: &str,
    partitions: Option<i32>,
    default_partitions: i32,
) -> Result<TopicReady, TopicError> {
    let unavailable = |cause: String| TopicError::Unavailable {
        brokers: brokers.to_owned(),
        cause,
    };
    let admin: AdminClient<QuietContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create_with_context(QuietContext::default())
        .map_err(|e| unavailable(e.to_string()))?;
    let admin = std::sync::Arc::new(admin);
    let asking = admin.clone();
    let name = topic.to_owned();
    // librdkafka's metadata call blocks: off the runtime's threads.
    let existing = tokio::task::spawn_blocking(move || {
        let metadata = asking
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))?;
        Ok::<_, KafkaError>(
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len() as i32),
        )
    })
    .await
    .map_err(|e| unavailable(e.to_string()))?
    .map_err(|e| unavailable(e.to_string()))?;
    if let Some(existing) = existing {
        return match partitions {
            Some(asked) if asked != existing => Err(TopicError::Partitions {
                topic: topic.to_owned(),
                existing,
                asked,
            }),
            _ => Ok(TopicReady::Existed(existing)),
        };
    }
    let count = partitions.unwrap_or(default_partitions);
    let new = NewTopic::new(topic, count, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&[new], &options)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) => {}
            // Made meanwhile by another run: as if it had existed.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                return Ok(TopicReady::Existed(count));
            }
            Err((
                _,
                code @ (RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut),
            )) => {
                return Err(unavailable(code.to_string()));
            }
            Err((_, code)) => {
                return Err(TopicError::Refused {
                    topic: topic.to_owned(),
                    cause: code.to_string(),
                })
            }
        }
    }
    Ok(TopicReady::Created(count))
}
