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
    let profile = dir.join("rpc.json");
    std::fs::write(&profile, RPC_PROFILE).unwrap();
    Rempart::with_config(
        dir,
        "rempart.toml",
        &format!(
            "[upstream]\nurl = \"{}\"\n[classify]\nprofiles = [\"{}\", \"creme\"]\n\
             body_inspect_max_bytes = 1024\nbody_inspect_timeout = \"700ms\"\n",
            up.url(),
            profile.display()
        ),
    )
    .unwrap()
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

    // Malformed JSON: unknown, said so, and still forwarded whole.
    let bad = "{\"params\": {\"model\": ";
    let (status, id, text) = send_body(&rp, "/upload", Full::new(Bytes::from(bad))).await;
    assert_eq!((status, text), (200, bad.len().to_string()));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["type"], "unknown", "{rec}");
    assert_eq!(rec["resource"]["inspection"], "malformed", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_bound_stream_uninspected() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = start(&up, dir.path());

    // Declared too large: not read at all before deciding.
    let big = vec![b' '; 200_000];
    let (status, id, text) = send_body(&rp, "/upload", Full::new(Bytes::from(big))).await;
    assert_eq!((status, text.as_str()), (200, "200000"));
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["resource"]["inspection"], "too_large", "{rec}");
    assert_eq!(rec["resource"]["type"], "unknown", "{rec}");

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
    let rp = start(&up, dir.path());
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
