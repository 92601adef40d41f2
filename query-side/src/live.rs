//! The live tail of the log for subscriptions: while anyone subscribes, one task per process
//! follows the event store's commit order (the same gap-free read the relay uses), woken by
//! commits, and broadcasts each batch. A subscriber replays from the store up to the tail,
//! then follows the broadcast, skipping what it has seen, so the seam loses and repeats
//! nothing. A process nobody subscribes to reads nothing: the tail stops with its last
//! subscriber and starts again, from the end of the log, with the next; a first (empty)
//! batch at such a start sends every subscriber back to the store once (they all joined
//! while it was stopped, and may have replayed only up to a point before its start).
//! Both the tail and a subscriber's replay read the log with `LogPages`.

use futures::stream::{self, BoxStream, StreamExt};
use pcf_domain::ports::{EventLog, LogPages};
use pcf_domain::{EventEnvelope, Position};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};
use uuid::Uuid;

/// Events read by the tail.
struct Batch {
    /// Sent, without events, when the tail starts (again) from the end of the log: what was
    /// committed before that point is in no batch at all.
    first: bool,
    events: Vec<EventEnvelope>,
}

/// The process's live tail of the log.
pub struct LiveLog {
    batches: broadcast::Sender<Arc<Batch>>,
    /// Told when a subscriber arrives, so that an idle tail starts at once.
    joined: Arc<Notify>,
    log: Arc<dyn EventLog>,
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct LiveFilter {
    /// Only this user's events.
    pub aggregate_id: Option<Uuid>,
    /// Only events of these types (all when empty).
    pub types: Vec<String>,
}

impl LiveFilter {
    fn matches(&self, e: &EventEnvelope) -> bool {
        self.aggregate_id.is_none_or(|id| id == e.aggregate_id)
            && (self.types.is_empty() || self.types.contains(&e.event_type))
    }
}

const BATCH: usize = 500;

impl LiveLog {
    /// Starts the tail, idle until someone subscribes. `commits` moves whenever events may
    /// have been committed; `poll` is the fallback interval.
    pub fn spawn(
        log: Arc<dyn EventLog>,
        mut commits: watch::Receiver<u64>,
        poll: Duration,
    ) -> Arc<Self> {
        let (batches, _) = broadcast::channel(1024);
        let joined = Arc::new(Notify::new());
        let live = Arc::new(Self {
            batches: batches.clone(),
            joined: joined.clone(),
            log: log.clone(),
        });
        let alive = Arc::downgrade(&live);
        tokio::spawn(async move {
            // The tail's reading of the log; `None` while idle: the tail starts again from the
            // end of the log (subscribers replay whatever lies between).
            let mut tail: Option<LogPages> = None;
            loop {
                if alive.strong_count() == 0 {
                    // Nobody can subscribe any more.
                    return;
                }
                if batches.receiver_count() == 0 {
                    tail = None;
                    tokio::select! {
                        _ = joined.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                    continue;
                }
                let pages = match &mut tail {
                    Some(pages) => pages,
                    None => match log.last_position().await {
                        Ok(p) => {
                            // Whoever joined while the tail was stopped may have replayed
                            // only up to a point before this one: back to the store, once.
                            let _ = batches.send(Arc::new(Batch {
                                first: true,
                                events: Vec::new(),
                            }));
                            tail.insert(LogPages::new(
                                log.clone(),
                                p.unwrap_or(Position::START),
                                BATCH,
                            ))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "live tail could not find the end of the log");
                            tokio::time::sleep(poll).await;
                            continue;
                        }
                    },
                };
                match pages.next_page().await {
                    Ok(events) if !events.is_empty() => {
                        let full = events.len() == pages.page_size();
                        // A send fails only when the last subscriber left meanwhile.
                        let _ = batches.send(Arc::new(Batch {
                            first: false,
                            events,
                        }));
                        if full {
                            continue;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "live tail read failed"),
                }
                tokio::select! {
                    changed = commits.changed() => {
                        if changed.is_err() {
                            // The store is gone; keep polling.
                            tokio::time::sleep(poll).await;
                        }
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        });
        live
    }

    /// Events after `after` (or from now on: after the end of the log when the stream is
    /// first polled), matching `filter`, in commit order: first from the store, then live.
    pub fn stream(
        self: &Arc<Self>,
        after: Option<Position>,
        filter: LiveFilter,
    ) -> BoxStream<'static, EventEnvelope> {
        self.batches(after, filter).flat_map(stream::iter).boxed()
    }

    /// The events of `stream`, in the batches they are read in (a page of the replay, or
    /// what one read of the tail found), none empty: for whoever handles events a batch at
    /// a time, such as opening their personal data.
    pub fn batches(
        self: &Arc<Self>,
        after: Option<Position>,
        filter: LiveFilter,
    ) -> BoxStream<'static, Vec<EventEnvelope>> {
        // Subscribe before reading the store, so nothing falls between the two.
        let rx = self.batches.subscribe();
        self.joined.notify_one();
        let state = Subscriber {
            live: self.clone(),
            rx,
            last: after,
            replay: None,
            replaying: true,
            filter,
        };
        stream::unfold(state, |mut s| async move {
            let batch = s.next_batch().await?;
            Some((batch, s))
        })
        .filter(|batch| std::future::ready(!batch.is_empty()))
        .boxed()
    }
}

struct Subscriber {
    live: Arc<LiveLog>,
    rx: broadcast::Receiver<Arc<Batch>>,
    /// The last position delivered (or skipped as not matching); `None` until a stream
    /// "from now on" has found the end of the log.
    last: Option<Position>,
    /// The replay's reading of the store, from `last` on, while replaying.
    replay: Option<LogPages>,
    replaying: bool,
    filter: LiveFilter,
}

impl Subscriber {
    /// The next events to deliver (possibly none); `None` ends the stream.
    async fn next_batch(&mut self) -> Option<Vec<EventEnvelope>> {
        let last = match self.last {
            Some(last) => last,
            None => match self.live.log.last_position().await {
                Ok(end) => *self.last.insert(end.unwrap_or(Position::START)),
                Err(e) => {
                    tracing::warn!(error = %e, "subscription could not find the end of the log; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Some(Vec::new());
                }
            },
        };
        if self.replaying {
            let replay = self.replay.get_or_insert_with(|| {
                let mut pages = LogPages::new(self.live.log.clone(), last, BATCH)
                    .of_types(self.filter.types.clone());
                if let Some(id) = self.filter.aggregate_id {
                    pages = pages.of_user(id);
                }
                pages
            });
            match replay.next_page().await {
                Ok(events) => {
                    self.last = Some(last.max(replay.position()));
                    if events.len() < replay.page_size() {
                        // Caught up: what commits from here on arrives through the
                        // broadcast, which this subscriber joined before reading the store.
                        self.replaying = false;
                        self.replay = None;
                    }
                    return Some(events);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "subscription replay failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Some(Vec::new());
                }
            }
        }
        match self.rx.recv().await {
            Ok(batch) if batch.first => {
                // The tail started after this subscriber joined, from the end of the log as
                // it was then, which the replay may not have reached: replay again.
                self.replaying = true;
                Some(Vec::new())
            }
            Ok(batch) => {
                let out: Vec<EventEnvelope> = batch
                    .events
                    .iter()
                    .filter(|e| e.position > last && self.filter.matches(e))
                    .cloned()
                    .collect();
                if let Some(e) = batch.events.last() {
                    self.last = Some(last.max(e.position));
                }
                Some(out)
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Too slow for the broadcast: catch up from the store.
                self.replaying = true;
                Some(Vec::new())
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use pcf_domain::ports::{LogQuery, PortError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A log in memory that counts its reads.
    #[derive(Default)]
    struct MemoryLog {
        events: Mutex<Vec<EventEnvelope>>,
        reads: AtomicUsize,
        /// Events returned by `read`, in all.
        rows: AtomicUsize,
        /// Held to keep `last_position` from answering.
        gate: tokio::sync::Mutex<()>,
    }

    impl MemoryLog {
        fn append(&self, aggregate_id: Uuid) -> EventEnvelope {
            let mut events = self.events.lock().unwrap();
            let n = events.len() as u64 + 1;
            let e = EventEnvelope {
                event_id: Uuid::now_v7(),
                aggregate_type: pcf_domain::AGGREGATE_TYPE.to_owned(),
                aggregate_id,
                sequence: n,
                position: Position::new(n, n),
                event_type: if n.is_multiple_of(3) {
                    "UserEmailChanged"
                } else {
                    "UserProfileUpdated"
                }
                .to_owned(),
                event_version: "1".to_owned(),
                recorded_at: chrono::Utc::now(),
                metadata: Default::default(),
                payload: serde_json::json!({ "n": n }),
            };
            events.push(e.clone());
            e
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl EventLog for MemoryLog {
        async fn read(&self, q: &LogQuery) -> Result<Vec<EventEnvelope>, PortError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let events = q.select(&self.events.lock().unwrap());
            self.rows.fetch_add(events.len(), Ordering::SeqCst);
            Ok(events)
        }

        async fn user_events(&self, _: Uuid, _: u64) -> Result<Vec<EventEnvelope>, PortError> {
            Ok(Vec::new())
        }

        async fn last_position(&self) -> Result<Option<Position>, PortError> {
            let _open = self.gate.lock().await;
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(self.events.lock().unwrap().last().map(|e| e.position))
        }
    }

    struct Setup {
        log: Arc<MemoryLog>,
        live: Arc<LiveLog>,
        commits: watch::Sender<u64>,
    }

    fn setup() -> Setup {
        let log = Arc::new(MemoryLog::default());
        let (commits, rx) = watch::channel(0);
        let live = LiveLog::spawn(log.clone(), rx, Duration::from_millis(20));
        Setup { log, live, commits }
    }

    impl Setup {
        fn commit(&self, user: Uuid) -> EventEnvelope {
            let e = self.log.append(user);
            self.commits.send_modify(|n| *n += 1);
            e
        }
    }

    async fn next(stream: &mut BoxStream<'static, EventEnvelope>) -> EventEnvelope {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream goes on")
    }

    #[tokio::test]
    async fn a_tail_nobody_subscribes_to_reads_nothing() {
        let s = setup();
        let user = Uuid::now_v7();
        for _ in 0..10 {
            s.commit(user);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            s.log.reads(),
            0,
            "the tail read the log with nobody subscribed"
        );

        let mut stream = s.live.stream(None, LiveFilter::default());
        // The stream finds the end of the log when first polled.
        let waiting = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(waiting.is_err(), "nothing after the end yet");
        let e = s.commit(user);
        assert_eq!(next(&mut stream).await.position, e.position);
        assert!(s.log.reads() > 0);

        drop(stream);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reads = s.log.reads();
        for _ in 0..10 {
            s.commit(user);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            s.log.reads(),
            reads,
            "the tail kept reading after its last subscriber left"
        );
    }

    /// Takes `n` events from `stream`, in the order they come.
    async fn take(stream: &mut BoxStream<'static, EventEnvelope>, n: usize) -> Vec<Position> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            got.push(next(stream).await.position);
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_get_every_event_once_in_order_replayed_then_live() {
        let s = setup();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let user = |i: usize| if i.is_multiple_of(2) { a } else { b };
        let before: Vec<EventEnvelope> = (0..5).map(|i| s.commit(user(i))).collect();
        let mut all = s.live.stream(Some(Position::START), LiveFilter::default());
        let mut only_a = s.live.stream(
            Some(Position::START),
            LiveFilter {
                aggregate_id: Some(a),
                types: Vec::new(),
            },
        );
        let mut emails = s.live.stream(
            Some(Position::START),
            LiveFilter {
                aggregate_id: None,
                types: vec!["UserEmailChanged".to_owned()],
            },
        );
        let positions = |events: &[EventEnvelope], keep: &dyn Fn(&EventEnvelope) -> bool| {
            events
                .iter()
                .filter(|e| keep(e))
                .map(|e| e.position)
                .collect::<Vec<_>>()
        };
        // The replay first, from the store.
        assert_eq!(take(&mut all, 5).await, positions(&before, &|_| true));
        let a_before = positions(&before, &|e| e.aggregate_id == a);
        assert_eq!(take(&mut only_a, a_before.len()).await, a_before);
        let emails_before = positions(&before, &|e| e.event_type == "UserEmailChanged");
        assert_eq!(take(&mut emails, emails_before.len()).await, emails_before);
        // Then live, from the running tail, taken while the commits go on.
        let reads = s.log.reads();
        let mut after = Vec::new();
        let mut got = Vec::new();
        for i in 0..200 {
            after.push(s.commit(user(i)));
            if i % 10 == 9 {
                got.extend(take(&mut all, after.len() - got.len()).await);
            }
        }
        assert_eq!(got, positions(&after, &|_| true));
        assert!(
            s.log.reads() - reads <= 220,
            "one read or so per commit, not a replay per batch"
        );
        let a_after = positions(&after, &|e| e.aggregate_id == a);
        assert_eq!(take(&mut only_a, a_after.len()).await, a_after);
        let emails_after = positions(&after, &|e| e.event_type == "UserEmailChanged");
        assert_eq!(take(&mut emails, emails_after.len()).await, emails_after);
        let more = tokio::time::timeout(Duration::from_millis(100), all.next()).await;
        assert!(more.is_err(), "an event came twice: {more:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_started_again_reads_from_the_end_and_its_subscribers_lose_nothing() {
        let s = setup();
        let user = Uuid::now_v7();
        let mut first = s.live.stream(None, LiveFilter::default());
        let waiting = tokio::time::timeout(Duration::from_millis(50), first.next()).await;
        assert!(waiting.is_err(), "nothing after the end yet");
        let seen = s.commit(user);
        assert_eq!(next(&mut first).await.position, seen.position);
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Committed while nobody subscribes.
        let mut expected: Vec<Position> = (0..300).map(|_| s.commit(user).position).collect();
        let rows = s.log.rows.load(Ordering::SeqCst);

        // The next subscriber resumes after what it saw; the tail, started again, cannot
        // find the end of the log yet while that subscriber replays.
        let gate = s.log.gate.lock().await;
        let mut second = s.live.stream(Some(seen.position), LiveFilter::default());
        let mut got = take(&mut second, 300).await;
        expected.extend((0..2).map(|_| s.log.append(user).position));
        drop(gate);
        got.extend(take(&mut second, 2).await);
        expected.push(s.commit(user).position);
        got.extend(take(&mut second, 1).await);
        assert_eq!(got, expected);
        // The subscriber read the 300 (and the 2 after them, sent back by the tail's start); the
        // tail read from the end of the log, not from where it had stopped.
        let read = s.log.rows.load(Ordering::SeqCst) - rows;
        assert!(
            read < 400,
            "{read} events read: the tail went over what it missed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_that_replayed_before_the_tail_started_replays_again() {
        let s = setup();
        let user = Uuid::now_v7();
        let mut expected: Vec<Position> = (0..3).map(|_| s.commit(user).position).collect();
        // The tail, started by the subscriber, cannot find the end of the log yet.
        let gate = s.log.gate.lock().await;
        let mut stream = s.live.stream(Some(Position::START), LiveFilter::default());
        let mut got = take(&mut stream, 3).await;
        // Committed after the replay, before the tail's start: no batch will hold them.
        expected.extend((0..2).map(|_| s.log.append(user).position));
        drop(gate);
        expected.push(s.commit(user).position);
        got.extend(take(&mut stream, 3).await);
        assert_eq!(got, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_from_a_position_pages_through_the_store_in_order() {
        let s = setup();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        // More than two pages of a's events, between b's.
        let events: Vec<EventEnvelope> = (0..1800)
            .map(|i| s.log.append(if i % 3 == 0 { b } else { a }))
            .collect();
        let from = events[100].position;
        let expected: Vec<Position> = events[101..]
            .iter()
            .filter(|e| e.aggregate_id == a)
            .map(|e| e.position)
            .collect();
        assert!(expected.len() > 2 * BATCH);
        let mut stream = s.live.stream(
            Some(from),
            LiveFilter {
                aggregate_id: Some(a),
                types: Vec::new(),
            },
        );
        let got = take(&mut stream, expected.len()).await;
        assert_eq!(got, expected);
        // Then live, after the replay.
        s.commit(b);
        let next_a = s.commit(a);
        assert_eq!(take(&mut stream, 1).await, [next_a.position]);
    }
}
