//! The benchmark's HTTP client: pooled HTTP/1.1 connections over loopback.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Sends requests to one server.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    token: Option<String>,
}

impl HttpClient {
    pub fn new(base: String, token: Option<String>) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build_http();
        Self {
            client,
            base,
            token,
        }
    }

    /// POSTs a GraphQL request; fails unless it answered 200 without errors.
    pub async fn graphql(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut req = hyper::Request::post(format!("{}/graphql", self.base))
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let resp = self.client.request(req).await.context("request failed")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes)?;
        anyhow::ensure!(
            status.is_success() && value.get("errors").is_none(),
            "{status}: {value}"
        );
        Ok(value)
    }

    /// GETs a path; fails unless it answered 200.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let req =
            hyper::Request::get(format!("{}{path}", self.base)).body(Full::new(Bytes::new()))?;
        let resp = self.client.request(req).await.context("request failed")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "{status}");
        Ok(bytes)
    }
}
