//! A real CRM behind rempart: Creme CRM (PyPI `creme-crm`, Django, SQLite)
//! installed and started on loopback by `tests/e2e/creme-setup.sh`, rempart
//! in front of it with TLS termination (a CA made here), JWT identity (an
//! ES256 key and JWKS file made here), the `creme` profile and the shipped
//! policies with the permission matrix on. A Python `requests` driver
//! (`tests/e2e/creme_driver.py`) logs in like a browser — session cookie,
//! CSRF token, Referer — and this test checks every answer and every audit
//! record's `resource`.
//!
//! The first run installs Creme (about 80 s on a fresh machine; `.ci/run`
//! does it before the tests); later runs reuse `tests/e2e/.venv` and
//! `tests/e2e/.creme` and take a few seconds.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::Rempart;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const ISSUER: &str = "https://idp.example.eu/realms/crm";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

/// Runs the (idempotent) setup script: its `KEY=value` lines.
fn setup_creme() -> BTreeMap<String, String> {
    let started = Instant::now();
    let out = Command::new(e2e_dir().join("creme-setup.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run tests/e2e/creme-setup.sh");
    assert!(
        out.status.success(),
        "tests/e2e/creme-setup.sh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("creme setup: {:.1} s", started.elapsed().as_secs_f64());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A process killed when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_creme(env: &BTreeMap<String, String>) -> (Guard, u16) {
    let port = common::unused_port();
    let child = Command::new(&env["CREME"])
        .args([
            "runserver",
            &format!("127.0.0.1:{port}"),
            "--noreload",
            "--settings=crmproj.settings",
        ])
        .current_dir(Path::new(&env["CREME_STATE"]).join("crmproj"))
        .env("PYTHONWARNINGS", "ignore")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start creme runserver");
    let guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = format!("http://127.0.0.1:{port}/creme_login/");
        let req = http::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        if let Ok(r) = common::send(req).await {
            assert_eq!(r.status, 200, "Creme answers its login page");
            return (guard, port);
        }
        assert!(
            Instant::now() < deadline,
            "Creme did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A CA and a server certificate for 127.0.0.1: (CA PEM, cert PEM, key PEM).
fn tls_material() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "e2e CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "crm");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ES256 key: the JWKS document, and tokens for a subject with roles.
struct Signer(KeyPair);

impl Signer {
    fn jwks(&self) -> String {
        let raw = self.0.public_key_raw();
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "e2e",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]})
        .to_string()
    }

    fn token(&self, sub: &str, roles: &[&str]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": "crm", "sub": sub, "exp": now + 900, "iat": now,
            "roles": roles,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("e2e".into());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.0.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

/// The repository's policies, with the permission matrix enforced.
fn policies(dir: &Path) -> PathBuf {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(common::repo_policies()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with("_test.rego") {
            continue;
        }
        if name == "data.json" {
            let mut data: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            data["settings"]["access"]["permissions_enforced"] = true.into();
            std::fs::write(out.join(name), data.to_string()).unwrap();
        } else if name.ends_with(".rego") {
            std::fs::copy(&p, out.join(name)).unwrap();
        }
    }
    out
}

/// What each driver step must answer, and the resource its record names.
struct Expect {
    status: &'static [u16],
    kind: &'static str,
    operation: &'static str,
    deny: Option<&'static str>,
}

fn expect(step: &str) -> Expect {
    let e = |status: &'static [u16], kind, operation, deny| Expect {
        status,
        kind,
        operation,
        deny,
    };
    match step {
        "anonymous_login_form" | "login_form" => e(&[200], "session", "login", None),
        "anonymous_list" => e(&[403], "contact", "list", Some("unauthenticated")),
        "login" => e(&[302], "session", "login", None),
        "list" | "list_has_contacts" => e(&[200], "contact", "list", None),
        "open" | "open_created" => e(&[200], "contact", "read", None),
        "open_deleted" => e(&[404], "contact", "read", None),
        "create_form" => e(&[200], "contact", "create", None),
        "create" => e(&[302], "contact", "create", None),
        "delete_refused" => e(&[403], "entity", "delete", Some("delete_requires_role")),
        "export_refused" | "export_repeated_refused" | "vcf_refused" => {
            e(&[403], "contact", "export", Some("bulk_requires_role"))
        }
        "report_export_refused" => e(&[403], "entity", "export", Some("bulk_requires_role")),
        "delete_unicode_refused" => e(&[403], "entity", "delete", Some("delete_requires_role")),
        "report_export" | "report_export_content" => e(&[200], "entity", "export", None),
        "export_repeated" | "export_repeated_content" => e(&[200], "contact", "export", None),
        "delete" | "delete_for_good" => e(&[200, 302], "entity", "delete", None),
        "export" | "export_content" => e(&[200], "contact", "export", None),
        "logout" => e(&[302], "session", "login", None),
        other => panic!("unexpected driver step {other}"),
    }
}

/// The URL patterns of the installed Creme, as `tests/e2e/creme_urls.py`
/// prints them, must be those of `tests/data/creme-2.8.6-urls.tsv`, which
/// `src/profile/tests.rs` classifies one by one: a Creme that grew a route
/// fails here instead of sending it past the profile as `unknown`.
fn assert_route_dump_is_current(env: &BTreeMap<String, String>) {
    let script = e2e_dir().join("creme_urls.py");
    let out = Command::new(&env["CREME"])
        .args([
            "shell",
            "--settings=crmproj.settings",
            "-c",
            &format!(
                "with open({:?}) as f: exec(f.read())",
                script.display().to_string()
            ),
        ])
        .current_dir(Path::new(&env["CREME_STATE"]).join("crmproj"))
        .env("PYTHONWARNINGS", "ignore")
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run creme shell");
    assert!(out.status.success(), "creme_urls.py failed: {}", out.status);
    let routes = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with('^'))
            .map(String::from)
            .collect()
    };
    let live = routes(&String::from_utf8_lossy(&out.stdout));
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/creme-2.8.6-urls.tsv"),
    )
    .unwrap();
    let known = routes(&fixture);
    assert!(live.len() > 600, "only {} routes dumped", live.len());
    let added: Vec<&String> = live.iter().filter(|r| !known.contains(r)).collect();
    let gone: Vec<&String> = known.iter().filter(|r| !live.contains(r)).collect();
    assert!(
        added.is_empty() && gone.is_empty(),
        "the installed Creme's routes differ from tests/data/creme-2.8.6-urls.tsv: \
         regenerate it with tests/e2e/creme_urls.py and classify the new routes in profiles/creme.json\n\
         added: {added:#?}\ngone: {gone:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creme_crm_behind_rempart_end_to_end() {
    let env = setup_creme();
    assert_route_dump_is_current(&env);
    let (_creme, creme_port) = start_creme(&env).await;

    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_material();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_file = write("ca.pem", &ca);
    let cert_file = write("cert.pem", &cert);
    let key_file = write("key.pem", &key);
    let signer = Signer(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap());
    let jwks_file = write("jwks.json", &signer.jwks());
    let config = write(
        "rempart.toml",
        &format!(
            r#"
[server.tls]
cert = "{}"
key = "{}"
[upstream]
url = "http://127.0.0.1:{creme_port}"
[identity.jwt]
issuer = "{ISSUER}"
audiences = ["crm"]
jwks_file = "{}"
roles_claim = "roles"
[classify]
profiles = ["creme"]
"#,
            cert_file.display(),
            key_file.display(),
            jwks_file.display()
        ),
    );
    let policy_dir = policies(dir.path());
    let rp = Rempart::try_start(
        "",
        &[
            "--config",
            config.to_str().unwrap(),
            "--policies",
            policy_dir.to_str().unwrap(),
        ],
    )
    .unwrap();
    let base = format!("https://127.0.0.1:{}", rp.addr.port());

    let driver_config = serde_json::json!({
        "tokens": {
            "sales": signer.token("sales-user", &["sales"]),
            "admin": signer.token("admin-user", &["admin"]),
            "dpo": signer.token("dpo-user", &["dpo"]),
        },
        "passwords": {"sales": "sales-pass", "admin": "admin-pass", "dpo": "dpo-pass"},
        "contact_ct": env["CONTACT_CT"].parse::<u64>().unwrap(),
        "contact_id": env["CONTACT_ID"].parse::<u64>().unwrap(),
        "owner_id": env["ADMIN_ID"].parse::<u64>().unwrap(),
        "report_id": env["REPORT_ID"].parse::<u64>().unwrap(),
    });
    let out = tokio::task::spawn_blocking({
        let python = env["PYTHON"].clone();
        let (base, ca_file) = (base.clone(), ca_file.clone());
        move || {
            Command::new(python)
                .arg(e2e_dir().join("creme_driver.py"))
                .arg(&base)
                .arg(&ca_file)
                .arg(driver_config.to_string())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "driver failed: {}\n{stdout}\n{}\nrempart log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        rp.log_text()
    );
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    for must in [
        "anonymous_list",
        "login",
        "list",
        "open",
        "create",
        "delete_refused",
        "export_refused",
        "export_repeated_refused",
        "report_export_refused",
        "vcf_refused",
        "delete_unicode_refused",
        "delete",
        "delete_for_good",
        "open_deleted",
        "export",
        "export_repeated_content",
        "report_export_content",
        "logout",
    ] {
        assert!(names.contains(&must), "step {must} missing: {names:?}");
    }

    for step in &steps {
        let name = step["step"].as_str().unwrap();
        let want = expect(name);
        let status = step["status"].as_u64().unwrap() as u16;
        assert!(want.status.contains(&status), "{name}: {step}");
        let id = step["decision_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no decision id: {step}"));
        let rec = rp.audit_record(id).await;
        let r = &rec["resource"];
        assert_eq!(r["crm"], "creme", "{name}: {rec}");
        assert_eq!(r["type"], want.kind, "{name}: {rec}");
        assert_eq!(r["operation"], want.operation, "{name}: {rec}");
        assert_eq!(rec["status"], status, "{name}: {rec}");
        let user = step["user"].as_str().unwrap();
        if user != "anonymous" {
            assert_eq!(rec["identity"]["method"], "jwt", "{name}: {rec}");
            assert_eq!(
                rec["identity"]["subject"],
                format!("{user}-user"),
                "{name}: {rec}"
            );
        }
        match want.deny {
            Some(code) => {
                assert_eq!(rec["decision"]["outcome"], "denied", "{name}: {rec}");
                assert_eq!(step["reasons"][0]["code"], code, "{name}: {step}");
                assert_eq!(rec["decision"]["deny"][0]["code"], code, "{name}: {rec}");
            }
            None => assert_eq!(rec["decision"]["outcome"], "allowed", "{name}: {rec}"),
        }
        if name.starts_with("export") || name.starts_with("report_export") {
            if status == 200 {
                assert!(
                    step["content_type"]
                        .as_str()
                        .unwrap()
                        .starts_with("text/csv"),
                    "{step}"
                );
            }
            assert_eq!(r["bulk"], true, "{name}: {rec}");
        }
        if name == "export" {
            assert!(
                step["content_type"]
                    .as_str()
                    .unwrap()
                    .starts_with("text/csv"),
                "{step}"
            );
            assert_eq!(r["bulk"], true, "{rec}");
        }
        if name.ends_with("_content") || name == "list_has_contacts" {
            assert_eq!(step["body_has"], true, "{name}: {step}");
        }
        if name == "open" {
            assert_eq!(r["id"], env["CONTACT_ID"], "{rec}");
        }
    }
    // The refused export says why, for a human.
    let refused = steps
        .iter()
        .find(|s| s["step"] == "export_refused")
        .unwrap();
    assert_eq!(
        refused["reasons"][0]["message"],
        "bulk export of contact requires one of the roles: dpo"
    );
    // Given twice, the header filter the CRM acts on (the last) is the one
    // recorded and refused.
    let repeated = steps
        .iter()
        .find(|s| s["step"] == "export_repeated_refused")
        .unwrap();
    assert_eq!(
        repeated["reasons"][0]["message"],
        "bulk export of contact requires one of the roles: dpo"
    );
}
