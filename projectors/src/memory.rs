//! In-memory user views for embedded mode, rebuilt from the log at start.

use async_trait::async_trait;
use pcf_domain::ports::{PortError, UserReader};
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

    async fn replace(&self, previous: Option<&UserView>, next: &UserView) -> Result<(), PortError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let stored_version = state.users.get(&next.id).map_or(0, |v| v.version);
        if stored_version != previous.map_or(0, |v| v.version) || next.version <= stored_version {
            return Ok(());
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
        Ok(())
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
}
