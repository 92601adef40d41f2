//! `pcf events republish`: the log, or a selection of it, published again in commit order
//! through a publisher (Kafka, with the live relay's messages marked as a replay), at a
//! bounded rate, from a checkpoint of its own that moves only after the publisher
//! acknowledged. A run that stops for any reason is resumed after its checkpoint: nothing
//! is skipped, and what was handed over but not acknowledged comes again (at least once, as
//! on the live stream).

use pcf_domain::ports::{Acknowledgements, EventPublisher, LogQuery, PortError};
use pcf_domain::{EventEnvelope, Position};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{EventStore, RepublishCheckpoint, RepublishState, StoreError};

/// Which events of the log a republish publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The first position published (an event's), else the start of the log.
    pub from: Option<Position>,
    /// The last position published (an event's), else the end of the log when a run starts.
    pub to: Option<Position>,
    /// Only these event types (all when empty).
    pub types: Vec<String>,
}

impl Selection {
    /// The name of the selection in its checkpoint: the same selection, written in any
    /// order, has the same name.
    pub fn key(&self) -> String {
        let mut types = self.types.clone();
        types.sort();
        types.dedup();
        let bound = |p: Option<Position>, none: &str| p.map_or(none.to_owned(), |p| p.to_string());
        format!(
            "from={};to={};types={}",
            bound(self.from, "start"),
            bound(self.to, "end"),
            if types.is_empty() {
                "all".to_owned()
            } else {
                types.join(",")
            }
        )
    }

    /// The whole log: the selection whose checkpoint a relay of the topic may continue from.
    pub fn whole_log() -> Self {
        Self::default()
    }
}

/// How a republish runs.
#[derive(Debug, Clone)]
pub struct RepublishConfig {
    /// Where the checkpoint is kept (the topic's name).
    pub topic: String,
    pub selection: Selection,
    /// At most this many events a second; unlimited when `None`.
    pub rate: Option<u32>,
    /// Events read and handed over at once (fewer under a low `rate`).
    pub batch_size: usize,
}

impl RepublishConfig {
    pub fn new(topic: impl Into<String>, selection: Selection) -> Self {
        Self {
            topic: topic.into(),
            selection,
            rate: None,
            batch_size: 1000,
        }
    }
}

/// Why a republish did not finish. Each has a stable code (`code`).
#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("--{flag} {position}: no event of the log is at this position")]
    UnknownPosition {
        flag: &'static str,
        position: Position,
    },
    #[error("--from {from} is after --to {to}")]
    FromAfterTo { from: Position, to: Position },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the log: {0}")]
    Read(PortError),
    #[error(
        "publishing: {cause}; everything up to {checkpoint} is acknowledged and saved, \
         run the same command again to resume"
    )]
    Publish {
        cause: PortError,
        checkpoint: Position,
    },
    #[error(
        "interrupted; everything up to {checkpoint} is acknowledged and saved, run the same \
         command again to resume"
    )]
    Interrupted { checkpoint: Position },
}

impl RepublishError {
    /// The error's stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPosition { .. } => "UNKNOWN_POSITION",
            Self::FromAfterTo { .. } => "INVALID_RANGE",
            Self::Store(StoreError::Unavailable(_)) | Self::Read(PortError::Unavailable(_)) => {
                "UNAVAILABLE"
            }
            Self::Store(StoreError::Internal(_)) | Self::Read(PortError::Internal(_)) => "INTERNAL",
            Self::Publish { .. } => "KAFKA_UNAVAILABLE",
            Self::Interrupted { .. } => "INTERRUPTED",
        }
    }
}

/// How far a run is: events acknowledged in this run, of `total` selected for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepublishProgress {
    pub published: u64,
    pub total: u64,
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Republished {
    /// Events published by this run.
    pub published: u64,
    /// Events published by every run of this republish.
    pub published_in_all: u64,
    /// Where the run started: after the checkpoint of an earlier run, if there was one.
    pub resumed_after: Option<Position>,
    /// Everything selected up to here is published.
    pub through: Position,
}

/// Batches handed to the publisher and not acknowledged yet, at most this many.
const MAX_IN_FLIGHT: usize = 4;

/// How long to wait for selected events that are committed but not readable yet (an
/// earlier transaction is still running).
const PENDING_PAUSE: Duration = Duration::from_millis(50);

/// Republishes a selection of the log through a publisher.
pub struct Republisher {
    store: Arc<dyn EventStore>,
    publisher: Arc<dyn EventPublisher>,
    config: RepublishConfig,
}

/// A batch handed to the publisher: its last position, its size, its acknowledgements.
type InFlight = VecDeque<(Position, u64, Acknowledgements)>;

impl Republisher {
    pub fn new(
        store: Arc<dyn EventStore>,
        publisher: Arc<dyn EventPublisher>,
        config: RepublishConfig,
    ) -> Self {
        Self {
            store,
            publisher,
            config,
        }
    }

    /// Checks the selection against the log before anything is written: each bound is an
    /// event's position, and `from` is not after `to`.
    pub async fn check(&self) -> Result<(), RepublishError> {
        let selection = &self.config.selection;
        for (flag, bound) in [("from", selection.from), ("to", selection.to)] {
            if let Some(position) = bound {
                if !self.store.has_position(position).await? {
                    return Err(RepublishError::UnknownPosition { flag, position });
                }
            }
        }
        if let (Some(from), Some(to)) = (selection.from, selection.to) {
            if from > to {
                return Err(RepublishError::FromAfterTo { from, to });
            }
        }
        Ok(())
    }

    /// Publishes the selection after its checkpoint, up to `to` (or the end of the log as
    /// it is now), reporting progress; stops, saving what is acknowledged, when `stop`
    /// completes. The checkpoint says `publishing` from before the first event is handed
    /// over, and then `finished`, or `interrupted` with the error.
    pub async fn run(
        &self,
        progress: &(dyn Fn(RepublishProgress) + Sync),
        stop: impl Future<Output = ()>,
    ) -> Result<Republished, RepublishError> {
        self.check().await?;
        let (topic, selection) = (&self.config.topic, &self.config.selection);
        let key = selection.key();
        let saved = self.store.republish_checkpoint(topic, &key).await?;
        let floor = selection.from.map_or(Position::START, just_before);
        let start = saved
            .as_ref()
            .map_or(Position::START, |c| c.position)
            .max(floor);
        let end = match selection.to {
            Some(to) => to,
            None => self
                .store
                .last_position()
                .await
                .map_err(RepublishError::Read)?
                .unwrap_or(Position::START),
        };
        let total = match start < end {
            true => self.store.count_range(start, end, &selection.types).await?,
            false => 0,
        };
        let mut checkpoint = RepublishCheckpoint {
            position: start,
            published: saved.as_ref().map_or(0, |c| c.published),
            state: RepublishState::Publishing,
            error: None,
        };
        self.store
            .save_republish_checkpoint(topic, &key, &checkpoint)
            .await?;
        let before = checkpoint.published;
        progress(RepublishProgress {
            published: 0,
            total,
        });
        let report = |c: &RepublishCheckpoint| {
            progress(RepublishProgress {
                published: c.published - before,
                total,
            })
        };
        let mut in_flight = InFlight::new();
        let published = self
            .publish(start, end, &mut in_flight, &mut checkpoint, &report, stop)
            .await;
        let outcome = match published {
            Ok(()) => self
                .settle_all(&mut in_flight, &mut checkpoint, &report)
                .await
                .map(|()| {
                    checkpoint.position = checkpoint.position.max(end);
                    checkpoint.state = RepublishState::Finished;
                }),
            Err(e) => {
                // Whatever is acknowledged by now is saved too, so that less comes again.
                let _ = self
                    .settle_all(&mut in_flight, &mut checkpoint, &report)
                    .await;
                Err(e)
            }
        };
        let outcome = outcome.map_err(|e| match e {
            RepublishError::Publish { cause, .. } => RepublishError::Publish {
                cause,
                checkpoint: checkpoint.position,
            },
            RepublishError::Interrupted { .. } => RepublishError::Interrupted {
                checkpoint: checkpoint.position,
            },
            other => other,
        });
        if let Err(e) = &outcome {
            checkpoint.state = RepublishState::Interrupted;
            checkpoint.error = Some(e.to_string());
        }
        let saved = self
            .store
            .save_republish_checkpoint(topic, &key, &checkpoint)
            .await;
        outcome?;
        saved?;
        Ok(Republished {
            published: checkpoint.published - before,
            published_in_all: checkpoint.published,
            resumed_after: saved_position(start, floor),
            through: checkpoint.position,
        })
    }

    /// Hands the selected events after `start` up to `end` to the publisher, paced, with
    /// up to `MAX_IN_FLIGHT` batches awaiting acknowledgement; each acknowledged batch moves
    /// the checkpoint.
    async fn publish(
        &self,
        start: Position,
        end: Position,
        in_flight: &mut InFlight,
        checkpoint: &mut RepublishCheckpoint,
        report: &(dyn Fn(&RepublishCheckpoint) + Sync),
        stop: impl Future<Output = ()>,
    ) -> Result<(), RepublishError> {
        tokio::pin!(stop);
        let interrupted = || RepublishError::Interrupted {
            checkpoint: Position::START,
        };
        let batch = match self.config.rate {
            // About ten batches a second, so that the pace is even.
            Some(rate) => (rate as usize / 10).clamp(1, self.config.batch_size.max(1)),
            None => self.config.batch_size.max(1),
        };
        let query = LogQuery {
            after: Some(start),
            types: self.config.selection.types.clone(),
            limit: batch,
            ..LogQuery::default()
        };
        // Pages are read ahead while the one before is handed over: the event store's work
        // and this process's overlap.
        let mut pages = read_ahead(self.store.clone(), query, end);
        let started = Instant::now();
        let mut handed = 0u64;
        loop {
            if futures::FutureExt::now_or_never(stop.as_mut()).is_some() {
                return Err(interrupted());
            }
            if let Some(rate) = self.config.rate.filter(|r| *r > 0) {
                let due = started + Duration::from_secs_f64(handed as f64 / f64::from(rate));
                tokio::select! {
                    _ = stop.as_mut() => return Err(interrupted()),
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
            }
            let events = tokio::select! {
                _ = stop.as_mut() => return Err(interrupted()),
                page = pages.recv() => match page {
                    Some(page) => page?,
                    None => return Err(RepublishError::Read(PortError::Internal(
                        "the reading of the log stopped before its end".into(),
                    ))),
                },
            };
            // The empty page that says the selection is read to its end.
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok(());
            };
            let acknowledged =
                self.publisher
                    .enqueue(&events)
                    .await
                    .map_err(|cause| RepublishError::Publish {
                        cause,
                        checkpoint: Position::START,
                    })?;
            handed += events.len() as u64;
            in_flight.push_back((last, events.len() as u64, acknowledged));
            if in_flight.len() >= MAX_IN_FLIGHT {
                self.settle_oldest(in_flight, checkpoint, report).await?;
            }
        }
    }

    async fn settle_all(
        &self,
        in_flight: &mut InFlight,
        checkpoint: &mut RepublishCheckpoint,
        report: &(dyn Fn(&RepublishCheckpoint) + Sync),
    ) -> Result<(), RepublishError> {
        while !in_flight.is_empty() {
            self.settle_oldest(in_flight, checkpoint, report).await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch's acknowledgement, then saves the checkpoint after it.
    async fn settle_oldest(
        &self,
        in_flight: &mut InFlight,
        checkpoint: &mut RepublishCheckpoint,
        report: &(dyn Fn(&RepublishCheckpoint) + Sync),
    ) -> Result<(), RepublishError> {
        let Some((last, count, acknowledged)) = in_flight.pop_front() else {
            return Ok(());
        };
        if let Err(cause) = acknowledged.await {
            // Later batches cannot be acknowledged before this one: none moves the
            // checkpoint.
            in_flight.clear();
            return Err(RepublishError::Publish {
                cause,
                checkpoint: Position::START,
            });
        }
        checkpoint.position = last;
        checkpoint.published += count;
        self.store
            .save_republish_checkpoint(&self.config.topic, &self.config.selection.key(), checkpoint)
            .await?;
        report(checkpoint);
        Ok(())
    }
}

/// Pages of `query` up to `end`, read by a task of their own, at most two ahead of their
/// reader; an empty page says the end is reached, a failed read is sent as such, and both
/// are the last. The task ends when the reader drops the channel.
fn read_ahead(
    store: Arc<dyn EventStore>,
    mut query: LogQuery,
    end: Position,
) -> tokio::sync::mpsc::Receiver<Result<Vec<EventEnvelope>, RepublishError>> {
    let (pages, received) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            let mut events = match store.read(&query).await {
                Ok(events) => events,
                Err(e) => {
                    let _ = pages.send(Err(RepublishError::Read(e))).await;
                    return;
                }
            };
            if events.is_empty() {
                // Nothing selected after here in the readable log: the end when the log is
                // readable up to `end`, else events up to `end` are committed but wait for
                // an earlier transaction.
                let at_end = match store.last_position().await {
                    Ok(readable) => readable.is_some_and(|r| r >= end) || query.after >= Some(end),
                    Err(e) => {
                        let _ = pages.send(Err(RepublishError::Read(e))).await;
                        return;
                    }
                };
                if at_end {
                    let _ = pages.send(Ok(Vec::new())).await;
                    return;
                }
                if pages.is_closed() {
                    return;
                }
                tokio::time::sleep(PENDING_PAUSE).await;
                continue;
            }
            events.retain(|e| e.position <= end);
            let Some(last) = events.last().map(|e| e.position) else {
                // Past `end`: an empty page says so.
                let _ = pages.send(Ok(Vec::new())).await;
                return;
            };
            query.after = Some(last);
            if pages.send(Ok(events)).await.is_err() {
                return;
            }
        }
    });
    received
}

/// The position just before `p`: the greatest one below it (no event lies between them).
fn just_before(p: Position) -> Position {
    match p.global {
        0 => Position::new(p.commit.saturating_sub(1), u64::MAX),
        g => Position::new(p.commit, g - 1),
    }
}

/// The checkpoint a run resumed after, if an earlier run had moved it past the selection's
/// start.
fn saved_position(start: Position, floor: Position) -> Option<Position> {
    (start > floor).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_is_named_the_same_whatever_the_order_of_its_types() {
        let a = Selection {
            from: Some(Position::new(5, 7)),
            to: None,
            types: vec!["UserCreated".into(), "AccountDeleted".into()],
        };
        let b = Selection {
            types: vec![
                "AccountDeleted".into(),
                "UserCreated".into(),
                "UserCreated".into(),
            ],
            ..a.clone()
        };
        assert_eq!(a.key(), b.key());
        assert_eq!(
            a.key(),
            "from=00000000000000050000000000000007;to=end;types=AccountDeleted,UserCreated"
        );
        assert_eq!(Selection::whole_log().key(), "from=start;to=end;types=all");
        assert_ne!(Selection::whole_log().key(), a.key());
    }

    #[test]
    fn the_position_just_before_has_nothing_between() {
        let p = Position::new(9, 4);
        assert_eq!(just_before(p), Position::new(9, 3));
        assert!(just_before(p) < p);
        let q = Position::new(9, 0);
        assert_eq!(just_before(q), Position::new(8, u64::MAX));
        assert!(just_before(q) < q);
    }
}
