//! What `pcf events republish` needs of the event store besides reading the log: its
//! checkpoints (one per topic and selection, in `republish_checkpoints`), whether a position
//! is an event's, and how many events a selection holds.

use async_trait::async_trait;
use pcf_domain::ports::EventLog;
use pcf_domain::Position;

use super::sql::{Arg, SqlBackend, SqlDb, SqlStore};
use super::StoreError;

/// Where a republish stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepublishState {
    /// Publishing, or it was when its process died.
    Publishing,
    /// Stopped before the end of its selection (interrupted, or a failure).
    Interrupted,
    /// Reached the end of its selection.
    Finished,
}

impl RepublishState {
    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publishing => "publishing",
            Self::Interrupted => "interrupted",
            Self::Finished => "finished",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "publishing" => Ok(Self::Publishing),
            "interrupted" => Ok(Self::Interrupted),
            "finished" => Ok(Self::Finished),
            other => Err(StoreError::Internal(format!(
                "unknown republish state {other:?}"
            ))),
        }
    }
}

/// The checkpoint of one republish (a topic and a selection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepublishCheckpoint {
    /// Every selected event up to here is acknowledged by Kafka (`Position::START` while
    /// nothing is).
    pub position: Position,
    /// Events acknowledged over every run of this republish.
    pub published: u64,
    pub state: RepublishState,
    /// Why the last run stopped, when it failed.
    pub error: Option<String>,
}

/// The store's part of `pcf events republish`.
#[async_trait]
pub trait RepublishStore: EventLog + Send + Sync {
    /// The checkpoint of the republish of `selection` onto `topic`, if one ever ran.
    async fn republish_checkpoint(
        &self,
        topic: &str,
        selection: &str,
    ) -> Result<Option<RepublishCheckpoint>, StoreError>;

    /// Saves the checkpoint of the republish of `selection` onto `topic`.
    async fn save_republish_checkpoint(
        &self,
        topic: &str,
        selection: &str,
        checkpoint: &RepublishCheckpoint,
    ) -> Result<(), StoreError>;

    /// Whether an event of the log is at `position`.
    async fn has_position(&self, position: Position) -> Result<bool, StoreError>;

    /// How many events lie after `after` and at or before `to`, of `types` (all when empty).
    async fn count_range(
        &self,
        after: Position,
        to: Position,
        types: &[String],
    ) -> Result<u64, StoreError>;
}

#[async_trait]
impl<B: SqlBackend> RepublishStore for SqlStore<B> {
    async fn republish_checkpoint(
        &self,
        topic: &str,
        selection: &str,
    ) -> Result<Option<RepublishCheckpoint>, StoreError> {
        let args = [Arg::text(topic), Arg::text(selection)];
        let rows = B::Db::fetch_all(&self.reader, self.sql.load_republish, &args).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let error = B::Db::text(row, 4)?;
        Ok(Some(RepublishCheckpoint {
            position: B::position(row, 0)?,
            published: B::Db::int(row, 2)? as u64,
            state: RepublishState::parse(&B::Db::text(row, 3)?)?,
            error: (!error.is_empty()).then_some(error),
        }))
    }

    async fn save_republish_checkpoint(
        &self,
        topic: &str,
        selection: &str,
        checkpoint: &RepublishCheckpoint,
    ) -> Result<(), StoreError> {
        let args = [
            Arg::text(topic),
            Arg::text(selection),
            B::commit_arg(checkpoint.position.commit),
            Arg::Int(checkpoint.position.global as i64),
            Arg::Int(checkpoint.published as i64),
            Arg::text(checkpoint.state.as_str()),
            Arg::text(checkpoint.error.clone().unwrap_or_default()),
        ];
        B::Db::execute(&self.writer, self.sql.save_republish, &args).await?;
        Ok(())
    }

    async fn has_position(&self, position: Position) -> Result<bool, StoreError> {
        let args = [
            B::commit_arg(position.commit),
            Arg::Int(position.global as i64),
        ];
        let rows = B::Db::fetch_all(&self.reader, self.sql.has_position, &args).await?;
        let n = rows.first().map(|r| B::Db::int(r, 0)).transpose()?;
        Ok(n.unwrap_or(0) > 0)
    }

    async fn count_range(
        &self,
        after: Position,
        to: Position,
        types: &[String],
    ) -> Result<u64, StoreError> {
        let types =
            serde_json::to_string(types).map_err(|e| StoreError::Internal(e.to_string()))?;
        let args = [
            B::commit_arg(after.commit),
            Arg::Int(after.global as i64),
            B::commit_arg(to.commit),
            Arg::Int(to.global as i64),
            Arg::text(types),
        ];
        let rows = B::Db::fetch_all(&self.reader, self.sql.count_range, &args).await?;
        let n = rows.first().map(|r| B::Db::int(r, 0)).transpose()?;
        Ok(n.unwrap_or(0) as u64)
    }
}
