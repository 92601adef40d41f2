//! The event envelope of the public contract: what Kafka consumers, subscribers and
//! `pcf events` see, and what projectors consume.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use crate::events::UserEvent;

/// A place in the log's commit order. `commit` orders transactions (PostgreSQL's `xid8`;
/// on SQLite, whose writers are serial, the global position itself), `global` orders rows
/// within one. Clients see it as an opaque string that sorts like the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit: u64,
    pub global: u64,
}

/// A position string that was not produced by PCF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid position")]
pub struct PositionParseError;

impl Position {
    pub const START: Position = Position {
        commit: 0,
        global: 0,
    };

    pub fn new(commit: u64, global: u64) -> Self {
        Self { commit, global }
    }
}

impl fmt::Display for Position {
    /// Fixed-width hex, so that string order is position order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.commit, self.global)
    }
}

impl FromStr for Position {
    type Err = PositionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PositionParseError);
        }
        let commit = u64::from_str_radix(&s[..16], 16).map_err(|_| PositionParseError)?;
        let global = u64::from_str_radix(&s[16..], 16).map_err(|_| PositionParseError)?;
        Ok(Self { commit, global })
    }
}

impl Serialize for Position {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who and what caused an event, stored in the event's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The W3C trace context of the command that caused the event, when it was traced: the
    /// relay's publish, the Kafka message and the projectors' writes join that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// One committed event as published to every reader of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub sequence: u64,
    pub position: Position,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    pub metadata: EventMetadata,
    pub payload: serde_json::Value,
}

/// The payload field that holds an event's personal fields sealed with the user's data key
/// (event version "2"), for readers holding the keys to open.
pub const SEALED: &str = "sealed";

/// The payload field that marks an event's personal fields as erased: the user's data key
/// was destroyed with the account, so they can no longer be read by anyone.
pub const ERASED: &str = "erased";

impl EventEnvelope {
    /// Whether the payload's personal fields are erased (`ERASED`).
    pub fn is_erased(&self) -> bool {
        self.payload
            .get(ERASED)
            .and_then(serde_json::Value::as_bool)
            == Some(true)
    }

    /// The domain event inside, read from the type name and payload.
    pub fn event(&self) -> Result<UserEvent, serde_json::Error> {
        UserEvent::from_payload(&self.event_type, &self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_strings_sort_like_positions() {
        let a = Position::new(9, 200);
        let b = Position::new(10, 3);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(b.to_string().parse::<Position>().unwrap(), b);
    }

    #[test]
    fn foreign_position_strings_are_refused() {
        assert!("abc".parse::<Position>().is_err());
        assert!("zz".repeat(16).parse::<Position>().is_err());
    }
}
