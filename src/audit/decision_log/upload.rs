//! One POST of a gzip JSON batch to the collector, the way OPA's
//! decision-log plugin sends it (`Content-Encoding: gzip`,
//! `Content-Type: application/json`), over http or https (rustls), with an
//! optional bearer token and a bound on the whole exchange.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;

use crate::tls::HttpsConnector;

/// How an upload ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The collector answered, but not 2xx.
    Status(u16),
    /// No answer: connection refused, TLS failure, timeout.
    Network(String),
}

pub struct Uploader {
    runtime: tokio::runtime::Runtime,
    client: Client<HttpsConnector, Full<Bytes>>,
    uri: http::Uri,
    bearer_token_file: Option<PathBuf>,
    timeout: Duration,
}

impl Uploader {
    pub fn new(
        url: &str,
        ca: Option<&std::path::Path>,
        bearer_token_file: Option<PathBuf>,
        timeout: Duration,
    ) -> anyhow::Result<Uploader> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("[audit.decision_log] url {url:?}"))?;
        let https = crate::tls::https_connector(ca, "[audit.decision_log] ca")?;
        if let Some(path) = &bearer_token_file {
            read_token(path)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the decision-log runtime")?;
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Uploader {
            runtime,
            client,
            uri,
            bearer_token_file,
            timeout,
        })
    }

    /// Sends one gzip batch and waits (at most `timeout`) for the answer.
    pub fn post(&self, gz: Vec<u8>) -> Outcome {
        let mut req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_ENCODING, "gzip")
            .header(
                http::header::USER_AGENT,
                concat!("rempart/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(path) = &self.bearer_token_file {
            // Read each time: mounted tokens are rotated in place.
            match read_token(path) {
                Ok(token) => {
                    req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                }
                Err(e) => return Outcome::Network(format!("{e:#}")),
            }
        }
        let req = match req.body(Full::new(Bytes::from(gz))) {
            Ok(r) => r,
            Err(e) => return Outcome::Network(format!("cannot build the request: {e}")),
        };
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = resp.status();
            // Read (a bounded amount of) the answer so that the connection
            // can be reused.
            let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
            Ok::<_, String>(status)
        };
        match self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, exchange).await })
        {
            Ok(Ok(status)) if status.is_success() => Outcome::Delivered,
            Ok(Ok(status)) => Outcome::Status(status.as_u16()),
            Ok(Err(e)) => Outcome::Network(e),
            Err(_) => Outcome::Network(format!("no answer within {:?}", self.timeout)),
        }
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the bearer token file {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        anyhow::bail!(
            "bearer token file {}: expected one token on one line",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Exponential backoff with "equal jitter": after `failures` failed
/// attempts, wait between half and all of `min · 2^(failures-1)` (capped at
/// `max`), so that many gateways do not retry in step after an outage.
pub fn backoff(min: Duration, max: Duration, failures: u32, random: u64) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let full = exp.min(max);
    let half = full / 2;
    let span = (full - half).as_millis() as u64;
    half + Duration::from_millis(if span == 0 { 0 } else { random % (span + 1) })
}

/// A small xorshift generator for the jitter (not for secrets).
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_cap() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let mut j = Jitter::new();
        for failures in 1..40 {
            let full = min.saturating_mul(1 << (failures - 1).min(20)).min(max);
            for _ in 0..20 {
                let d = backoff(min, max, failures, j.next());
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
            }
        }
        assert_eq!(backoff(min, max, 6, 0), Duration::from_secs(15));
    }
}
