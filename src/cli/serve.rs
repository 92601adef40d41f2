//! `pcf serve`: the process's roles, served until Ctrl-C.

use anyhow::Context;

use crate::app::Role;
use crate::config::Config;

/// Builds the roles' parts and serves HTTP until Ctrl-C, then stops the background tasks.
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
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        },
    )
    .await?;
    app.shutdown().await;
    Ok(())
}
