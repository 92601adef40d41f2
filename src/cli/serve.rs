//! `pcf serve`: the process's roles, served until SIGTERM or Ctrl-C.

use anyhow::Context;

use crate::app::Role;
use crate::config::Config;

/// Builds the roles' parts and serves HTTP until SIGTERM or Ctrl-C; then readiness turns
/// 503 and websocket sessions close (1012), and after `shutdown_delay` the server stops
/// accepting connections, lets open requests finish, and stops the background tasks.
pub async fn serve(config: Config, roles: &[Role]) -> anyhow::Result<()> {
    let app = crate::app::build_roles(&config, roles).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mode = if config.embedded() {
        format!("embedded, data in {}", config.data_dir.display())
    } else if config.uses_kafka() {
        "cluster".to_owned()
    } else {
        "PostgreSQL event store, in-process bus".to_owned()
    };
    tracing::info!(%addr, %mode, "PCF listening");
    println!("PCF listening on http://{addr} ({mode})");
    if config.environment == crate::config::Environment::Development {
        println!("GraphiQL: http://{addr}/graphiql");
    }
    if let Some(token) = &app.dev_token {
        println!("No PCF_JWT_SECRET set: tokens are signed with a random secret until restart.");
        println!("Development admin token (12h): {token}");
    }
    let router = app.router.clone();
    crate::http::server::serve(
        listener,
        router,
        crate::http::server::ConnectionLimits::from_config(&config),
        async {
            let signal = stop_signal().await;
            // Readiness answers 503 and websocket clients are told to reconnect elsewhere;
            // requests are still served while load balancers notice.
            app.begin_shutdown();
            tracing::info!(
                %signal,
                delay_ms = config.shutdown_delay.as_millis() as u64,
                "shutting down: not ready, then no new connections, open requests finish"
            );
            tokio::time::sleep(config.shutdown_delay).await;
        },
    )
    .await?;
    // The relay releases its lease and the projectors commit what they applied.
    app.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Completes at SIGTERM (how orchestrators stop a process) or SIGINT (Ctrl-C); its name.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
