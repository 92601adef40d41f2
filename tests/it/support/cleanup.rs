//! Panic-safe cleanup: a test runs on a fixture (an app, a database, a cluster's resources),
//! and the fixture is torn down whether the test passed or panicked; then the panic, if any,
//! fails the test.

use futures::FutureExt as _;
use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};

/// What a test owns outside the process (databases, topics, keys) and must remove.
pub trait Teardown {
    /// Stops what runs and removes what was created; never panics.
    fn teardown(self) -> impl Future<Output = ()>;
}

impl<A: Teardown, B: Teardown> Teardown for (A, B) {
    async fn teardown(self) {
        self.0.teardown().await;
        self.1.teardown().await;
    }
}

/// Runs `test` on `fixture`, tears the fixture down, then re-raises the test's panic.
pub async fn run<F: Teardown>(mut fixture: F, test: impl AsyncFnOnce(&mut F)) {
    let outcome = AssertUnwindSafe(test(&mut fixture)).catch_unwind().await;
    fixture.teardown().await;
    if let Err(panic) = outcome {
        resume_unwind(panic);
    }
}

/// One test `$test` that runs `super::$scenario` on `TestApp::$backend()` and cleans up.
macro_rules! scenario_test {
    ($test:ident, $backend:ident, $scenario:ident $(, #[$attr:meta])*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        $(#[$attr])*
        async fn $test() {
            $crate::support::run(
                $crate::support::TestApp::$backend().await,
                async |app| super::$scenario(app).await,
            )
            .await;
        }
    };
}

/// Instantiates each scenario `async fn name(app: &TestApp)` (or `&mut TestApp`, to restart
/// it) as two tests, `name::sqlite` and `name::postgres`, each on a fresh backend that is
/// cleaned up afterwards. Attributes written before a name go on both tests.
macro_rules! on_both_backends {
    ($($(#[$attr:meta])* $scenario:ident),* $(,)?) => {$(
        mod $scenario {
            scenario_test!(sqlite, start, $scenario $(, #[$attr])*);
            scenario_test!(postgres, postgres, $scenario $(, #[$attr])*);
        }
    )*};
}

/// Instantiates each scenario for PostgreSQL only, as `name::postgres`.
macro_rules! on_postgres {
    ($($(#[$attr:meta])* $scenario:ident),* $(,)?) => {$(
        mod $scenario {
            scenario_test!(postgres, postgres, $scenario $(, #[$attr])*);
        }
    )*};
}

/// Instantiates each `test: create => scenario` as a test `test` that runs
/// `scenario(&mut Cluster)` on `Cluster::create()` (or another constructor, such as
/// `create_alone`) and cleans the cluster's resources up afterwards.
macro_rules! on_cluster {
    ($($test:ident: $create:ident => $scenario:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            $crate::support::run($crate::support::Cluster::$create().await, $scenario).await;
        }
    )*};
}
