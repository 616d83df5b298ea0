//! Classification through the real gateway: CRM profiles loaded from the
//! configuration, path tricks, and JSON-RPC body inspection with the body
//! still reaching a real upstream whole (read part replayed, rest streamed).

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{ChannelBody, Rempart, Upstream};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A JSON-RPC profile on the common upstream's `/upload` route (which
/// answers with the number of body bytes it received).
const RPC_PROFILE: &str = r#"{
  "crm": "rpc",
  "types": {"res.partner": "contact"},
  "routes": [
    {"methods": ["POST"], "path": "/upload",
     "body": {"type": "/params/model", "operation": "/params/method", "id": "/params/args/0",
              "operations": {"search_read": "list", "unlink": "delete"}}}
  ]
}"#;

fn start(up: &Upstream, dir: &Path) -> Rempart {
    start_with(up, dir, "enforce", "")
}

/// rempart with the test profile, then `extra_profile` (e.g. the shipped
/// `odoo`), then `creme`, in `mode`. The streaming tests run in `monitor`
/// mode: the shipped policies deny a body they could not inspect
/// (`body_not_inspected`), and monitor mode forwards it anyway, which is
/// what shows that the part read was replayed and the rest streamed.
fn start_with(up: &Upstream, dir: &Path, mode: &str, extra_profile: &str) -> Rempart {
    let profile = dir.join("rpc.json");
    std::fs::write(&profile, RPC_PROFILE).unwrap();
    let extra = if extra_profile.is_empty() {
        String::new()
    } else {
        format!("\"{extra_profile}\", ")
    };
    Rempart::with_config(
        dir,
        "rempart.toml",
        &format!(
            "[server]\nmode = \"{mode}\"\n[upstream]\nurl = \"{}\"\n[classify]\n\
             profiles = [\"{}\", {extra}\"creme\"]\n\
             body_inspect_max_bytes = 1024\nbody_inspect_timeout = \"700ms\"\n",
            up.url(),
            profile.display()
        ),
    )
    .unwrap()
}

/// The deny codes of a record's decision.
fn deny_codes(rec: &serde_json::Value) -> Vec<String> {
    rec["decision"]["deny"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn send_body<B>(rp: &Rempart, path: &str, body: B) -> (u16, String, String)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    let req = http::Request::builder()
        .method("POST")
        .uri(rp.url(path))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let id = resp.headers()["x-rempart-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    (status, id, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rpc_body_is_inspected_then_forwarded_whole() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start(&up, dir.path());

    let body = r#"{"jsonrpc":"2.0","method":"call","params":{"model":"res.partner","method":"unlink","args":[[42]]}}"#;
    let (status, id, text) = send_body(&rp, "/upload", Full::new(Bytes::from(body))).await;
    assert_eq!(status, 200);
    assert_eq!(
        text,
        body.len().to_string(),
        "the upstream got the whole body"
    );
    let rec = rp.audit_record(&id).await;
    let r = &rec["resource"];
    assert_eq!(
        (
            &r["crm"],
            &r["type"],
            &r["operation"],
            &r["id"],
            &r["inspection"]
        ),
        (
            &"rpc".into(),
            &"contact".into(),
            &"delete".into(),
            &"42".into(),
            &"inspected".into()
        ),
        "{rec}"
    );

    // Malformed JSON: unknown, said so, and refused: the call cannot show
    // it is not a delete.
    let bad = "{\"params\": {\"model\": ";
    let (status, id, text) = send_body(&rp, "/upload", Full::new(Bytes::from(bad))).await;
    assert_eq!(status, 403, "{text}");
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["type"], "unknown", "{rec}");
    assert_eq!(rec["resource"]["inspection"], "malformed", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_bound_stream_uninspected() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start_with(&up, dir.path(), "monitor", "");

    // Declared too large: not read at all before deciding.
    let big = vec![b' '; 200_000];
    let (status, id, text) = send_body(&rp, "/upload", Full::new(Bytes::from(big))).await;
    assert_eq!((status, text.as_str()), (200, "200000"));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
    assert_eq!(rec["resource"]["type"], "unknown", "{rec}");
    assert_eq!(rec["decision"]["outcome"], "monitored", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");

    // Chunked, no length: read past the bound, then the read part is
    // replayed and the rest streams.
    let (tx, body) = ChannelBody::new();
    let sender = tokio::spawn(async move {
        for _ in 0..50 {
            tx.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
        }
    });
    let (status, id, text) = send_body(&rp, "/upload", body).await;
    sender.await.unwrap();
    assert_eq!((status, text.as_str()), (200, "50000"));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_decided_without_it_and_still_forwarded() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start_with(&up, dir.path(), "monitor", "");
    let (tx, body) = ChannelBody::new();
    let sender = tokio::spawn(async move {
        tx.send(Bytes::from_static(b"{\"params\":")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.send(Bytes::from_static(b"{}}")).await.unwrap();
    });
    let (status, id, text) = send_body(&rp, "/upload", body).await;
    sender.await.unwrap();
    assert_eq!((status, text.as_str()), (200, "13"));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "timeout", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_classified_as_the_crm_serves_them() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start(&up, dir.path());
    for (path, denied) in [
        (
            "/persons/../creme_core/mass_export?hfilter=persons-hf_contact",
            true,
        ),
        (
            "/persons/%2e%2e/creme_core/mass_export?hfilter=persons-hf_contact",
            true,
        ),
        ("/creme_core%2Fmass_export?hfilter=persons-hf_contact", true),
        (
            "//creme_core//mass_export/?hfilter=persons-hf_contact",
            false,
        ),
        ("/CREME_CORE/Mass_Export?hfilter=persons-hf_contact", false),
    ] {
        let reply = common::get(&rp.url(path)).await;
        let rec = rp.audit_record(&reply.decision_id()).await;
        let r = &rec["resource"];
        assert_eq!(
            (&r["crm"], &r["type"], &r["operation"], &r["bulk"]),
            (
                &"creme".into(),
                &"contact".into(),
                &"export".into(),
                &true.into()
            ),
            "{path}: {rec}"
        );
        // The library still refuses the traversal itself.
        assert_eq!(reply.status == 403, denied, "{path}: {rec}");
        assert!(r.get("inspection").is_none(), "{rec}");
    }
    // No route: unknown, and the decision is recorded with it.
    let reply = common::get(&rp.url("/activities/calendar")).await;
    let rec = rp.audit_record(&reply.decision_id()).await;
    assert_eq!(rec["resource"]["type"], "unknown", "{rec}");
    assert_eq!(rec["resource"]["operation"], "other", "{rec}");
}

/// An Odoo `unlink` through the shipped `odoo` profile.
fn unlink_body(padding: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"call","params":{{"model":"res.partner","method":"unlink","args":[[42]],"kwargs":{{"context":{{"pad":"{}"}}}}}}}}"#,
        "x".repeat(padding)
    )
}

/// The shipped `odoo` profile against a real upstream: an inspected call is
/// classified from its body and forwarded whole; a call padded past the
/// inspection bound, or with a body serde refuses (`NaN`), cannot hide an
/// `unlink`: it is refused with `body_not_inspected`, saying why, and
/// never reaches the CRM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_odoo_profile_inspects_then_streams_and_refuses_what_it_cannot_read() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start_with(&up, dir.path(), "enforce", "odoo");

    let small = unlink_body(10);
    let (status, id, text) = send_body(
        &rp,
        "/web/dataset/call_kw",
        Full::new(Bytes::from(small.clone())),
    )
    .await;
    assert_eq!((status, text), (200, small.len().to_string()));
    let rec = rp.audit_record(&id).await;
    let r = &rec["resource"];
    assert_eq!(
        (
            &r["crm"],
            &r["type"],
            &r["operation"],
            &r["id"],
            &r["inspection"]
        ),
        (
            &"odoo".into(),
            &"contact".into(),
            &"delete".into(),
            &"42".into(),
            &"inspected".into()
        ),
        "{rec}"
    );

    // Padded past the bound: declared too large, and chunked without a
    // length (read past the bound), both refused before the CRM sees them.
    let before = up.seen_paths().len();
    let padded = unlink_body(5000);
    let (status, id, text) = send_body(
        &rp,
        "/web/dataset/call_kw/res.partner/unlink",
        Full::new(Bytes::from(padded.clone())),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["reasons"][0]["code"], "body_not_inspected", "{reply}");
    assert_eq!(
        reply["reasons"][0]["message"],
        "POST /web/dataset/call_kw/res.partner/unlink: the request body was not inspected \
         (it is larger than [classify] body_inspect_max_bytes), so what the call does is unknown"
    );
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
    assert!(rec["decision"]["warn"]
        .as_array()
        .is_none_or(|w| w.iter().all(|r| r["code"] != "unclassified_request")));
    let (tx, body) = ChannelBody::new();
    let sender = tokio::spawn(async move {
        for chunk in padded.as_bytes().chunks(700) {
            if tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                break;
            }
        }
    });
    let (status, id, _) = send_body(&rp, "/web/dataset/call_kw", body).await;
    let _ = sender.await;
    assert_eq!(status, 403);
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");

    // A body serde refuses (NaN is not JSON; Python's json accepts it).
    let nan = small.replace("[[42]]", "[[42]], \"limit\": NaN");
    let (status, id, _) = send_body(&rp, "/web/dataset/call_kw", Full::new(Bytes::from(nan))).await;
    assert_eq!(status, 403);
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "malformed", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");
    assert_eq!(
        up.seen_paths().len(),
        before,
        "refused calls reached the CRM"
    );
}

/// The same profile in monitor mode: what was read for inspection is
/// replayed ahead of the rest, and the CRM receives every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_odoo_profile_streams_a_body_past_the_bound_whole() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start_with(&up, dir.path(), "monitor", "odoo");
    let padded = unlink_body(50_000);
    let len = padded.len();
    let (tx, body) = ChannelBody::new();
    let sender = tokio::spawn(async move {
        for chunk in padded.as_bytes().chunks(1000) {
            tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
    });
    let (status, id, text) = send_body(&rp, "/web/dataset/call_kw", body).await;
    sender.await.unwrap();
    assert_eq!((status, text), (200, len.to_string()));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["crm"], "odoo", "{rec}");
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
    assert_eq!(rec["decision"]["outcome"], "monitored", "{rec}");
    assert_eq!(deny_codes(&rec), ["body_not_inspected"], "{rec}");
}

#[test]
fn bad_profiles_stop_the_start_with_where_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"crm":"x","routes":[{"path":"/a"},{"path":"/b/{id}","operation":"erase"}]}"#,
    )
    .unwrap();
    for (profiles, expect) in [
        ("[\"nosuch\"]", "no built-in profile \"nosuch\""),
        (
            &format!("[\"{}\"]", bad.display()) as &str,
            "route 2 (\"/b/{id}\"): unknown operation \"erase\"",
        ),
        ("[]", "[classify] profiles is empty"),
    ] {
        let err = match Rempart::with_config(
            dir.path(),
            "r.toml",
            &format!(
                "[upstream]\nurl = \"http://127.0.0.1:9\"\n[classify]\nprofiles = {profiles}\n"
            ),
        ) {
            Ok(_) => panic!("started with profiles = {profiles}"),
            Err(e) => e,
        };
        assert!(err.contains(expect), "{profiles}: {err}");
    }
}
