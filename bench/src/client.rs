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
    /// `Bearer …`, made once.
    authorization: Option<hyper::header::HeaderValue>,
}

impl HttpClient {
    pub fn new(base: String, token: Option<String>) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build_http();
        let authorization = token.and_then(|t| format!("Bearer {t}").parse().ok());
        Self {
            client,
            base,
            authorization,
        }
    }

    /// POSTs a GraphQL request; fails unless it answered 200 without errors.
    pub async fn graphql(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let bytes = self
            .post_graphql(Bytes::from(serde_json::to_vec(body)?))
            .await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)?;
        anyhow::ensure!(value.get("errors").is_none(), "{value}");
        Ok(value)
    }

    /// POSTs a GraphQL request already encoded, and checks the answer as `graphql` does
    /// without decoding it: a response with errors has an `"errors"` key, and those bytes
    /// cannot occur inside a JSON string (its quotes are escaped there).
    pub async fn graphql_encoded(&self, body: Bytes) -> anyhow::Result<()> {
        let bytes = self.post_graphql(body).await?;
        anyhow::ensure!(
            !bytes.windows(9).any(|w| w == b"\"errors\":"),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(())
    }

    /// The body of a 200 answer to a POST on /graphql.
    async fn post_graphql(&self, body: Bytes) -> anyhow::Result<Bytes> {
        let mut req = hyper::Request::post(format!("{}/graphql", self.base))
            .header("content-type", "application/json");
        if let Some(authorization) = &self.authorization {
            req = req.header("authorization", authorization.clone());
        }
        let resp = self
            .client
            .request(req.body(Full::new(body))?)
            .await
            .context("request failed")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "{status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(bytes)
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
