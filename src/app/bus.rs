//! The in-process bus of embedded mode: every published batch goes to every subscriber, in
//! order, without loss (unbounded channels; the relay's batches bound what is in flight).

use async_trait::async_trait;
use pcf_domain::ports::{EventPublisher, PortError};
use pcf_domain::EventEnvelope;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

type Batch = Arc<Vec<EventEnvelope>>;

/// Fan-out of event batches to in-process subscribers.
#[derive(Default)]
pub struct InProcessBus {
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Batch>>>,
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber receives every batch published from now on.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Batch> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().push(tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::UnboundedSender<Batch>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl EventPublisher for InProcessBus {
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), PortError> {
        let batch: Batch = Arc::new(events.to_vec());
        // Subscribers that went away are dropped; the others get the batch.
        self.lock().retain(|tx| tx.send(batch.clone()).is_ok());
        Ok(())
    }
}
