//! Capturing what the product logs: a `tracing` writer into a shared buffer.

use std::sync::{Arc, Mutex};

/// A runtime whose every thread (workers and blocking ones) logs and traces through
/// `dispatch`, as the threads' default dispatcher rather than the process's global one, so that
/// other tests of the binary keep theirs. Run `block_on` inside
/// `tracing::dispatcher::with_default(dispatch, …)` to cover its own thread too.
pub fn runtime_with(dispatch: &tracing::Dispatch, workers: usize) -> tokio::runtime::Runtime {
    let for_threads = dispatch.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_start(move || {
            // Kept for the thread's life.
            std::mem::forget(tracing::dispatcher::set_default(&for_threads));
        })
        .build()
        .expect("a runtime")
}

/// A log writer into a shared buffer; clones write into the same buffer.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
