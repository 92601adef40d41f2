//! In-memory user views for embedded mode, built from the log at start like any rebuild:
//! generations of users by id plus an email index, behind one lock.

use async_trait::async_trait;
use pcf_domain::ports::{PortError, UserFilter, UserReader};
use pcf_domain::{Email, UserView};
use std::collections::HashMap;
use std::sync::RwLock;
use uuid::Uuid;

use crate::store::{
    BatchGenerations, GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written,
};

/// One generation: users by id and the email index, changed together.
#[derive(Default)]
struct Users {
    users: HashMap<Uuid, UserView>,
    by_email: HashMap<String, Uuid>,
}

impl Users {
    /// Stores `next`, moving its email entry.
    fn put(&mut self, next: &UserView) {
        if let Some(old) = self.users.get(&next.id).map(|v| v.email.clone()) {
            if self.by_email.get(&old) == Some(&next.id) {
                self.by_email.remove(&old);
            }
        }
        if !next.deleted {
            self.by_email.insert(next.email.clone(), next.id);
        }
        self.users.insert(next.id, next.clone());
    }
}

struct State {
    active: u64,
    building: Option<u64>,
    generations: HashMap<u64, Users>,
}

impl State {
    fn generation_state(&self) -> GenerationState {
        GenerationState {
            active: self.active,
            building: self.building,
        }
    }

    fn active(&self) -> Option<&Users> {
        self.generations.get(&self.active)
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            active: 1,
            building: None,
            generations: HashMap::from([(1, Users::default())]),
        }
    }
}

/// The user views of one process, with generations: readers use the active one.
#[derive(Default)]
pub struct MemoryUserViews {
    state: RwLock<State>,
}

impl MemoryUserViews {
    /// Empty views (generation 1 active).
    pub fn new() -> Self {
        Self::default()
    }

    /// How many users (tombstones included) the active generation holds.
    pub fn len(&self) -> usize {
        self.read().active().map_or(0, |g| g.users.len())
    }

    /// Whether the active generation holds no user.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent with each other
        // for longer than one write; keep serving.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ViewStore for MemoryUserViews {
    fn name(&self) -> &str {
        "users-memory"
    }

    async fn state(&self) -> Result<GenerationState, PortError> {
        Ok(self.read().generation_state())
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        let mut state = self.write();
        state.generations.insert(generation, Users::default());
        state.building = Some(generation);
        Ok(())
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        let mut state = self.write();
        state.generations.entry(generation).or_default();
        state.active = generation;
        state.building = None;
        Ok(())
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        let mut state = self.write();
        if generation != state.active {
            state.generations.remove(&generation);
        }
        Ok(())
    }

    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        let generations =
            BatchGenerations::of(scope, async { Ok(self.read().generation_state()) }).await?;
        Ok(Box::new(MemoryBatch {
            views: self,
            generations,
        }))
    }
}

/// A batch of writes to the memory views: each write lands at once, under the lock.
struct MemoryBatch<'a> {
    views: &'a MemoryUserViews,
    generations: BatchGenerations,
}

#[async_trait]
impl ViewBatch for MemoryBatch<'_> {
    fn generations(&self) -> &[u64] {
        self.generations.targets()
    }

    async fn load(
        &mut self,
        generation: u64,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, UserView>, PortError> {
        let state = self.views.read();
        let Some(users) = state.generations.get(&generation) else {
            return Ok(HashMap::new());
        };
        Ok(ids
            .iter()
            .filter_map(|id| users.users.get(id).map(|v| (*id, v.clone())))
            .collect())
    }

    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError> {
        let mut state = self.views.write();
        if self
            .generations
            .opened_with()
            .is_some_and(|opened_with| opened_with != state.generation_state())
        {
            return Ok(Written::GenerationsMoved);
        }
        let users = state.generations.entry(generation).or_default();
        let written = changes
            .iter()
            .map(|(previous, next)| {
                let stored = users.users.get(&next.id).map_or(0, |v| v.version);
                if next.version <= stored {
                    return true;
                }
                if stored != previous.as_ref().map_or(0, |v| v.version) {
                    return false;
                }
                users.put(next);
                true
            })
            .collect();
        Ok(Written::Users(written))
    }

    /// Every state is settled here, written where the stored one is older; only for
    /// batches of one generation (a live batch's writes go the guarded way).
    async fn write_newer(
        &mut self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        if self.generations.opened_with().is_some() {
            return Ok(vec![false; states.len()]);
        }
        let mut state = self.views.write();
        let users = state.generations.entry(generation).or_default();
        for next in states {
            if users.users.get(&next.id).map_or(0, |v| v.version) < next.version {
                users.put(next);
            }
        }
        Ok(vec![true; states.len()])
    }

    /// Nothing to do: the writes have landed, and Kafka offsets are not kept here.
    async fn commit(self: Box<Self>, _offsets: &Offsets) -> Result<(), PortError> {
        Ok(())
    }
}

#[async_trait]
impl UserReader for MemoryUserViews {
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        Ok(self.read().active().and_then(|g| g.users.get(&id)).cloned())
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
        let state = self.read();
        let Some(active) = state.active() else {
            return Ok(None);
        };
        Ok(active
            .by_email
            .get(email.as_str())
            .and_then(|id| active.users.get(id))
            .cloned())
    }

    async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        let state = self.read();
        let Some(active) = state.active() else {
            return Ok(Vec::new());
        };
        let needle = filter
            .display_name_contains
            .as_ref()
            .map(|s| s.to_lowercase());
        let mut users: Vec<&UserView> = active
            .users
            .values()
            .filter(|u| !u.deleted && after.is_none_or(|a| u.id > a))
            .filter(|u| filter.email.as_ref().is_none_or(|e| &u.email == e))
            .filter(|u| {
                needle
                    .as_ref()
                    .is_none_or(|n| u.display_name.to_lowercase().contains(n))
            })
            .filter(|u| filter.created_after.is_none_or(|t| u.created_at > t))
            .filter(|u| filter.created_before.is_none_or(|t| u.created_at < t))
            .collect();
        users.sort_by_key(|u| u.id);
        Ok(users.into_iter().take(limit).cloned().collect())
    }
}
