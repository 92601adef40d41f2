//! In-memory user views for embedded mode, rebuilt from the log at start.

use async_trait::async_trait;
use pcf_domain::ports::{PortError, UserFilter, UserReader};
use pcf_domain::{Email, UserView};
use std::collections::HashMap;
use std::sync::RwLock;
use uuid::Uuid;

use crate::projector::UserViewWriter;

#[derive(Default)]
struct State {
    users: HashMap<Uuid, UserView>,
    by_email: HashMap<String, Uuid>,
}

/// Users by id plus an email index, behind one lock so both change together.
#[derive(Default)]
pub struct MemoryUserViews {
    state: RwLock<State>,
}

impl MemoryUserViews {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many users (tombstones included) the view holds.
    pub fn len(&self) -> usize {
        self.read().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent with each other
        // for longer than one write; keep serving.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl UserViewWriter for MemoryUserViews {
    async fn current(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        Ok(self.read().users.get(&id).cloned())
    }

    async fn replace(
        &self,
        previous: Option<&UserView>,
        next: &UserView,
    ) -> Result<bool, PortError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let stored_version = state.users.get(&next.id).map_or(0, |v| v.version);
        if next.version <= stored_version {
            return Ok(true);
        }
        if stored_version != previous.map_or(0, |v| v.version) {
            return Ok(false);
        }
        if let Some(old) = state.users.get(&next.id).map(|v| v.email.clone()) {
            if state.by_email.get(&old) == Some(&next.id) {
                state.by_email.remove(&old);
            }
        }
        if !next.deleted {
            state.by_email.insert(next.email.clone(), next.id);
        }
        state.users.insert(next.id, next.clone());
        Ok(true)
    }
}

#[async_trait]
impl UserReader for MemoryUserViews {
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        Ok(self.read().users.get(&id).cloned())
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
        let state = self.read();
        Ok(state
            .by_email
            .get(email.as_str())
            .and_then(|id| state.users.get(id))
            .cloned())
    }

    async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        let state = self.read();
        let needle = filter
            .display_name_contains
            .as_ref()
            .map(|s| s.to_lowercase());
        let mut users: Vec<&UserView> = state
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
