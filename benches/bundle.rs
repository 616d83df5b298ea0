//! Bundle activation cost: read + gunzip + checks + compile of a bundle
//! with 100 rules and 10,000 data entries, and evaluation on it compared
//! with a one-rule bundle (and each dimension alone).
//!
//! `cargo bench --bench bundle`; results are recorded in docs/performance.md.
//! The swap itself is one atomic pointer store (`PolicyStore::install`).
//!
//! Before criterion runs, a reload is played once and printed on stderr
//! (`reload:` lines): evaluation p50/p99 on the serving big bundle, the
//! activation and swap of a new revision of it (same rules, other data),
//! p50/p99 again on the new one, and a `rempart policy test` run of the
//! bundle's 100 rules (one test each).

use std::hint::black_box;
use std::time::{Duration, Instant};

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
    tarball(&bundle_files(rules, hosts, 0)).expect("tarball")
}

/// The files of [`bundle`]; `first_host` shifts the partner numbers (a new
/// revision of the data).
fn bundle_files(rules: usize, hosts: usize, first_host: usize) -> Vec<RawFile> {
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
    let data: serde_json::Map<String, serde_json::Value> = (first_host..first_host + hosts)
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
    files
}

/// p50 and p99 of `n` evaluations of the set the store serves.
fn percentiles(
    store: &rempart::policy::PolicyStore,
    input: &regorus::Value,
    n: usize,
) -> (Duration, Duration) {
    let limits = EvalLimits::default();
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let set = store.current();
            black_box(set.evaluate(input.clone(), &limits).expect("evaluates"));
            started.elapsed()
        })
        .collect();
    times.sort();
    (times[n / 2], times[n * 99 / 100])
}

/// One reload of the big bundle, measured as the request path sees it.
fn reload(big: &[u8], input: &regorus::Value) {
    let limits = BundleLimits::default();
    let metrics = std::sync::Arc::new(rempart::metrics::Metrics::new());
    let v1 = load_bytes(big, &limits, None, "v1".into(), ENTRY_POINT).expect("bundle loads");
    let store =
        rempart::policy::PolicyStore::from_set(v1, rempart::policy::PolicySource::Builtin, metrics);
    let n = 20_000;
    let (p50, p99) = percentiles(&store, input, n);
    eprintln!("reload: before: eval p50 {p50:?}, p99 {p99:?} over {n} evaluations");
    let v2_bytes = tarball(&bundle_files(100, 10_000, 5_000)).expect("tarball");
    let started = Instant::now();
    let v2 = load_bytes(&v2_bytes, &limits, None, "v2".into(), ENTRY_POINT).expect("loads");
    let activated = started.elapsed();
    let started = Instant::now();
    store.install(v2);
    let swapped = started.elapsed();
    let (p50, p99) = percentiles(&store, input, n);
    eprintln!(
        "reload: activation (gunzip + checks + data + compile) {activated:?}, swap {swapped:?}"
    );
    eprintln!("reload: after: eval p50 {p50:?}, p99 {p99:?} over {n} evaluations");

    // `rempart policy test` on the bundle's files with a test per rule.
    let dir = tempfile::tempdir().expect("temp dir");
    for f in bundle_files(100, 10_000, 0) {
        let path = dir.path().join(&f.name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, f.bytes).expect("write");
    }
    let mut tests = String::from("package rempart_test\n\nimport rego.v1\n");
    for i in 0..100 {
        tests.push_str(&format!(
            "\ntest_rule_{i} if {{\n\td := data.rempart.decision with input as \
             {{\"request\": {{\"path\": \"/blocked{i}/x\", \"host\": \"unknown.example\"}}}}\n\
             \t{{r.code | some r in d.deny}} == {{\"rule_{i}\"}}\n}}\n"
        ));
    }
    std::fs::write(dir.path().join("decision_test.rego"), tests).expect("write");
    let started = Instant::now();
    let results = rempart::policy::testing::run(
        &rempart::policy::PolicySource::Dir(dir.path().to_path_buf()),
        ENTRY_POINT,
    )
    .expect("tests compile");
    let took = started.elapsed();
    let passed = results.iter().filter(|r| r.passed).count();
    eprintln!(
        "reload: policy test: {passed}/{} passed in {took:?} (compile included)",
        results.len()
    );
    assert_eq!(passed, 100, "the generated tests must pass");
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
    reload(&big, &input);
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
