//! Bundle activation cost: read + gunzip + checks + compile of a bundle
//! with 100 rules and 10,000 data entries, and evaluation on it compared
//! with a one-rule bundle (and each dimension alone).
//!
//! `cargo bench --bench bundle`; results are recorded in docs/performance.md.
//! The swap itself is one atomic pointer store (`PolicyStore::install`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rempart::policy::bundle::build::tarball;
use rempart::policy::bundle::read::RawFile;
use rempart::policy::bundle::{load_bytes, BundleLimits};
use rempart::policy::{EvalLimits, ENTRY_POINT};

const HEAD: &str = r#"package rempart

import rego.v1

decision := {"allow": count(deny) == 0, "deny": [r | some r in deny], "warn": []}
"#;

/// A bundle of `rules` deny rules and `hosts` partner hosts in data.
fn bundle(rules: usize, hosts: usize) -> Vec<u8> {
    let mut rego = HEAD.to_string();
    for i in 0..rules {
        rego.push_str(&format!(
            r#"
deny contains {{"code": "rule_{i}", "message": "path {i} is blocked"}} if {{
	startswith(input.request.path, "/blocked{i}/")
	not data.partners.hosts[input.request.host]
}}
"#
        ));
    }
    let data: serde_json::Map<String, serde_json::Value> = (0..hosts)
        .map(|i| (format!("partner{i}.example.eu"), true.into()))
        .collect();
    let files = vec![
        RawFile {
            name: ".manifest".into(),
            bytes: br#"{"revision":"bench","roots":[""]}"#.to_vec(),
        },
        RawFile {
            name: "decision.rego".into(),
            bytes: rego.into_bytes(),
        },
        RawFile {
            name: "partners/data.json".into(),
            bytes: serde_json::json!({ "hosts": data })
                .to_string()
                .into_bytes(),
        },
    ];
    tarball(&files).expect("tarball")
}

fn benches(c: &mut Criterion) {
    let limits = BundleLimits::default();
    let big = bundle(100, 10_000);
    let small = bundle(1, 10);
    let many_rules = bundle(100, 10);
    let much_data = bundle(1, 10_000);
    c.bench_function("bundle_activate_100_rules_10k_data", |b| {
        b.iter(|| {
            load_bytes(black_box(&big), &limits, None, "bench".into(), ENTRY_POINT)
                .expect("bundle loads")
        })
    });
    let input: regorus::Value = serde_json::json!({
        "request": {"path": "/blocked7/x", "host": "partner42.example.eu"}
    })
    .into();
    let eval_limits = EvalLimits::default();
    for (name, bytes) in [
        ("small", &small),
        ("big", &big),
        ("100_rules_10_data", &many_rules),
        ("1_rule_10k_data", &much_data),
    ] {
        let set = load_bytes(bytes, &limits, None, name.into(), ENTRY_POINT).expect("bundle loads");
        c.bench_function(&format!("bundle_eval_{name}"), |b| {
            b.iter(|| {
                set.evaluate(black_box(input.clone()), &eval_limits)
                    .expect("evaluates")
            })
        });
    }
}

criterion_group! {
    name = bundle_benches;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(bundle_benches);
