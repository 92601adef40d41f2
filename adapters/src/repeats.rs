//! Bounded logging of repeated failures. A dependency that is down fails the same way many
//! times a second (every reconnect, every retry, every client); the first failure is worth
//! a line, the rest only their count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeated failure is logged again by default.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(30);

/// One kind of failure: logged the first time, then at most once per `every`, each time
/// with how many were not logged since.
#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Repeats {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Records one occurrence. `Some(n)`: log it now, noting the `n` occurrences that were
    /// not logged since the last line; `None`: count it silently.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// [`Repeats`] for many kinds of failure at once, each by its key (an error code, say),
/// shared between threads. Bounded: keys are few in practice, and when there are more than
/// `MAX_KEYS` the oldest are forgotten.
#[derive(Debug)]
pub struct RepeatsByKey {
    every: Duration,
    entries: Mutex<HashMap<String, Repeats>>,
}

const MAX_KEYS: usize = 256;

impl RepeatsByKey {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// As [`Repeats::admit`], for the failure named `key`.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !entries.contains_key(key) && entries.len() >= MAX_KEYS {
            entries.clear();
        }
        entries
            .entry(key.to_owned())
            .or_insert_with(|| Repeats::new(self.every))
            .admit()
    }
}

impl Default for RepeatsByKey {
    fn default() -> Self {
        Self::new(DEFAULT_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_then_one_per_period_with_the_count_between() {
        let mut r = Repeats::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.admit_at(t0), Some(0));
        for i in 1..=20 {
            assert_eq!(r.admit_at(t0 + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(r.admit_at(t0 + Duration::from_secs(10)), Some(20));
        assert_eq!(r.admit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(r.admit_at(t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn each_key_is_counted_on_its_own() {
        let r = RepeatsByKey::new(Duration::from_secs(3600));
        assert_eq!(r.admit("a"), Some(0));
        assert_eq!(r.admit("b"), Some(0));
        assert_eq!(r.admit("a"), None);
        assert_eq!(r.admit("b"), None);
    }
}
