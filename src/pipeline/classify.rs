//! Stage 3, **classify**: what is being touched.
//!
//! The active CRM profiles ([`crate::profile`], `[classify] profiles`)
//! map the method and the canonical path to `input.resource`. A route of a
//! JSON-RPC API (Odoo's `/web/dataset/call_kw`) names the model and the
//! method in the body: then up to `[classify] body_inspect_max_bytes` of
//! the body are read before deciding, and everything read is replayed to
//! the upstream ahead of the rest of the body, which still streams.
//! Unknown routes stay `type: "unknown"` so that policies decide about
//! them explicitly.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};

use super::enforce::RequestBody;
use crate::input::Resource;
use crate::profile::{BodyOutcome, Classified, Profiles};

/// Classifies an ingress request. Returns the resource, and the body to
/// forward (the original, or a replay of what inspection read).
pub async fn classify(
    profiles: &Profiles,
    parts: &http::request::Parts,
    body: Incoming,
    limits: &BodyLimits,
) -> (Resource, RequestBody) {
    match profiles.classify(&parts.method, parts.uri.path(), parts.uri.query()) {
        Classified::Done(resource) => (resource, RequestBody::Streaming(body)),
        Classified::NeedsBody(pending) => {
            let (read, forward) = read_for_inspection(parts, body, limits).await;
            let outcome = match &read {
                Read::Complete(b) => BodyOutcome::Complete(b),
                Read::TooLarge => BodyOutcome::TooLarge,
                Read::Timeout => BodyOutcome::Timeout,
                Read::Unreadable => BodyOutcome::Unreadable,
            };
            (pending.finish(outcome), forward)
        }
    }
}

/// How much of a body inspection may read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

enum Read {
    Complete(Bytes),
    TooLarge,
    Timeout,
    Unreadable,
}

/// Reads the body up to `max_bytes` (and `timeout`), keeping every frame
/// read so that the upstream receives the body unchanged.
async fn read_for_inspection(
    parts: &http::request::Parts,
    mut body: Incoming,
    limits: &BodyLimits,
) -> (Read, RequestBody) {
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        // Known too large before reading a byte: stream it untouched.
        return (Read::TooLarge, RequestBody::Streaming(body));
    }
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut seen = 0usize;
    let reading = async {
        loop {
            match body.frame().await {
                None => return Ok(true),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        seen += d.len();
                    }
                    frames.push_back(frame);
                    if seen > limits.max_bytes {
                        return Ok(false);
                    }
                }
            }
        }
    };
    let result = tokio::time::timeout(limits.timeout, reading).await;
    let read = match result {
        Ok(Ok(true)) => {
            let mut all = BytesMut::with_capacity(seen);
            for f in &frames {
                if let Some(d) = f.data_ref() {
                    all.extend_from_slice(d);
                }
            }
            Read::Complete(all.freeze())
        }
        Ok(Ok(false)) => Read::TooLarge,
        Ok(Err(e)) => {
            tracing::debug!("request body unreadable during inspection: {e}");
            return (
                Read::Unreadable,
                RequestBody::Replay {
                    frames,
                    rest: None,
                    error: Some(Box::new(e)),
                },
            );
        }
        Err(_) => Read::Timeout,
    };
    let rest = (!body.is_end_stream()).then_some(body);
    (
        read,
        RequestBody::Replay {
            frames,
            rest,
            error: None,
        },
    )
}

/// Classifies an egress request. Without TLS interception a tunnel's
/// content is unknown: `type` says how the data leaves (`tunnel` for
/// `CONNECT`, `http` for a plain request), `operation` is `send`.
pub fn classify_egress(tunnel: bool) -> Resource {
    Resource {
        crm: "egress".into(),
        kind: if tunnel { "tunnel" } else { "http" }.into(),
        id: None,
        operation: "send".into(),
        bulk: false,
        inspection: None,
    }
}
