//! The relay is single-active across processes (PostgreSQL advisory lock): two processes with
//! the relay role on one database and topic publish every event, in order per user, with no
//! duplicates while both run; when the active one stops, the other takes over.

use crate::support::*;
use pcf::app::Role;
use pcf_domain::EventEnvelope;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

on_cluster! {
    one_relay_publishes_at_a_time_and_another_takes_over_when_it_stops:
        create => single_active_relay,
}

/// Creates `n` users with two profile updates each; returns their ids.
async fn write_users(router: &axum::Router, tag: &str, phase: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = create_user(
            router,
            &format!("{phase}{i}@{tag}.example.com"),
            &format!("{phase} {i}"),
        )
        .await;
        for v in 2..=3 {
            update_profile(
                router,
                id,
                json!({ "displayName": format!("{phase} {i} v{v}") }),
            )
            .await;
        }
        ids.push(id);
    }
    ids
}

/// Every stored event is in the topic, and each user's events came in sequence order (a
/// redelivery may repeat events, never put a later one before an earlier one).
fn assert_complete_and_ordered(records: &[Record], stored: &BTreeSet<Uuid>) {
    let mut by_partition: BTreeMap<i32, Vec<(i64, EventEnvelope, Option<String>)>> =
        BTreeMap::new();
    for r in records {
        let e = r
            .envelope()
            .unwrap_or_else(|| panic!("not an envelope: {r:?}"));
        by_partition
            .entry(r.partition)
            .or_default()
            .push((r.offset, e, r.key.clone()));
    }
    let mut partition_of: BTreeMap<Uuid, i32> = BTreeMap::new();
    let mut next: BTreeMap<Uuid, u64> = BTreeMap::new();
    for (partition, mut messages) in by_partition {
        messages.sort_by_key(|(offset, _, _)| *offset);
        for (offset, e, key) in messages {
            assert_eq!(
                key,
                Some(e.aggregate_id.to_string()),
                "key of offset {offset}"
            );
            let p = *partition_of.entry(e.aggregate_id).or_insert(partition);
            assert_eq!(p, partition, "user {} in two partitions", e.aggregate_id);
            let expected = next.entry(e.aggregate_id).or_insert(1);
            // A repeat of an earlier event is a redelivery; anything else must be the next.
            if e.sequence >= *expected {
                assert_eq!(
                    e.sequence, *expected,
                    "user {}: sequence {} published before {} (partition {partition}, offset {offset})",
                    e.aggregate_id, e.sequence, expected
                );
                *expected += 1;
            }
        }
    }
    let published = event_ids(records);
    let missing: Vec<&Uuid> = stored.difference(&published).collect();
    assert!(missing.is_empty(), "events never published: {missing:?}");
}

fn all_published(records: &[Record], stored: &BTreeSet<Uuid>) -> bool {
    stored.is_subset(&event_ids(records))
}

fn duplicates(records: &[Record]) -> Vec<Uuid> {
    let mut seen = BTreeSet::new();
    records
        .iter()
        .filter_map(Record::envelope)
        .filter(|e| !seen.insert(e.event_id))
        .map(|e| e.event_id)
        .collect()
}

async fn single_active_relay(c: &mut Cluster) {
    let mut config = c.config();
    config.redis_url = None;
    // Commands come through a process without the relay, so stopping a relay stops no writer.
    let api = c.start(&config, &[Role::Api]).await;
    let first = c.start(&config, &[Role::Relay]).await;
    let tag = c.tag().to_owned();
    let mut tail = TopicTail::new(&c.brokers, &c.topic).await;

    // While it is alone, the first relay publishes: it leads.
    let ids = write_users(&api.router, &tag, "alone", 1).await;
    let stored = stored_event_ids(&c.pool).await;
    tail.wait_for(CONVERGE, "the first relay's events", |r| {
        all_published(r, &stored)
    })
    .await;
    assert_eq!(ids.len(), 1);

    // A second relay on the same database and topic stands by.
    let second = c.start(&config, &[Role::Relay]).await;
    write_users(&api.router, &tag, "both", 6).await;
    let stored = stored_event_ids(&c.pool).await;
    tail.wait_for(CONVERGE, "the events written with two relays", |r| {
        all_published(r, &stored)
    })
    .await;
    // Give a second, misbehaving relay time to publish too, then look.
    tail.drain_for(std::time::Duration::from_secs(3)).await;
    assert_complete_and_ordered(&tail.records, &stored);
    let dups = duplicates(&tail.records);
    assert!(
        dups.is_empty(),
        "events published twice while two relays ran (both active?): {dups:?}"
    );

    // The active relay stops: the standby takes over.
    c.stop(&first).await;
    write_users(&api.router, &tag, "after", 4).await;
    let stored = stored_event_ids(&c.pool).await;
    assert_eq!(stored.len(), (1 + 6 + 4) * 3);
    tail.wait_for(
        CONVERGE,
        "the events written after the first relay stopped",
        |r| all_published(r, &stored),
    )
    .await;
    tail.drain_for(std::time::Duration::from_millis(500)).await;
    assert_complete_and_ordered(&tail.records, &stored);
    let dups = duplicates(&tail.records);
    eprintln!(
        "{} messages for {} events; {} redelivered after the takeover",
        tail.records.len(),
        stored.len(),
        dups.len()
    );
    c.stop(&second).await;
}
