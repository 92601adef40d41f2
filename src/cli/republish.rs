//! `pcf events republish`: the log, or a selection of it, published again onto a Kafka topic
//! (created if it does not exist), with a progress bar; resumable from its checkpoint.
//! Everything the command line says is checked before anything is written: that Kafka is
//! configured, the positions and types, the broker, the topic's name and partitions. Each
//! refusal carries a stable code (`CodedError`).

use pcf_command::kafka::{prepare_topic, KafkaConfig, KafkaPublisher, TopicError};
use pcf_command::republish::{RepublishProgress, Republished};
use pcf_command::{RepublishConfig, RepublishError, Republisher, Selection};
use pcf_domain::Position;
use std::future::Future;
use std::sync::Arc;

use super::args::RepublishArgs;
use crate::config::Config;

/// The event types the log holds, which `--types` may name.
pub const EVENT_TYPES: [&str; 4] = [
    "UserCreated",
    "ProfileUpdated",
    "EmailChanged",
    "AccountDeleted",
];

/// A refusal or failure of `pcf events republish`, with its stable code; shown as
/// `CODE: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CodedError {
    pub code: &'static str,
    pub message: String,
}

fn coded(code: &'static str, message: impl Into<String>) -> CodedError {
    CodedError {
        code,
        message: message.into(),
    }
}

impl From<RepublishError> for CodedError {
    fn from(e: RepublishError) -> Self {
        coded(e.code(), e.to_string())
    }
}

impl From<TopicError> for CodedError {
    fn from(e: TopicError) -> Self {
        let code = match &e {
            TopicError::Unavailable { .. } => "KAFKA_UNAVAILABLE",
            TopicError::Refused { .. } => "INVALID_TOPIC",
            TopicError::Partitions { .. } => "PARTITIONS_MISMATCH",
        };
        coded(code, e.to_string())
    }
}

/// `pcf events republish`, with a progress bar on standard error, interrupted (its
/// checkpoint saved) by Ctrl-C.
pub async fn command(config: &Config, args: RepublishArgs) -> anyhow::Result<()> {
    let bar = super::progress_bar(&format!("republish to {}", args.topic), "events");
    let progress = |p: RepublishProgress| {
        bar.set_length(p.total);
        bar.set_position(p.published);
    };
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let done = republish(config, &args, &progress, interrupted).await;
    bar.abandon();
    let done = done?;
    let resumed = done
        .resumed_after
        .map(|p| format!(", resumed after {p}"))
        .unwrap_or_default();
    println!(
        "{} events published onto {}{resumed}; the selection is published through {} \
         ({} events over every run)",
        done.published, args.topic, done.through, done.published_in_all
    );
    Ok(())
}

/// Republishes what `args` select onto their topic, reporting progress, until done or
/// until `stop` completes (the checkpoint then says where it stopped).
pub async fn republish(
    config: &Config,
    args: &RepublishArgs,
    progress: &(dyn Fn(RepublishProgress) + Sync),
    stop: impl Future<Output = ()>,
) -> Result<Republished, CodedError> {
    let Some(brokers) = config.kafka_brokers.clone() else {
        return Err(coded(
            "KAFKA_NOT_CONFIGURED",
            "pcf events republish publishes to Kafka, and none is configured (embedded mode \
             has an in-process bus only): set PCF_KAFKA_BROKERS and PCF_DATABASE_URL",
        ));
    };
    if config.database_url.is_none() {
        return Err(coded(
            "DATABASE_NOT_CONFIGURED",
            "Kafka goes with the PostgreSQL event store: set PCF_DATABASE_URL",
        ));
    }
    if args.topic.trim().is_empty() {
        return Err(coded("INVALID_TOPIC", "--topic: a topic name is needed"));
    }
    let selection = selection(args)?;
    let storage = crate::app::open_store(config)
        .await
        .map_err(|e| coded("UNAVAILABLE", format!("{e:#}")))?;
    let mut kafka = KafkaConfig::new(brokers.clone(), args.topic.clone());
    kafka.replay = true;
    let publisher = KafkaPublisher::new(kafka).map_err(|e| {
        coded(
            "KAFKA_UNAVAILABLE",
            format!("creating a Kafka producer for {brokers}: {e}"),
        )
    })?;
    let mut options = RepublishConfig::new(args.topic.clone(), selection);
    options.rate = args.rate;
    let republisher = Republisher::new(storage.store, Arc::new(publisher), options);
    // The selection and the topic are checked before the topic is made or anything is
    // saved, so that a refusal leaves nothing behind.
    republisher.check().await?;
    prepare_topic(
        &brokers,
        &args.topic,
        args.partitions,
        config.kafka_partitions,
    )
    .await?;
    Ok(republisher.run(progress, stop).await?)
}

/// The selection that `args` name, their positions and types checked for form.
fn selection(args: &RepublishArgs) -> Result<Selection, CodedError> {
    let position = |flag: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|p| {
                p.parse::<Position>().map_err(|_| {
                    coded(
                        "INVALID_POSITION",
                        format!(
                            "--{flag} {p:?} is not a position as PCF prints them \
                             (32 hexadecimal digits)"
                        ),
                    )
                })
            })
            .transpose()
    };
    let mut types = Vec::new();
    for t in args
        .types
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
    {
        if !EVENT_TYPES.contains(&t) {
            return Err(coded(
                "UNKNOWN_EVENT_TYPE",
                format!(
                    "--types: {t:?} is not an event type; choose among {}",
                    EVENT_TYPES.join(", ")
                ),
            ));
        }
        types.push(t.to_owned());
    }
    Ok(Selection {
        from: position("from", &args.from)?,
        to: position("to", &args.to)?,
        types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(from: Option<&str>, types: &[&str]) -> RepublishArgs {
        RepublishArgs {
            topic: "t".into(),
            from: from.map(str::to_owned),
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            ..RepublishArgs::default()
        }
    }

    #[test]
    fn a_malformed_position_or_an_unknown_type_is_refused_with_its_code() {
        let e = selection(&args(Some("12"), &[])).unwrap_err();
        assert_eq!(e.code, "INVALID_POSITION", "{e}");
        assert!(e.message.contains("--from \"12\""), "{e}");
        let e = selection(&args(None, &["UserCreated", "Nope"])).unwrap_err();
        assert_eq!(e.code, "UNKNOWN_EVENT_TYPE", "{e}");
        let ok = selection(&args(
            Some("0000000000000001000000000000000a"),
            &["UserCreated", " AccountDeleted"],
        ))
        .unwrap();
        assert_eq!(ok.from, Some(Position::new(1, 10)));
        assert_eq!(ok.types, ["UserCreated", "AccountDeleted"]);
    }

    #[tokio::test]
    async fn without_kafka_republish_is_refused_before_anything_is_opened() {
        let dir = std::env::temp_dir().join(format!("pcf-republish-{}", uuid::Uuid::new_v4()));
        let config = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let e = republish(&config, &args(None, &[]), &|_| {}, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(e.code, "KAFKA_NOT_CONFIGURED", "{e}");
        assert!(e.to_string().starts_with("KAFKA_NOT_CONFIGURED: "), "{e}");
        assert!(!dir.exists(), "the data directory was created");
    }
}
