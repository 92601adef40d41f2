//! What the wiring of a process builds up as it goes: the configuration and roles, the event
//! store, the metrics, the shutdown signal, the background tasks and the dependencies
//! readiness checks; and what each mode gives the query side.

use pcf_command::EventStore;
use pcf_domain::ports::{EventLog, ProjectionMonitor, UserReader};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::roles::Role;
use crate::config::Config;
use crate::http::health::Dependencies;
use crate::http::metrics::Metrics;

/// A process being wired.
pub struct Process<'a> {
    pub config: &'a Config,
    pub roles: &'a [Role],
    pub store: Arc<dyn EventStore>,
    pub log: Arc<dyn EventLog>,
    /// Opens the personal data of events for the readers allowed to see it.
    pub keys: Arc<pcf_adapters::keys::Keys>,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    /// Raised when the process begins to stop (`App::begin_shutdown`), before it stops
    /// serving: readiness answers 503 and websocket sessions are closed.
    pub stopping: watch::Receiver<bool>,
    pub tasks: Vec<JoinHandle<()>>,
    pub dependencies: Dependencies,
    /// The PostgreSQL primary, for the pools that write to it (PostgreSQL only).
    pub primary: Option<Arc<super::primary::PrimaryLocator>>,
}

impl Process<'_> {
    /// Whether the process has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Runs `task` in the background until the process stops.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Completes when the process is told to stop.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        super::background::wait_for(self.shutdown.clone())
    }
}

/// What a mode gives the query side: the user view readers, and the projections' status.
pub struct ReadSide {
    pub users: Arc<dyn UserReader>,
    pub monitor: Arc<dyn ProjectionMonitor>,
}
