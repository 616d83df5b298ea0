//! The egress forward proxy, over real sockets: a real rempart process, a
//! real DNS server (UDP, on loopback), real destination servers (HTTP, TLS,
//! echo) on loopback addresses that generated GeoIP fixtures place in
//! chosen countries and operators, and real clients (curl, Python
//! requests, raw TCP).
//!
//! The loopback map (see `common::loopback_geo::write_destinations`):
//! - 127.0.0.2 — France, OVHcloud (EU operator in the EU): allowed;
//! - 127.0.0.3 — United States, an operator not in the registry: outside the EU;
//! - 127.0.0.4 — Germany, Amazon (US operator in the EU): non-EU jurisdiction;
//! - 127.0.0.1 and others — not located (loopback, lifted for the tests by
//!   `internal_networks`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::Dns;
use common::Rempart;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use common::loopback_geo::{EU, US, US_OPERATOR_IN_EU};

// -------------------------------------------------------- destinations

#[derive(Clone, Copy)]
enum Kind {
    /// Answers every HTTP/1.1 request with "hello from <ip>".
    Http,
    /// Echoes every byte back.
    Echo,
}

/// A destination server on one loopback address, counting connections.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(ip: &str, kind: Kind) -> Server {
        Self::start_with(ip, move |stream| async move {
            match kind {
                Kind::Http => serve_http(stream).await,
                Kind::Echo => {
                    let (mut r, mut w) = stream.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            }
        })
        .await
    }

    async fn start_with<F, Fut>(ip: &str, serve: F) -> Server
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let serve = Arc::new(serve);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let serve = serve.clone();
                tokio::spawn(async move { serve(stream).await });
            }
        });
        Server {
            addr,
            accepted,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve_http(stream: TcpStream) {
    let ip = stream.local_addr().unwrap().ip();
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let body = format!("hello from {ip}\n{head}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A TLS server (certificate for `name`, self-signed) answering one
/// HTTP request per connection with "secure hello".
async fn tls_server(ip: &str, name: &str, dir: &Path) -> (Server, PathBuf) {
    use tokio_rustls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let ca = dir.join(format!("{name}.pem"));
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let server = Server::start_with(ip, move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = "secure hello\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
    .await;
    (server, ca)
}

// ------------------------------------------------------------- rempart

struct Setup {
    rempart: Rempart,
    dir: tempfile::TempDir,
    proxy: SocketAddr,
}

fn start(dns: Option<SocketAddr>, extra_toml: &str) -> Setup {
    start_with(dns, extra_toml, |_| {})
}

fn start_with(
    dns: Option<SocketAddr>,
    extra_toml: &str,
    patch: impl FnOnce(&mut serde_json::Value),
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (country, asn) = common::loopback_geo::write_destinations(dir.path());
    let policies = common::loopback_geo::policies_with(dir.path(), patch);
    let dns_line = dns.map_or(String::new(), |a| format!("dns_servers = [\"{a}\"]\n"));
    let toml = format!(
        "[egress]\nlisten = \"127.0.0.1:0\"\n{dns_line}dns_timeout = \"700ms\"\nheader_read_timeout = \"1s\"\n{extra_toml}\n\
         [geo]\ncountry_db = \"{}\"\nasn_db = \"{}\"\nlocate_non_public = true\n",
        country.display(),
        asn.display()
    );
    let cfg = dir.path().join("rempart.toml");
    std::fs::write(&cfg, toml).unwrap();
    let rempart = Rempart::try_start(
        "",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--policies",
            policies.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("rempart did not start: {e}"));
    let proxy = rempart.egress.expect("egress listener");
    Setup {
        rempart,
        dir,
        proxy,
    }
}

/// Sends a raw request head to the proxy; returns the status code, the
/// whole head, and the stream (positioned after the head).
async fn raw(proxy: SocketAddr, head: &str) -> (u16, String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("proxy answered in time")
            .unwrap();
        if n == 0 || line == "\r\n" {
            break;
        }
        text.push_str(&line);
    }
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text, r)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn connect(proxy: SocketAddr, target: &str) -> (u16, String, BufReader<TcpStream>) {
    raw(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await
}

async fn body_of(r: &mut BufReader<TcpStream>, head: &str) -> String {
    let len: usize = header(head, "content-length").unwrap().parse().unwrap();
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).await.unwrap();
    String::from_utf8(b).unwrap()
}

/// The record a tunnel writes when it closes (its bytes and duration).
async fn closing_record(rempart: &Rempart, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = rempart
            .audit_records()
            .into_iter()
            .find(|r| r["decision_id"] == id && r.get("transfer").is_some())
        {
            return r;
        }
        assert!(Instant::now() < deadline, "no closing record for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn deny_codes(record: &serde_json::Value) -> Vec<String> {
    record["decision"]["deny"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_string())
        .collect()
}

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15"])
        .args(args)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .expect("curl is installed (see .ci/run)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// --------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_destination_passes_non_eu_and_us_operator_are_refused_before_connect() {
    let eu = Server::start(EU, Kind::Http).await;
    let us = Server::start(US, Kind::Http).await;
    let us_op = Server::start(US_OPERATOR_IN_EU, Kind::Http).await;
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = tls_server(EU, "eu.test", dir.path()).await;
    let (tls_us, ca_us) = tls_server(US, "us.test", dir.path()).await;
    let dns = Dns::start(&[
        ("eu.test", &[EU]),
        ("us.test", &[US]),
        ("frankfurt.amazon.test", &[US_OPERATOR_IN_EU]),
    ])
    .await;
    let s = start(Some(dns.addr), "");

    // Plain HTTP to the EU destination, by name: forwarded, Host set from
    // the absolute URI.
    let url = format!("http://eu.test:{}/hook?x=1", eu.addr.port());
    let (code, out, err) = curl(&["--proxy", &format!("http://{}", s.proxy), &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("hello from 127.0.0.2"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("host: eu.test:{}", eu.addr.port())),
        "{out}"
    );
    assert!(
        !out.to_ascii_lowercase().contains("proxy-connection"),
        "{out}"
    );

    // HTTPS through a CONNECT tunnel to a real TLS server, with curl.
    let url = format!("https://eu.test:{}/", tls.addr.port());
    let (code, out, err) = curl(&[
        "--proxy",
        &format!("http://{}", s.proxy),
        "--cacert",
        ca.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "secure hello\n");

    // Outside the EU: refused with 403 before any connection is made,
    // for CONNECT and for plain HTTP alike.
    let url = format!("https://us.test:{}/", tls_us.addr.port());
    let (code, _, err) = curl(&[
        "--proxy",
        &format!("http://{}", s.proxy),
        "--cacert",
        ca_us.to_str().unwrap(),
        &url,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let (status, head, mut r) = raw(
        s.proxy,
        &format!(
            "GET http://us.test:{}/ HTTP/1.1\r\nHost: us.test\r\n\r\n",
            us.addr.port()
        ),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    let body: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    assert_eq!(body["reasons"][0]["code"], "destination_outside_eu");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    assert_eq!(body["decision_id"], id.as_str());

    // The EU datacenter of a US operator: refused for its jurisdiction.
    let (status, head, _) = connect(
        s.proxy,
        &format!("frankfurt.amazon.test:{}", us_op.addr.port()),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    let us_op_id = header(&head, "x-rempart-decision-id").unwrap().to_string();

    assert_eq!(
        us.connections(),
        0,
        "a refused destination was connected to"
    );
    assert_eq!(
        tls_us.connections(),
        0,
        "a refused destination was connected to"
    );
    assert_eq!(
        us_op.connections(),
        0,
        "a refused destination was connected to"
    );
    assert_eq!(eu.connections(), 1);
    assert_eq!(tls.connections(), 1);

    // The trail says where each call went and under which law.
    let denied = s.rempart.audit_record(&id).await;
    assert_eq!(denied["direction"], "egress");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["destination"]["host"], "us.test");
    assert_eq!(denied["destination"]["ip"], US);
    assert_eq!(denied["destination"]["geo"]["country"], "US");
    assert_eq!(denied["source"]["ip"], "127.0.0.1");
    let r = s.rempart.audit_record(&us_op_id).await;
    assert_eq!(deny_codes(&r), vec!["destination_non_eu_jurisdiction"]);
    assert_eq!(r["destination"]["geo"]["operator"], "amazon");
    assert_eq!(r["destination"]["geo"]["jurisdiction"], "US");
    assert_eq!(r["request"]["method"], "CONNECT");

    // Allowed tunnel: a decision record, then a closing one with bytes.
    let records = s.rempart.audit_records();
    let tunnel: Vec<_> = records
        .iter()
        .filter(|r| r["request"]["method"] == "CONNECT" && r["destination"]["ip"] == EU)
        .collect();
    assert_eq!(tunnel.len(), 2, "{tunnel:?}");
    assert!(tunnel[0].get("transfer").is_none());
    let t = &tunnel[1]["transfer"];
    assert!(t["bytes_to_destination"].as_u64().unwrap() > 100, "{t}");
    assert!(t["bytes_from_destination"].as_u64().unwrap() > 100, "{t}");
    assert_eq!(t["closed_by"], "completed");
    assert_eq!(tunnel[0]["decision_id"], tunnel[1]["decision_id"]);

    assert_eq!(
        s.rempart
            .metric("rempart_requests_total{direction=\"egress\",outcome=\"denied\"}")
            .await,
        3.0
    );
    assert_eq!(
        s.rempart
            .metric("rempart_requests_total{direction=\"egress\",outcome=\"allowed\"}")
            .await,
        2.0
    );
    assert!(
        s.rempart
            .metric("rempart_egress_bytes_total{flow=\"from_destination\"}")
            .await
            > 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_destination_gets_the_same_decision() {
    let eu = Server::start(EU, Kind::Http).await;
    let us = Server::start(US, Kind::Http).await;
    let s = start(None, "");
    let spellings = |ip: &str, port: u16| -> Vec<String> {
        let v4: std::net::Ipv4Addr = ip.parse().unwrap();
        let n = u32::from(v4);
        let o = v4.octets();
        vec![
            format!("{ip}:{port}"),
            format!("{ip}.:{port}"),
            format!("{n}:{port}"),
            format!("0x{n:x}:{port}"),
            format!("0x{n:X}:{port}"),
            format!("0{:o}.0{:o}.0{:o}.0{:o}:{port}", o[0], o[1], o[2], o[3]),
            format!("0x{:x}.0x{:x}.0x{:x}.0x{:x}:{port}", o[0], o[1], o[2], o[3]),
            format!("{}.{}:{port}", o[0], (n & 0x00ff_ffff)),
            format!("[::ffff:{ip}]:{port}"),
            format!(
                "[::ffff:{:x}{:02x}:{:x}{:02x}]:{port}",
                o[0], o[1], o[2], o[3]
            ),
        ]
    };
    for form in spellings(US, us.addr.port()) {
        let (status, head, _) = connect(s.proxy, &form).await;
        assert_eq!(status, 403, "{form}: {head}");
        let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
        let r = s.rempart.audit_record(&id).await;
        assert_eq!(r["destination"]["ip"], US, "{form}");
        assert_eq!(deny_codes(&r), vec!["destination_outside_eu"], "{form}");
        // Plain HTTP with the same spelling in the absolute URI.
        let (status, head, _) = raw(
            s.proxy,
            &format!("GET http://{form}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 403, "GET {form}: {head}");
    }
    for form in spellings(EU, eu.addr.port()) {
        let (status, head, _) = connect(s.proxy, &form).await;
        assert_eq!(status, 200, "{form}: {head}");
    }
    assert_eq!(us.connections(), 0);
    // (a server counts a connection when it accepts it, just after the
    // proxy's connect returned)
    let deadline = Instant::now() + Duration::from_secs(5);
    while eu.connections() < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(eu.connections(), 10);

    // Metadata service spellings, and the same with a port.
    for form in [
        "169.254.169.254:80",
        "0xa9fea9fe:80",
        "2852039166:80",
        "0251.0376.0251.0376:80",
        "169.254.43518:80",
        "[::ffff:a9fe:a9fe]:80",
    ] {
        let (status, head, _) = connect(s.proxy, form).await;
        assert_eq!(status, 403, "{form}: {head}");
        let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
        let r = s.rempart.audit_record(&id).await;
        assert_eq!(deny_codes(&r), vec!["egress_metadata_service"], "{form}");
        assert_eq!(r["destination"]["ip"], "169.254.169.254", "{form}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_several_addresses_connects_only_to_an_allowed_one() {
    let eu = Server::start(EU, Kind::Http).await;
    // A name has one port for all its addresses: listen on the forbidden
    // addresses at the EU server's port too, to catch any connection.
    let port = eu.addr.port();
    let us_same = TcpListener::bind((US, port)).await.unwrap();
    let us_op_same = TcpListener::bind((US_OPERATOR_IN_EU, port)).await.unwrap();
    let dns = Dns::start(&[
        ("mixed.test", &[US, EU]),
        ("rebind.test", &["169.254.169.254", EU]),
        ("allbad.test", &[US, US_OPERATOR_IN_EU]),
    ])
    .await;
    let s = start(Some(dns.addr), "");

    let (status, head, mut r) = raw(
        s.proxy,
        &format!("GET http://mixed.test:{port}/ HTTP/1.1\r\nHost: mixed.test\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(body_of(&mut r, &head)
        .await
        .starts_with("hello from 127.0.0.2"));
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["destination"]["ip"], EU);
    let listed: Vec<&str> = rec["destination"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![US, EU]);
    assert_eq!(rec["destination"]["addresses"][0]["geo"]["country"], "US");

    let (status, head, _) = connect(s.proxy, &format!("rebind.test:{port}")).await;
    assert_eq!(status, 200, "{head}");

    let (status, head, mut r) = connect(s.proxy, &format!("allbad.test:{port}")).await;
    assert_eq!(status, 403, "{head}");
    let body: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    assert_eq!(body["reasons"][0]["code"], "destination_outside_eu");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["destination"]["addresses"].as_array().unwrap().len(), 2);

    for l in [us_same, us_op_same] {
        let pending = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
        assert!(pending.is_err(), "a forbidden address was connected to");
    }
    assert_eq!(eu.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_address_that_does_not_answer_hands_over_to_the_next_allowed_one() {
    // 127.0.0.5 and .6 are allowed (internal_networks covers loopback, and
    // they are not located) but nothing listens there: connection refused.
    const DEAD: &str = "127.0.0.5";
    const DEAD_TOO: &str = "127.0.0.6";
    let eu = Server::start(EU, Kind::Http).await;
    let port = eu.addr.port();
    let us_same = TcpListener::bind((US, port)).await.unwrap();
    let dns = Dns::start(&[
        ("failover.test", &[DEAD, EU]),
        ("alldead.test", &[DEAD, DEAD_TOO]),
        ("refusedthendead.test", &[US, DEAD]),
    ])
    .await;
    let s = start(Some(dns.addr), "");

    let (status, head, mut r) = raw(
        s.proxy,
        &format!("GET http://failover.test:{port}/ HTTP/1.1\r\nHost: failover.test\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let body = body_of(&mut r, &head).await;
    assert!(body.starts_with("hello from 127.0.0.2"));
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["destination"]["ip"], EU, "{rec}");
    assert_eq!(rec["decision"]["outcome"], "allowed", "{rec}");
    // Plain requests count their body bytes as they stream.
    assert_eq!(
        s.rempart
            .metric("rempart_egress_bytes_total{flow=\"from_destination\"}")
            .await,
        body.len() as f64
    );

    let (status, head, _) = connect(s.proxy, &format!("failover.test:{port}")).await;
    assert_eq!(status, 200, "{head}");
    // The server counts a connection once its accept task ran.
    let deadline = Instant::now() + Duration::from_secs(5);
    while eu.connections() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(eu.connections(), 2);

    // Every allowed address dead: 502 naming each, not a hang and not 403.
    let (status, head, mut r) = connect(s.proxy, &format!("alldead.test:{port}")).await;
    assert_eq!(status, 502, "{head}");
    let body: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    assert_eq!(body["error"], "egress_connect_failed", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{DEAD}:{port}"))
            && message.contains(&format!("{DEAD_TOO}:{port}")),
        "{message}"
    );
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["decision"]["outcome"], "error", "{rec}");

    // A refused address is never tried; the allowed one is dead: the
    // answer is the connection failure.
    let (status, head, _) = connect(s.proxy, &format!("refusedthendead.test:{port}")).await;
    assert_eq!(status, 502, "{head}");
    let pending = tokio::time::timeout(Duration::from_millis(100), us_same.accept()).await;
    assert!(pending.is_err(), "a forbidden address was connected to");
    assert!(s
        .rempart
        .metrics()
        .await
        .lines()
        .any(|l| l.starts_with("rempart_egress_refusals_total{reason=\"connect_failed\"} 2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_failures_and_timeouts_fail_closed() {
    let dns = Dns::start(&[("eu.test", &[EU])]).await;
    let s = start(Some(dns.addr), "");
    let started = Instant::now();
    let (status, head, mut r) = connect(s.proxy, "no-such-name.test:443").await;
    assert_eq!(status, 502, "{head}");
    let body: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    assert_eq!(body["error"], "dns_not_found");

    let (status, head, mut r) = connect(s.proxy, "silent.test:443").await;
    assert_eq!(status, 504, "{head}");
    let body: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    assert_eq!(body["error"], "dns_timeout");
    assert!(started.elapsed() < Duration::from_secs(8));
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["decision"]["outcome"], "error");
    assert_eq!(deny_codes(&rec), vec!["dns_timeout"]);
    assert_eq!(
        s.rempart
            .metric("rempart_egress_refusals_total{reason=\"dns_timeout\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.rempart
            .metric("rempart_egress_refusals_total{reason=\"dns_not_found\"}")
            .await,
        1.0
    );

    // The DNS server goes away: refused, never let through.
    drop(dns);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, head, _) = connect(s.proxy, "eu.test:443").await;
    assert!(status == 502 || status == 504, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_nothing_half_a_request_or_junk_get_bounded_answers() {
    let s = start(None, "max_header_bytes = 8192\n");
    // Nothing at all: closed after header_read_timeout (1s).
    let mut silent = TcpStream::connect(s.proxy).await.unwrap();
    // Half a request head.
    let mut half = TcpStream::connect(s.proxy).await.unwrap();
    half.write_all(b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHo")
        .await
        .unwrap();
    for stream in [&mut silent, &mut half] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "connection not closed in time");
    }
    // A head larger than max_header_bytes: 431.
    let big = "x".repeat(10_000);
    let (status, head, _) = raw(
        s.proxy,
        &format!("GET http://127.0.0.2/ HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 431, "{head}");
    // Not a proxy request, https in the clear, CONNECT without port, junk.
    for (req, want) in [
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET https://127.0.0.2/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("CONNECT 127.0.0.2 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (
            "CONNECT exa_mple..test:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        ("NOT A REQUEST\r\n\r\n", 400),
    ] {
        let (status, head, _) = raw(s.proxy, req).await;
        assert_eq!(status, want, "{req:?}: {head}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = |r: &'static str| {
        let rp = &s.rempart;
        async move {
            rp.metric(&format!("rempart_egress_refusals_total{{reason=\"{r}\"}}"))
                .await
        }
    };
    assert_eq!(m("header_too_large").await, 1.0);
    assert!(m("header_timeout").await >= 2.0);
    assert_eq!(m("bad_request").await, 4.0);
    assert!(m("malformed").await >= 1.0);
    // The refusals with a decision id are in the trail with their reason.
    let bad: Vec<_> = s
        .rempart
        .audit_records()
        .into_iter()
        .filter(|r| deny_codes(r) == vec!["egress_bad_request"])
        .collect();
    assert_eq!(bad.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_a_large_transfer_both_ways_intact() {
    let echo = Server::start(EU, Kind::Echo).await;
    let s = start(None, "");
    let (status, head, stream) = connect(s.proxy, &echo.addr.to_string()).await;
    assert_eq!(status, 200, "{head}");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let stream = stream.into_inner();
    let (mut rd, mut wr) = stream.into_split();
    const SIZE: usize = 24 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut sent = 0usize;
        let mut block = vec![0u8; 64 * 1024];
        let mut x: u32 = 12345;
        while sent < SIZE {
            for b in block.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (x >> 16) as u8;
            }
            wr.write_all(&block).await.unwrap();
            hash.update(&block);
            sent += block.len();
        }
        wr.shutdown().await.unwrap();
        hash.finalize()
    });
    let mut hash = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    // Halfway through, the bulk transfer holds enlarged pipes
    // ([egress] tunnel_pipe_budget).
    let mut pipes_mid_transfer = None;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf))
            .await
            .expect("tunnel stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n;
        if got >= SIZE / 2 && pipes_mid_transfer.is_none() {
            pipes_mid_transfer = Some(s.rempart.metric("rempart_egress_tunnel_pipe_bytes").await);
        }
    }
    let sent_hash = writer.await.unwrap();
    assert_eq!(got, SIZE);
    assert_eq!(hash.finalize(), sent_hash, "bytes changed in the tunnel");
    drop(rd);
    assert!(
        pipes_mid_transfer.is_some_and(|b| b >= 1_048_576.0),
        "{pipes_mid_transfer:?} bytes of enlarged pipes mid-transfer"
    );
    // The closing record counts every byte, both ways.
    let closing = closing_record(&s.rempart, &id).await;
    assert_eq!(closing["transfer"]["bytes_to_destination"], SIZE as u64);
    assert_eq!(closing["transfer"]["bytes_from_destination"], SIZE as u64);
    // Closed, the tunnel gave its pipes' room back.
    assert_eq!(
        s.rempart.metric("rempart_egress_tunnel_pipe_bytes").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_behind_the_connect_head_reach_the_destination_first() {
    // Some clients do not wait for the 200 before their first bytes (TLS
    // false start, pipelining proxies): hyper has already read them with
    // the head, and the tunnel must send them before anything else.
    let echo = Server::start(EU, Kind::Echo).await;
    let s = start(None, "");
    let target = echo.addr.to_string();
    let (status, head, mut stream) = raw(
        s.proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly bytes|"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    stream.write_all(b"later bytes").await.unwrap();
    let mut back = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, b"early bytes|later bytes");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    drop(stream);
    let closing = closing_record(&s.rempart, &id).await;
    assert_eq!(closing["transfer"]["bytes_to_destination"], 23);
    assert_eq!(closing["transfer"]["bytes_from_destination"], 23);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_goes_through_http_and_https_proxy_settings() {
    let eu = Server::start(EU, Kind::Http).await;
    let us = Server::start(US, Kind::Http).await;
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = tls_server(EU, "eu.test", dir.path()).await;
    let dns = Dns::start(&[("eu.test", &[EU]), ("us.test", &[US])]).await;
    let s = start(Some(dns.addr), "");
    let script = r#"
import sys, requests
session = requests.Session()
out = []
for url in sys.argv[2:]:
    try:
        r = session.get(url, verify=sys.argv[1], timeout=10)
        out.append(f"{r.status_code} {r.text.splitlines()[0] if r.text else ''}")
    except requests.exceptions.ProxyError as e:
        out.append("proxy-error " + ("403" if "403" in str(e) else str(e)))
print("\n".join(out))
"#;
    let python = std::env::var("REMPART_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let proxy = format!("http://{}", s.proxy);
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&ca)
        .arg(format!("https://eu.test:{}/", tls.addr.port()))
        .arg(format!("http://eu.test:{}/", eu.addr.port()))
        .arg(format!("http://us.test:{}/", us.addr.port()))
        .env("HTTPS_PROXY", &proxy)
        .env("HTTP_PROXY", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("python3 with requests (see .ci/run)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0], "200 secure hello", "{stdout}");
    assert_eq!(lines[1], "200 hello from 127.0.0.2", "{stdout}");
    assert!(lines[2].starts_with("403 {"), "{stdout}");
    assert_eq!(us.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_accounts_workloads_allow_lists_and_the_connection_limit() {
    let eu = Server::start(EU, Kind::Echo).await;
    let us = Server::start(US, Kind::Http).await;
    let hash = hex::encode(Sha256::digest(b"s3cret"));
    let s = start_with(
        None,
        &format!(
            "require_proxy_auth = true\nmax_connections = 1\n\
             [[egress.users]]\nname = \"billing\"\npassword_sha256 = \"{hash}\"\nworkload = \"billing-crm\"\n"
        ),
        |data| {
            // billing-crm may call the US address (a DSI's recorded exception).
            data["settings"]["egress"]["allow"]["billing-crm"] =
                serde_json::json!({"networks": [format!("{US}/32")]});
        },
    );
    let target = us.addr.to_string();
    // No credentials: 407 with a challenge, recorded.
    let (status, head, _) = connect(s.proxy, &target).await;
    assert_eq!(status, 407, "{head}");
    assert!(header(&head, "proxy-authenticate")
        .unwrap()
        .starts_with("Basic"));
    // Wrong password: 407.
    let bad = base64_basic("billing", "guess");
    let (status, _, _) = raw(
        s.proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {bad}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 407);
    // Right account: the workload's allow-list lets the US address through.
    let good = base64_basic("billing", "s3cret");
    let (status, head, held) = raw(
        s.proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {good}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["identity"]["method"], "proxy_basic");
    assert_eq!(rec["identity"]["subject"], "billing");
    assert_eq!(rec["source"]["geo"]["sovereign"], "local");
    assert_eq!(rec["source"]["workload"], "billing-crm");
    // The one slot is held by that tunnel: the next is refused with 503.
    let (status, head, _) = raw(
        s.proxy,
        &format!(
            "CONNECT {} HTTP/1.1\r\nProxy-Authorization: {good}\r\n\r\n",
            eu.addr
        ),
    )
    .await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-rempart-decision-id"));
    drop(held);
    // Once the tunnel closed, the slot is free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = raw(
            s.proxy,
            &format!(
                "CONNECT {} HTTP/1.1\r\nProxy-Authorization: {good}\r\n\r\n",
                eu.addr
            ),
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot not released: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.rempart
            .metric("rempart_egress_refusals_total{reason=\"proxy_auth\"}")
            .await,
        2.0
    );
    assert!(
        s.rempart
            .metric("rempart_egress_refusals_total{reason=\"too_many_connections\"}")
            .await
            >= 1.0
    );
    let _ = &s.dir;
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_proxy_with_client_certificates_names_the_workload() {
    use common::pki::Ca;
    let eu = Server::start(EU, Kind::Http).await;
    let us = Server::start(US, Kind::Http).await;
    let dir = tempfile::tempdir().unwrap();
    let (tls, eu_ca) = tls_server(EU, "eu.test", dir.path()).await;
    let dns = Dns::start(&[("eu.test", &[EU])]).await;
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let server_ca = Ca::new("Proxy CA");
    let (proxy_cert, proxy_key) = server_ca.server("rempart egress");
    let client_ca = Ca::new("Workload CA");
    let (creme_cert, creme_key) = client_ca.client_with_sans(
        "creme",
        vec![rcgen::SanType::URI(
            "spiffe://crm.example/creme".try_into().unwrap(),
        )],
    );
    let (other_cert, other_key) = client_ca.client("someone", "someone@example.eu");
    let paths = [
        write("proxy-ca.pem", &server_ca.pem),
        write("proxy.pem", &proxy_cert),
        write("proxy.key", &proxy_key),
        write("client-ca.pem", &client_ca.pem),
        write("creme.pem", &creme_cert),
        write("creme.key", &creme_key),
        write("other.pem", &other_cert),
        write("other.key", &other_key),
    ];
    let [proxy_ca, proxy_pem, proxy_key, client_ca_pem, creme_pem, creme_key, other_pem, other_key] =
        &paths;
    let s = start_with(
        Some(dns.addr),
        &format!(
            "[egress.tls]\ncert = \"{proxy_pem}\"\nkey = \"{proxy_key}\"\n\
             client_ca = \"{client_ca_pem}\"\nclient_auth = \"required\"\n\
             [[egress.workloads]]\nname = \"creme\"\ncertificates = [\"uri:spiffe://crm.example/creme\"]\n"
        ),
        |data| {
            // Only the creme workload may call the US address.
            data["settings"]["egress"]["allow"]["creme"] =
                serde_json::json!({"networks": [format!("{US}/32")]});
        },
    );
    let proxy = format!("https://localhost:{}", s.proxy.port());
    let via = |cert: &str, key: &str, url: &str, extra: &[&str]| {
        let mut args = vec![
            "-D",
            "-",
            "--proxy",
            &proxy,
            "--proxy-cacert",
            proxy_ca,
            "--proxy-cert",
            cert,
            "--proxy-key",
            key,
        ];
        args.extend_from_slice(extra);
        args.push(url);
        curl(&args)
    };

    // The creme certificate: its workload's allow-list opens the US address.
    let url = format!("http://{US}:{}/", us.addr.port());
    let (code, out, err) = via(creme_pem, creme_key, &url, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from 127.0.0.3"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-rempart-decision-id: "))
        .unwrap()
        .trim()
        .to_string();
    let rec = s.rempart.audit_record(&id).await;
    assert_eq!(rec["source"]["workload"], "creme", "{rec}");
    assert_eq!(rec["identity"]["method"], "mtls", "{rec}");
    assert_eq!(rec["identity"]["subject"], "CN=creme, O=Example", "{rec}");

    // A CONNECT tunnel inside the TLS connection to the proxy.
    let url = format!("https://eu.test:{}/", tls.addr.port());
    let (code, out, err) = via(
        creme_pem,
        creme_key,
        &url,
        &["--cacert", eu_ca.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("secure hello\n"), "{out}");

    // Another valid certificate names no workload: the US address stays
    // refused.
    let url = format!("http://{US}:{}/", us.addr.port());
    let (code, out, err) = via(other_pem, other_key, &url, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(us.connections(), 1);

    // No client certificate: the handshake fails, nothing is proxied.
    let (code, _, _) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        proxy_ca,
        &format!("http://eu.test:{}/", eu.addr.port()),
    ]);
    assert_ne!(code, 0);
    assert_eq!(eu.connections(), 0);
    assert!(
        s.rempart
            .metric("rempart_tls_handshake_failures_total{reason=\"client_cert_missing\"}")
            .await
            >= 1.0
    );
}

/// What a destination finds in the trail when the first bytes of a
/// request or tunnel reach it: the records (as JSON) that `matches`.
fn trail_matches(
    trail: &Path,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    std::fs::read_to_string(trail)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| matches(r))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_records_the_decision_before_any_byte_reaches_the_destination() {
    let s = start(None, "\n[audit]\ndurability = \"sync\"\n");
    let trail = s.rempart.audit.clone();

    // Plain HTTP: the destination reads the request head, then looks in
    // the trail for a record of that very path.
    let t = trail.clone();
    let http = Server::start_with(EU, move |stream| {
        let trail = t.clone();
        async move {
            let mut reader = BufReader::new(stream);
            let mut first = String::new();
            if reader.read_line(&mut first).await.unwrap_or(0) == 0 {
                return;
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let found = trail_matches(&trail, |r| r["request"]["path"] == path.as_str());
            let body = serde_json::json!({"found": found}).to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = reader.get_mut().write_all(resp.as_bytes()).await;
        }
    })
    .await;
    let target = format!("http://{}/sync-plain-42", http.addr);
    let (status, head, mut r) = raw(
        s.proxy,
        &format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", http.addr),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let seen: serde_json::Value = serde_json::from_str(&body_of(&mut r, &head).await).unwrap();
    let found = seen["found"].as_array().unwrap();
    assert_eq!(
        found.len(),
        1,
        "the destination got a request not yet recorded: {seen}"
    );
    assert_eq!(found[0]["decision_id"], id.as_str());
    assert_eq!(found[0]["exchange"], "pending");
    assert_eq!(found[0]["direction"], "egress");
    assert!(found[0]["status"].is_null());

    // A tunnel, with bytes sent right behind the CONNECT head (before the
    // 200): when they reach the destination, the decision is on disk.
    let t = trail.clone();
    let tunnel = Server::start_with(EU, move |stream| {
        let trail = t.clone();
        async move {
            let port = stream.local_addr().unwrap().port();
            let mut reader = BufReader::new(stream);
            let mut first = String::new();
            if reader.read_line(&mut first).await.unwrap_or(0) == 0 {
                return;
            }
            let found = trail_matches(&trail, |r| {
                r["request"]["method"] == "CONNECT" && r["destination"]["port"] == port
            });
            let answer = format!("{}\n", serde_json::json!({"found": found}));
            let _ = reader.get_mut().write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let target = tunnel.addr.to_string();
    let (status, head, mut r) = raw(
        s.proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nhello\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut answer))
        .await
        .expect("the destination answered in time")
        .unwrap();
    let seen: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let found = seen["found"].as_array().unwrap();
    assert_eq!(
        found.len(),
        1,
        "bytes reached the destination before the record: {seen}"
    );
    assert_eq!(found[0]["decision_id"], id.as_str());
    assert_eq!(found[0]["status"], 200);
    drop(r);
    let closing = closing_record(&s.rempart, &id).await;
    assert_eq!(closing["transfer"]["bytes_to_destination"], 6);

    // The plain request's complete record follows its pending one; query
    // lists each request once.
    let mut rempart = s.rempart;
    assert!(rempart.stop().success());
    let plain: Vec<serde_json::Value> =
        trail_matches(&trail, |r| r["request"]["path"] == "/sync-plain-42");
    assert_eq!(plain.len(), 2);
    assert_eq!(plain[1]["status"], 200);
    assert!(plain[1].get("exchange").is_none());
    let (code, out, err) = common::run(&[
        "audit",
        "query",
        trail.to_str().unwrap(),
        "--direction",
        "egress",
    ]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: std::collections::HashSet<&str> = listed
        .iter()
        .map(|r| r["decision_id"].as_str().unwrap())
        .collect();
    // Plain request once; the tunnel: its decision and its closing record.
    assert_eq!(ids.len(), 2, "{out}");
    assert_eq!(listed.len(), 3, "{out}");
}

/// Sends `what` through a tunnel to an echo server and reads it back;
/// returns its length.
async fn echo_through(tunnel: &mut BufReader<TcpStream>, what: &[u8]) -> u64 {
    tunnel.get_mut().write_all(what).await.unwrap();
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(Duration::from_secs(2), tunnel.read_exact(&mut back))
        .await
        .expect("echo through the tunnel in time")
        .unwrap();
    assert_eq!(back, what);
    what.len() as u64
}

/// Graceful shutdown with a tunnel open: SIGTERM closes the listener at
/// once, the open tunnel keeps carrying bytes until `[server]
/// drain_timeout`, then rempart closes it (within one drain, not two),
/// writes its closing record (`closed_by: "shutdown"`) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_tunnel_run_until_drain_timeout_then_closes_it_with_a_record() {
    const DRAIN: Duration = Duration::from_secs(3);
    let echo = Server::start(EU, Kind::Echo).await;
    let mut s = start(None, "[server]\ndrain_timeout = \"3s\"\n");
    let (status, head, mut tunnel) = connect(s.proxy, &echo.addr.to_string()).await;
    assert_eq!(status, 200, "{head}");
    let id = header(&head, "x-rempart-decision-id").unwrap().to_string();
    let mut sent = 0u64;
    sent += echo_through(&mut tunnel, b"before SIGTERM").await;

    let stopped_at = Instant::now();
    s.rempart.signal("TERM");
    // New connections are refused at once (every worker dropped its socket).
    loop {
        if TcpStream::connect(s.proxy).await.is_err() {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(1),
            "the egress listener still accepts after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open tunnel keeps working while the drain runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sent += echo_through(&mut tunnel, b"draining").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sent += echo_through(&mut tunnel, b"still draining").await;
    assert!(stopped_at.elapsed() < DRAIN);

    // Then rempart closes it: end of stream once drain_timeout is over.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("the tunnel is closed after the drain")
        .unwrap();
    let closed_after = stopped_at.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        closed_after >= DRAIN - Duration::from_millis(100),
        "closed {closed_after:?} after SIGTERM, before drain_timeout"
    );
    assert!(
        closed_after < DRAIN + Duration::from_secs(2),
        "closed {closed_after:?} after SIGTERM: more than one drain_timeout"
    );

    // rempart exits 0, within one drain_timeout (and the 1 s the cut
    // tunnels get to write their records).
    let mut child = s.rempart.child.take().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped_at.elapsed() < DRAIN + Duration::from_secs(5),
            "rempart did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}: {}", s.rempart.log_text());
    assert!(stopped_at.elapsed() < DRAIN + Duration::from_secs(2));

    // The trail has the tunnel's closing record, with every byte it carried.
    let closing = closing_record(&s.rempart, &id).await;
    let t = &closing["transfer"];
    assert_eq!(t["closed_by"], "shutdown", "{closing}");
    assert_eq!(t["bytes_to_destination"].as_u64(), Some(sent));
    assert_eq!(t["bytes_from_destination"].as_u64(), Some(sent));
    assert!(t["duration_ms"].as_u64().unwrap() >= DRAIN.as_millis() as u64);
    assert_eq!(closing["decision"]["outcome"], "allowed");
    // And the trail is intact (hash chain).
    let (code, out, err) = common::run(&["audit", "verify", s.rempart.audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

// ---------------------------------------------------------------- queries

/// The decision ids of `rempart audit query` JSON lines.
fn query_ids(trail: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["audit", "query", trail.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = common::run(&all);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{} matching record(s)", out.lines().count())),
        "{err}"
    );
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["decision_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `rempart audit query --format table`: the rows after the header.
fn query_rows(trail: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["audit", "query", trail.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "table"]);
    let (code, out, err) = common::run(&all);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("TIME"), "{out}");
    lines.map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_query_finds_egress_by_country_operator_jurisdiction_verdict_and_time() {
    // Besides the shared map: 127.0.0.5 in the United States, run by
    // Amazon (a US operator outside the EU, verdict outside_eu).
    const US_OPERATOR_IN_US: &str = "127.0.0.5";
    let eu = Server::start(EU, Kind::Http).await;
    let dir = tempfile::tempdir().unwrap();
    let (country, asn) =
        common::loopback_geo::write(dir.path(), &[(US_OPERATOR_IN_US, "US", 16509, "AMAZON-02")]);
    let policies = common::loopback_geo::policies(dir.path());
    let trail = dir.path().join("trail.jsonl");
    let cfg = dir.path().join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nlisten = \"127.0.0.1:0\"\n{}",
            common::loopback_geo::geo_toml(&country, &asn)
        ),
    )
    .unwrap();
    let mut rp = Rempart::start(
        "",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--policies",
            policies.to_str().unwrap(),
            "--audit",
            trail.to_str().unwrap(),
        ],
    );
    let proxy = rp.egress.expect("egress listener");
    let id_of = |head: &str| header(head, "x-rempart-decision-id").unwrap().to_string();
    // An EU operator in the EU (forwarded), a US address of an operator
    // not in the registry, Amazon in Germany, Amazon in the US (refused).
    let (status, head, _) = raw(
        proxy,
        &format!(
            "GET http://{EU}:{}/ HTTP/1.1\r\nHost: {EU}\r\n\r\n",
            eu.addr.port()
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let to_eu = id_of(&head);
    let (status, head, _) = raw(
        proxy,
        &format!("GET http://{US}:9/ HTTP/1.1\r\nHost: {US}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    let to_us = id_of(&head);
    let (status, head, _) = connect(proxy, &format!("{US_OPERATOR_IN_EU}:443")).await;
    assert_eq!(status, 403, "{head}");
    let to_amazon_de = id_of(&head);
    let (status, head, _) = connect(proxy, &format!("{US_OPERATOR_IN_US}:443")).await;
    assert_eq!(status, 403, "{head}");
    let to_amazon_us = id_of(&head);
    let amazon_de = rp.audit_record(&to_amazon_de).await;
    let (to_eu, to_us, to_amazon_de, to_amazon_us) = (
        to_eu.as_str(),
        to_us.as_str(),
        to_amazon_de.as_str(),
        to_amazon_us.as_str(),
    );
    assert!(rp.stop().success());
    let amazon_us_geo = {
        let text = std::fs::read_to_string(&trail).unwrap();
        let line = text.lines().find(|l| l.contains(to_amazon_us)).unwrap();
        serde_json::from_str::<serde_json::Value>(line).unwrap()["destination"]["geo"].clone()
    };
    assert_eq!(amazon_us_geo["sovereign"], "outside_eu", "{amazon_us_geo}");
    assert_eq!(amazon_us_geo["operator"], "amazon", "{amazon_us_geo}");
    assert_eq!(
        amazon_de["destination"]["geo"]["sovereign"],
        "non_eu_operator_in_eu"
    );

    let ids = |args: &[&str]| query_ids(&trail, args);
    assert_eq!(ids(&["--country", "us"]), [to_us, to_amazon_us]);
    assert_eq!(ids(&["--country", "FR"]), [to_eu]);
    assert_eq!(ids(&["--operator", "amazon"]), [to_amazon_de, to_amazon_us]);
    assert_eq!(ids(&["--sovereign", "outside_eu"]), [to_us, to_amazon_us]);
    // The verdict alone misses the US operator outside the EU ...
    assert_eq!(
        ids(&["--sovereign", "non_eu_operator_in_eu"]),
        [to_amazon_de]
    );
    // ... which the jurisdiction and --non-eu-operator catch, inside and
    // outside the EU; the operator not in the registry is not named.
    assert_eq!(ids(&["--jurisdiction", "us"]), [to_amazon_de, to_amazon_us]);
    assert_eq!(ids(&["--jurisdiction", "FR"]), [to_eu]);
    // "Every egress to a non-EU operator this week", as in docs/audit.md.
    let week_ago = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - Duration::from_secs(7 * 24 * 3600),
    )
    .to_string();
    assert_eq!(
        ids(&[
            "--direction",
            "egress",
            "--non-eu-operator",
            "--since",
            &week_ago
        ]),
        [to_amazon_de, to_amazon_us]
    );
    // Time: from the third record's timestamp on, and before it.
    let third = amazon_de["timestamp"].as_str().unwrap();
    assert_eq!(ids(&["--since", third]), [to_amazon_de, to_amazon_us]);
    assert_eq!(ids(&["--until", third]), [to_eu, to_us]);
    assert_eq!(
        ids(&["--non-eu-operator", "--until", third]),
        Vec::<String>::new()
    );
    assert!(ids(&["--until", &week_ago]).is_empty());

    // The same questions as tables: one row a record, the destination's
    // country and operator in it.
    let rows = query_rows(&trail, &["--non-eu-operator"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0].contains(&format!("{US_OPERATOR_IN_EU} DE amazon"))
            && rows[0].contains("destination_non_eu_jurisdiction"),
        "{rows:?}"
    );
    assert!(
        rows[1].contains(&format!("{US_OPERATOR_IN_US} US amazon"))
            && rows[1].contains("destination_outside_eu"),
        "{rows:?}"
    );
    let rows = query_rows(&trail, &["--country", "FR", "--since", &week_ago]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].contains("allowed") && rows[0].contains(&format!("{EU} FR ovh")),
        "{rows:?}"
    );
    assert!(query_rows(&trail, &["--operator", "nobody"]).is_empty());
}
