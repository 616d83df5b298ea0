//! Policy evaluation cost of the shipped policy set, per request.
//!
//! `cargo bench --bench policy_eval`; results are recorded in
//! docs/performance.md. Set `REMPART_BENCH_POLICIES=DIR` to measure another
//! policy set (a DSI's own) against the same inputs.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use rempart::geo::Geo;
use rempart::input::{
    Address, Destination, Direction, Endpoint, Identity, PolicyInput, RequestInfo,
};
use rempart::pipeline::locate::Scope;
use rempart::policy::{self, Decision, EvalLimits, PolicySource};

fn input() -> PolicyInput {
    let segments = ["api", "contacts", "42"]
        .into_iter()
        .map(Into::into)
        .collect();
    let profiles = rempart::profile::Profiles::load(&["generic".to_string()]).unwrap();
    let rempart::profile::Classified::Done(resource) =
        profiles.classify(&http::Method::GET, "/api/contacts/42", None)
    else {
        unreachable!("the generic profile never reads a body")
    };
    PolicyInput {
        direction: Direction::Ingress,
        request: RequestInfo {
            id: rempart::input::RequestId::from("01a21d22-2a1b-73bf-95e5-821c7bfbe3cc").unwrap(),
            method: "GET".into(),
            scheme: "http".into(),
            host: "crm.example.eu".into(),
            port: 8080,
            path: "/api/contacts/42".into(),
            segments,
            query: [("fields".to_string(), vec!["name".to_string()])].into(),
            headers: [
                ("accept", "application/json"),
                ("user-agent", "wrk"),
                ("host", "crm.example.eu"),
                ("cookie", "[redacted]"),
            ]
            .iter()
            .map(|(k, v)| ((*k).into(), v.to_string()))
            .collect(),
            protocol: "HTTP/1.1".into(),
        },
        source: Endpoint {
            ip: "10.1.2.3".into(),
            port: 50123,
            scope: "private".into(),
            geo: std::sync::Arc::new(Geo::local(Scope::Private)),
            workload: None,
        },
        destination: std::sync::Arc::new(Destination {
            host: "127.0.0.1".into(),
            ip: Some("127.0.0.1".into()),
            port: 8000,
            scope: Some("loopback".into()),
            geo: Some(Geo::local(Scope::Loopback)),
            addresses: vec![Address {
                ip: "127.0.0.1".into(),
                scope: "loopback".into(),
                geo: Geo::local(Scope::Loopback),
            }],
        }),
        identity: Identity {
            authenticated: false,
            method: "none".into(),
            ..Identity::default()
        },
        resource,
        time: rempart::input::time_info(std::time::SystemTime::now()),
    }
}

fn bench(c: &mut Criterion) {
    let dir = std::env::var_os("REMPART_BENCH_POLICIES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"));
    let set = policy::load(&PolicySource::Dir(dir)).expect("shipped policies compile");
    let limits = EvalLimits::default();
    let input = input();
    let value = input.to_value();
    let mut denied = input.clone();
    denied.request.method = "TRACE".into();
    let denied_value = denied.to_value();

    c.bench_function("input/to_value", |b| {
        b.iter(|| black_box(&input).to_value())
    });
    c.bench_function("eval/rvm/allowed", |b| {
        b.iter(|| {
            set.evaluate(black_box(value.clone()), &limits)
                .map(|d: Decision| d.allow)
        })
    });
    c.bench_function("eval/rvm/denied", |b| {
        b.iter(|| {
            set.evaluate(black_box(denied_value.clone()), &limits)
                .map(|d| d.allow)
        })
    });
    c.bench_function("eval/interpreter/allowed", |b| {
        b.iter(|| set.evaluate_with_interpreter(black_box(value.clone())))
    });
    c.bench_function("decide/input+rvm", |b| {
        b.iter(|| {
            set.evaluate(black_box(&input).to_value(), &limits)
                .map(|d| d.allow)
        })
    });
    // The ingress request path: the destination (the upstream) kept built
    // with its digest; the input keyed, and built only as far as the set
    // reads (see src/policy/reads.rs) when the decision cache misses.
    let upstream = input.destination.to_value();
    let upstream = Some((&upstream, policy::digest(&upstream)));
    c.bench_function("decide/reduced+rvm (cache off)", |b| {
        b.iter(|| {
            set.decide(&black_box(&input).reading(upstream), &limits, 0)
                .0
                .map(|d| d.allow)
        })
    });
    c.bench_function("decide/cache hit", |b| {
        b.iter(|| {
            set.decide(&black_box(&input).reading(upstream), &limits, 1024)
                .0
                .map(|d| d.allow)
        })
    });
    // Every request a new path: key, miss, evaluate, insert (and evict).
    let mut n = 0u64;
    let mut varied = input.clone();
    c.bench_function("decide/cache miss", |b| {
        b.iter(|| {
            n += 1;
            varied.request.path = compact_str::format_compact!("/api/contacts/{n}");
            varied.request.segments[2] = compact_str::format_compact!("{n}");
            set.decide(&black_box(&varied).reading(upstream), &limits, 1024)
                .0
                .map(|d| d.allow)
        })
    });
}

/// Geo lookups: MaxMind's test databases (committed), and the real DB-IP /
/// ip-location-db files when REMPART_GEOIP_DATA names the folder
/// geoip/fetch.sh filled.
fn bench_geo(c: &mut Criterion) {
    use rempart::geo::{GeoDb, GeoFiles};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sets = vec![(
        "maxmind-test",
        GeoFiles {
            country_db: Some(root.join("tests/data/maxmind/GeoIP2-Country-Test.mmdb")),
            asn_db: Some(root.join("tests/data/maxmind/GeoLite2-ASN-Test.mmdb")),
            ..GeoFiles::default()
        },
        "89.160.20.112",
    )];
    if let Some(dir) = std::env::var_os("REMPART_GEOIP_DATA").map(std::path::PathBuf::from) {
        sets.push((
            "real",
            GeoFiles {
                country_db: Some(dir.join("dbip-country.mmdb")),
                asn_db: Some(dir.join("asn.mmdb")),
                as_country_db: Some(dir.join("iptoasn-country.mmdb")),
                ..GeoFiles::default()
            },
            "3.120.0.1",
        ));
    }
    for (name, files, ip) in sets {
        let db = GeoDb::open(&files).expect("geo databases open");
        let ip: std::net::IpAddr = ip.parse().expect("ip");
        c.bench_function(&format!("geo/lookup/{name}"), |b| {
            b.iter(|| db.lookup(black_box(ip)))
        });
        let g = db.lookup(ip);
        c.bench_function(&format!("geo/to_value/{name}"), |b| {
            b.iter(|| black_box(&g).to_value())
        });
        // What the locate stage pays per request on a keep-alive
        // connection from that address: the location kept by the first.
        let db = std::sync::Arc::new(db);
        let conn = rempart::pipeline::accept::Connection::new(
            std::net::SocketAddr::new(ip, 40000),
            "127.0.0.1:8080".parse().expect("address"),
        );
        c.bench_function(&format!("geo/locate_source/{name}"), |b| {
            b.iter(|| rempart::pipeline::locate::locate_source(black_box(&conn), &db))
        });
    }
}

/// Large data: a 10 000-entry allow-list of partner hosts, looked up in
/// the ways a policy author may write it, and a set of 100 rules over it
/// (docs/policies.md "Large data", docs/performance.md).
fn bench_data(c: &mut Criterion) {
    const ENTRIES: usize = 10_000;
    let hosts: Vec<String> = (0..ENTRIES)
        .map(|i| format!("api{i}.partner{}.example", i % 97))
        .collect();
    let by_host: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| (h.clone(), serde_json::Value::Bool(true)))
        .collect();
    let data = serde_json::json!({"partners": {"list": hosts, "by_host": by_host}});
    let decision = "package rempart\n\nimport rego.v1\n\n\
        decision := {\"allow\": count(deny) == 0, \"deny\": [r | some r in deny], \"warn\": []}\n\n\
        deny contains {\"code\": \"not_a_partner\", \"message\": input.destination.host} if not listed\n";
    let lookups = [
        ("object_key", "listed if data.partners.by_host[input.destination.host]\n"),
        ("array_in", "listed if input.destination.host in data.partners.list\n"),
        (
            "array_loop",
            "listed if {\n\tsome h in data.partners.list\n\th == input.destination.host\n}\n",
        ),
        (
            "set_comprehension",
            "partner_set := {h | some h in data.partners.list}\n\nlisted if partner_set[input.destination.host]\n",
        ),
    ];
    // The last entry: the worst case for a scan.
    let mut probe = input();
    let mut dest = (*probe.destination).clone();
    dest.host = hosts[ENTRIES - 1].clone();
    probe.destination = std::sync::Arc::new(dest);
    let value = probe.to_value();
    let limits = EvalLimits::default();
    let mut group = c.benchmark_group("data10k");
    for (name, rule) in lookups {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("decision.rego"),
            format!("{decision}\n{rule}"),
        )
        .unwrap();
        std::fs::write(dir.path().join("data.json"), data.to_string()).unwrap();
        let set = policy::load(&PolicySource::Dir(dir.path().to_path_buf())).expect("compiles");
        assert!(
            set.evaluate(value.clone(), &limits)
                .expect("evaluates")
                .allow
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                set.evaluate(black_box(value.clone()), &limits)
                    .map(|d| d.allow)
            })
        });
    }
    group.finish();

    // 100 rules and the 10k entries: compile time, and p50/p99 of single
    // evaluations (criterion reports means; a gateway cares about the tail).
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rules = String::from(decision);
    rules.push_str(lookups[0].1);
    for i in 0..99 {
        rules.push_str(&format!(
            "\ndeny contains {{\"code\": \"rule_{i}\", \"message\": \"header {i}\"}} if {{\n\
             \tinput.direction == \"ingress\"\n\tinput.request.headers[\"x-bench-{i}\"] == \"{i}\"\n\
             \tnot input.identity.authenticated\n}}\n"
        ));
    }
    std::fs::write(dir.path().join("decision.rego"), rules).unwrap();
    std::fs::write(dir.path().join("data.json"), data.to_string()).unwrap();
    let started = std::time::Instant::now();
    let set = policy::load(&PolicySource::Dir(dir.path().to_path_buf())).expect("compiles");
    let compile = started.elapsed();
    let mut samples: Vec<std::time::Duration> = (0..20_000)
        .map(|_| {
            let v = value.clone();
            let t = std::time::Instant::now();
            let allow = set.evaluate(v, &limits).map(|d| d.allow);
            let took = t.elapsed();
            assert!(matches!(allow, Ok(true)));
            took
        })
        .collect();
    samples.sort();
    let pct = |p: usize| samples[samples.len() * p / 100];
    eprintln!(
        "data10k/100rules: compile+load {compile:?}; eval p50 {:?}, p99 {:?}, max {:?} over {} evaluations",
        pct(50),
        pct(99),
        samples[samples.len() - 1],
        samples.len()
    );
    c.bench_function("data10k/100rules/eval", |b| {
        b.iter(|| {
            set.evaluate(black_box(value.clone()), &limits)
                .map(|d| d.allow)
        })
    });
}

criterion_group!(benches, bench, bench_geo, bench_data);
criterion_main!(benches);
