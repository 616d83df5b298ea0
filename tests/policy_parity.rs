//! The request path evaluates policies through regorus's compiled RVM
//! program; the interpreter is the reference. This test proves that both
//! give the same decision documents for the shipped policy set over a
//! corpus of inputs that exercises every rule, and that the schema in
//! docs/ accepts the documents the code builds.

mod common;

use rempart::input::{Destination, Direction, Endpoint, Identity, PolicyInput, RequestInfo, Resource};
use rempart::policy::{self, EvalLimits, PolicySource};

fn corpus() -> Vec<PolicyInput> {
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "TRACK", "CONNECT"];
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
    let mut out = Vec::new();
    let mut n = 0u64;
    for m in methods {
        for p in paths {
            for (i, scope) in scopes.iter().enumerate() {
                let scheme = schemes[(n as usize + i) % 2];
                n += 1;
                let segments: Vec<String> = p
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_decode(s))
                    .collect();
                let resource = rempart::pipeline::classify::classify(&m.parse().unwrap(), &segments);
                out.push(PolicyInput {
                    direction: if n % 7 == 0 { Direction::Egress } else { Direction::Ingress },
                    request: RequestInfo {
                        id: format!("id-{n}"),
                        method: m.into(),
                        scheme: scheme.into(),
                        host: "crm.example.eu".into(),
                        port: 8080,
                        path: percent_decode(p),
                        segments,
                        query: Default::default(),
                        headers: [("accept".to_string(), "*/*".to_string())].into(),
                        protocol: "HTTP/1.1".into(),
                    },
                    source: Endpoint { ip: "192.0.2.1".into(), port: 1000, scope: scope.to_string() },
                    destination: Destination {
                        host: "127.0.0.1".into(),
                        ip: Some("127.0.0.1".into()),
                        port: 8000,
                        scope: Some("loopback".into()),
                    },
                    identity: if n % 3 == 0 {
                        Identity { authenticated: true, method: "header".into(), subject: Some("alice".into()), roles: vec!["dpo".into()] }
                    } else {
                        Identity { authenticated: false, method: "none".into(), subject: None, roles: vec![] }
                    },
                    resource: Resource { ..resource },
                    time: rempart::input::time_info(std::time::SystemTime::now()),
                });
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[test]
fn rvm_and_interpreter_agree_on_the_shipped_policies() {
    let set = policy::load(&PolicySource::Dir(common::repo_policies())).unwrap();
    let inputs = corpus();
    let (mut denied, mut warned) = (0, 0);
    for input in &inputs {
        let value = input.to_value();
        let fast = set.evaluate_raw(value.clone(), &EvalLimits::default()).unwrap();
        let reference = set.evaluate_with_interpreter(value).unwrap();
        assert_eq!(fast, reference, "RVM and interpreter differ for {}", serde_json::to_string(input).unwrap());
        let d = policy::Decision::from_value(&fast).unwrap();
        denied += usize::from(!d.allow);
        warned += usize::from(!d.warn.is_empty());
    }
    // The corpus must exercise both outcomes, or the comparison proves little.
    assert!(denied > 50 && denied < inputs.len() - 50, "denied {denied} of {}", inputs.len());
    assert!(warned > 20, "warned {warned}");
}

#[test]
fn inputs_built_by_the_code_match_the_published_schema() {
    let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/input.schema.json");
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
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
    assert!(validator.validate(&doc).is_err(), "unknown field must be rejected");
}
