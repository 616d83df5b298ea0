//! The request path evaluates policies through regorus's compiled RVM
//! program; the interpreter is the reference. This test proves that both
//! give the same decision documents for the shipped policy set over a
//! corpus of inputs that exercises every rule, and that the schema in
//! docs/ accepts the documents the code builds.

mod common;

use rempart::geo::{Geo, GeoDb, GeoFiles};
use rempart::input::{
    Address, Destination, Direction, Endpoint, Identity, PolicyInput, RequestInfo, Resource,
};
use rempart::pipeline::locate::Scope;
use rempart::policy::{self, EvalLimits, PolicySource};
use std::path::Path;

fn corpus() -> Vec<PolicyInput> {
    let methods = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "TRACK", "CONNECT",
    ];
    let paths = [
        "/",
        "/api/contacts/42",
        "/api/contacts",
        "/api/v2/organisations/7/export",
        "/.git/config",
        "/static/.ENV",
        "/a/../etc/passwd",
        "/a%2F..%2Fb/c",
        "/.github/workflows",
        "/creme_core/entity/delete",
    ];
    let scopes = ["loopback", "private", "public", "cgnat"];
    let schemes = ["http", "https"];
    let profiles =
        rempart::profile::Profiles::load(&["creme".to_string(), "generic".to_string()]).unwrap();
    let mut out = Vec::new();
    let mut n = 0u64;
    for m in methods {
        for p in paths {
            for (i, scope) in scopes.iter().enumerate() {
                let scheme = schemes[(n as usize + i) % 2];
                n += 1;
                let segments = p
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_decode(s).into())
                    .collect();
                let rempart::profile::Classified::Done(resource) =
                    profiles.classify(&m.parse().unwrap(), p, None)
                else {
                    unreachable!("the generic and creme profiles never read a body")
                };
                out.push(PolicyInput {
                    direction: if n % 7 == 0 {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                    request: RequestInfo {
                        id: rempart::input::RequestId::from(&format!("id-{n}")).unwrap(),
                        method: m.into(),
                        scheme: scheme.into(),
                        host: "crm.example.eu".into(),
                        port: 8080,
                        path: percent_decode(p).into(),
                        segments,
                        query: Default::default(),
                        headers: [("accept".into(), "*/*".to_string())].into(),
                        protocol: "HTTP/1.1".into(),
                    },
                    source: Endpoint {
                        ip: "192.0.2.1".into(),
                        port: 1000,
                        scope: scope.to_string().into(),
                        geo: std::sync::Arc::new(
                            destination_geo(n + 1).unwrap_or_else(|| Geo::local(Scope::Private)),
                        ),
                        workload: (n % 5 == 0).then(|| "creme".to_string()),
                    },
                    destination: std::sync::Arc::new(Destination {
                        host: "dest.example".into(),
                        ip: Some("203.0.113.7".into()),
                        port: 443,
                        scope: Some(destination_geo(n).map_or("public".into(), |g| g.scope)),
                        geo: destination_geo(n),
                        addresses: destination_geo(n)
                            .map(|g| Address {
                                ip: "203.0.113.7".into(),
                                scope: g.scope.clone(),
                                geo: g,
                            })
                            .into_iter()
                            .collect(),
                    }),
                    identity: if n % 3 == 0 {
                        Identity {
                            authenticated: true,
                            method: "header".into(),
                            subject: Some("alice".into()),
                            roles: vec!["dpo".into()],
                            sources: vec!["header".into()].into(),
                            ..Identity::default()
                        }
                    } else {
                        Identity {
                            authenticated: false,
                            method: "none".into(),
                            // Some anonymous callers where a source is
                            // configured (the unauthenticated rule fires),
                            // most where none is (it stays inactive).
                            error: (n % 5 == 1).then(|| "expired".into()),
                            sources: if n % 5 == 1 {
                                vec!["jwt".into()].into()
                            } else {
                                Default::default()
                            },
                            ..Identity::default()
                        }
                    },
                    resource: Resource { ..resource },
                    time: rempart::input::time_info(std::time::SystemTime::now()),
                });
            }
        }
    }
    out
}

/// Destinations of every sovereignty verdict, from real lookups of the
/// MaxMind test databases (GB, SE, US, Google's AS) plus local and unlocated.
fn destination_geo(n: u64) -> Option<Geo> {
    let db = GeoDb::open(&GeoFiles {
        country_db: Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/maxmind/GeoIP2-Country-Test.mmdb"),
        ),
        asn_db: Some(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/maxmind/GeoLite2-ASN-Test.mmdb"),
        ),
        ..GeoFiles::default()
    })
    .unwrap();
    let pick = [
        "10.0.0.1",
        "2.125.160.216",
        "127.0.0.1",
        "89.160.20.112",
        "192.168.1.1",
        "none",
        "1.0.0.1",
        "::1",
        "216.160.83.56",
    ];
    match pick[(n % pick.len() as u64) as usize] {
        "none" => None,
        ip => Some(db.lookup(ip.parse().unwrap())),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[test]
fn rvm_and_interpreter_agree_on_the_shipped_policies() {
    let set = policy::load(&PolicySource::Dir(common::repo_policies())).unwrap();
    let inputs = corpus();
    let (mut denied, mut warned) = (0, 0);
    for input in &inputs {
        let value = input.to_value();
        let fast = set
            .evaluate_raw(value.clone(), &EvalLimits::default())
            .unwrap();
        let reference = set.evaluate_with_interpreter(value).unwrap();
        assert_eq!(
            fast,
            reference,
            "RVM and interpreter differ for {}",
            serde_json::to_string(input).unwrap()
        );
        let d = policy::Decision::from_value(&fast).unwrap();
        denied += usize::from(!d.allow);
        warned += usize::from(!d.warn.is_empty());
    }
    // The corpus must exercise both outcomes, or the comparison proves little.
    // (The access rules that hold without identity, location and
    // uninspected bodies, deny most of the random corpus: 25 of each.)
    assert!(
        denied > 25 && denied < inputs.len() - 25,
        "denied {denied} of {}",
        inputs.len()
    );
    assert!(warned > 20, "warned {warned}");
}

/// The request path builds only the input fields the policies read and
/// caches decisions on them: over the corpus, a decision on the reduced
/// input, and the same decision served again from the cache, equal the
/// decision on the whole document.
/// Decides `input` on the whole document and through the reduced, cached
/// path, asserts both agree, and returns the decision and how the cache
/// served it.
fn decided_alike(
    set: &policy::PolicySet,
    input: &PolicyInput,
    limits: &EvalLimits,
) -> (policy::Decision, policy::CacheUse) {
    let whole = set.evaluate(input.to_value(), limits).unwrap();
    let (cached, used) = set.decide(&input.reading(None), limits, 4096);
    assert_eq!(
        cached.unwrap(),
        whole,
        "reduced/cached decision differs for {}",
        serde_json::to_string(input).unwrap()
    );
    (whole, used)
}

#[test]
fn reduced_inputs_and_cached_decisions_equal_whole_input_decisions() {
    let set = policy::load(&PolicySource::Dir(common::repo_policies())).unwrap();
    assert_eq!(
        set.cache_bypass(),
        None,
        "the shipped set must be cacheable"
    );
    let reads = set.reads().paths();
    // The reduction must leave out what makes every request unique, or
    // the cache could never hit.
    for unique in ["input.request.id", "input.time", "input.source.port"] {
        assert!(
            !reads.iter().any(|r| r.starts_with(unique)),
            "{unique} is read: {reads:?}"
        );
    }
    let limits = EvalLimits::default();
    let (mut hits, mut denied) = (0, 0);
    for _ in 0..2 {
        for input in corpus() {
            let reduced = input.to_value_reading(set.reads(), None);
            assert_ne!(reduced, input.to_value(), "nothing was left out");
            let (whole, used) = decided_alike(&set, &input, &limits);
            hits += usize::from(used == policy::CacheUse::Hit);
            denied += usize::from(!whole.allow);
        }
    }
    // The second round is served from the cache (the first may hit too:
    // inputs that differ only in fields no rule reads share a decision).
    let n = corpus().len();
    assert!(hits >= n, "{hits} hits over {} decisions", 2 * n);
    assert!(denied > 100, "denied {denied}");
}

#[test]
fn inputs_built_by_the_code_match_the_published_schema() {
    let schema_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/input.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for input in corpus() {
        let doc = serde_json::to_value(&input).unwrap();
        if let Err(e) = validator.validate(&doc) {
            panic!("schema rejects {doc}: {e}");
        }
    }
    // And the schema is strict enough to catch a renamed field.
    let mut doc = serde_json::to_value(&corpus()[0]).unwrap();
    doc["request"]["verb"] = "GET".into();
    assert!(
        validator.validate(&doc).is_err(),
        "unknown field must be rejected"
    );
}

/// `object.get` with a literal key reads only that key: the reduced
/// document keeps `input.source.geo.country`, not the whole `source` (whose
/// client port would make every request a cache miss), and decisions stay
/// those of the whole document, absent keys and defaults included.
#[test]
fn object_get_with_a_literal_key_reads_only_that_key_and_decides_the_same() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::repo_policies().join("decision.rego"),
        dir.path().join("decision.rego"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("lookups.rego"),
        r#"package rempart

import rego.v1

deny contains {"code": "country", "message": c} if {
	c := object.get(input.source, ["geo", "country"], "unknown")
	c != "FR"
}

deny contains {"code": "method", "message": m} if {
	m := object.get(input, ["request", "method"], "")
	m in {"DELETE", "TRACE"}
}

warn contains {"code": "header", "message": h} if {
	h := object.get(input.request.headers, "x-missing", "none")
}

warn contains {"code": "subject", "message": s} if {
	s := object.get(input.identity, "subject", "anonymous")
}
"#,
    )
    .unwrap();
    let set = policy::load(&PolicySource::Dir(dir.path().to_path_buf())).unwrap();
    assert_eq!(
        set.reads().paths(),
        vec![
            "input.identity.subject",
            "input.request.headers.x-missing",
            "input.request.method",
            "input.source.geo.country",
        ]
    );
    let limits = EvalLimits::default();
    let (mut hits, mut countries) = (0, std::collections::BTreeSet::new());
    for _ in 0..2 {
        for input in corpus() {
            let (whole, used) = decided_alike(&set, &input, &limits);
            hits += usize::from(used == policy::CacheUse::Hit);
            countries.extend(
                whole
                    .deny
                    .iter()
                    .filter(|r| r.code == "country")
                    .map(|r| r.message.clone()),
            );
        }
    }
    assert!(hits >= corpus().len(), "{hits} hits");
    assert!(
        countries.len() > 1,
        "the corpus covers several countries: {countries:?}"
    );
}
