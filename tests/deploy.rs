//! The deployment material in `deploy/`, checked with the real tools:
//! `rempart check` on every shipped configuration, `kubectl kustomize` and
//! `kubernetes-validate` on the Kubernetes manifests, `systemd-analyze
//! verify` on the unit, `promtool` on the Prometheus files, the metric names
//! of the alerts and the dashboard against a running rempart's `/metrics`,
//! and a real Prometheus server scraping a real rempart.
//!
//! Every tool is required: `.ci/run` installs them (apt `prometheus`, a
//! venv with `kubernetes-validate` in `.venv`); kubectl and systemd come
//! with the machine image. A missing tool fails the test with what to
//! install, it never skips it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{get, request, Rempart, Upstream};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A program from PATH; panics with the way to get it when missing.
fn tool(name: &str, how: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {how}"))
}

/// A program of the Python venv that `.ci/run` creates (`.venv`, or
/// `$REMPART_DEPLOY_VENV`).
fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("REMPART_DEPLOY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"));
    let bin = venv.join("bin").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: create the venv as .ci/run does \
         (python3 -m venv .venv && .venv/bin/pip install kubernetes-validate==1.37.0)",
        bin.display()
    );
    bin
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every document of a YAML file (or stream, with `-`), as JSON, through the
/// venv's PyYAML (installed with kubernetes-validate).
fn yaml_docs_of(text: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml_file(path: &Path) -> Value {
    let mut docs = yaml_docs_of(&read(path));
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A rempart configuration as TOML, for reading the values the manifests
/// must agree with.
fn toml_file(path: &Path) -> toml::Table {
    read(path)
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn duration_secs(cfg: &toml::Table, table: &str, key: &str) -> u64 {
    let s = cfg[table][key].as_str().unwrap();
    humantime::parse_duration(s).unwrap().as_secs()
}

// ---------------------------------------------------------------- image

/// The runtime stage of the Dockerfile: its instructions, continuation
/// lines joined.
fn dockerfile_stages() -> Vec<(String, Vec<(String, String)>)> {
    let text = read(&deploy("Dockerfile")).replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (op, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let op = op.to_ascii_uppercase();
        let rest = rest.trim().to_string();
        if op == "FROM" {
            let name = rest
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case("AS"))
                .map(|w| w[1].to_string())
                .unwrap_or_default();
            stages.push((name, vec![(op, rest)]));
        } else if let Some(stage) = stages.last_mut() {
            stage.1.push((op, rest));
        }
    }
    stages
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_healthcheck_and_existing_paths() {
    let stages = dockerfile_stages();
    let names: Vec<&str> = stages.iter().map(|s| s.0.as_str()).collect();
    assert!(names.contains(&"builder"), "stages: {names:?}");
    let runtime = &stages
        .iter()
        .find(|s| s.0 == "runtime")
        .expect("a runtime stage")
        .1;
    let get_all = |op: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    assert!(
        get_all("FROM")[0].contains("slim") || get_all("FROM")[0].contains("distroless"),
        "minimal runtime base: {:?}",
        get_all("FROM")
    );
    // Non-root, numerically (Kubernetes' runAsNonRoot cannot check names).
    let user = *get_all("USER").last().expect("USER in the runtime stage");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER");
    assert_ne!(uid, 0, "USER must not be root");
    let healthcheck = get_all("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1);
    assert!(healthcheck[0].contains("/healthz") && healthcheck[0].contains("9090"));
    assert_eq!(get_all("STOPSIGNAL"), vec!["SIGTERM"]);

    // The builder compiles the locked release binary; the runtime runs it.
    let builder = &stages.iter().find(|s| s.0 == "builder").unwrap().1;
    assert!(builder
        .iter()
        .any(|(o, r)| o == "RUN" && r.contains("cargo build --release --locked")));
    // By default the build is profile-guided, by a script that is copied
    // into the build context and is valid bash.
    assert!(builder
        .iter()
        .any(|(o, r)| o == "RUN" && r.contains("bash deploy/pgo.sh")));
    assert!(builder
        .iter()
        .any(|(o, r)| o == "COPY" && r.starts_with("deploy/pgo.sh ")));
    // ... with llvm-bolt installed, or the script stops at the PGO build.
    assert!(builder
        .iter()
        .any(|(o, r)| o == "RUN" && r.contains("apt-get install") && r.contains("bolt-19")));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(repo().join("deploy/pgo.sh"))
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "deploy/pgo.sh: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    assert!(get_all("ENTRYPOINT")[0].contains("/usr/local/bin/rempart"));

    // Every COPY from the build context names a path of the repository.
    for (_, stage) in &stages {
        for (op, rest) in stage.iter().filter(|(o, _)| o == "COPY") {
            if rest.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            for src in &words[..words.len() - 1] {
                assert!(
                    repo().join(src).exists(),
                    "{op} {rest}: {src} does not exist in the repository"
                );
            }
        }
    }

    // The build context leaves out the multi-gigabyte target/ and local
    // data, and none of what the COPYs need.
    let ignore = read(&repo().join(".dockerignore"));
    let ignored: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    for needed in ["target", ".git", ".venv", "geoip/data"] {
        assert!(ignored.contains(&needed), ".dockerignore lacks {needed}");
    }
    for (_, stage) in &stages {
        for (_, rest) in stage.iter().filter(|(o, _)| o == "COPY") {
            let first = rest.split_whitespace().next().unwrap();
            assert!(
                !ignored.contains(&first),
                "COPY {first} is in .dockerignore"
            );
        }
    }

    // The default config it ships points at the image's audit volume.
    let cfg = toml_file(&deploy("container/rempart.toml"));
    let audit = cfg["audit"]["path"].as_str().unwrap();
    let volume = get_all("VOLUME").join(" ");
    let audit_dir = Path::new(audit).parent().unwrap().to_str().unwrap();
    assert!(
        volume.contains(audit_dir),
        "audit path {audit} not on a VOLUME ({volume})"
    );
    let cmd = get_all("CMD").join(" ");
    assert!(cmd.contains("/etc/rempart/rempart.toml"));
    assert!(runtime.iter().any(|(o, r)| o == "COPY"
        && r.contains("deploy/container/rempart.toml")
        && r.ends_with("/etc/rempart/rempart.toml")));
}

/// The image's HEALTHCHECK command, run as Docker would (exec form), against
/// a real rempart: healthy while it serves, unhealthy once it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn dockerfile_healthcheck_command_tells_a_live_rempart_from_a_dead_one() {
    let stages = dockerfile_stages();
    let runtime = &stages.iter().find(|s| s.0 == "runtime").unwrap().1;
    let hc = &runtime.iter().find(|(o, _)| o == "HEALTHCHECK").unwrap().1;
    let json = &hc[hc.find("CMD").expect("HEALTHCHECK ... CMD [...]") + 3..];
    let argv: Vec<String> = serde_json::from_str(json.trim()).expect("exec-form JSON array");
    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &[]);
    // The image's admin port is 9090; the test's is ephemeral.
    let port = rp.admin.port().to_string();
    let argv: Vec<String> = argv.iter().map(|a| a.replace("9090", &port)).collect();
    let check = || {
        Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(
        check().success(),
        "health check failed on a live rempart: {argv:?}"
    );
    rp.stop();
    assert!(
        !check().success(),
        "health check passed with rempart stopped"
    );
}

// ------------------------------------------------------ configurations

/// Runs `rempart check` on a shipped configuration after moving its
/// absolute paths under a temporary root (`/var/lib/rempart` -> tmp, the
/// policy directory -> `policies`), as a deployment would lay them out.
fn rempart_check(config: &Path, policies: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("var/lib/rempart");
    std::fs::create_dir_all(state.join("audit")).unwrap();
    std::fs::create_dir_all(state.join("geoip")).unwrap();
    let mut text = read(config).replace("/var/lib/rempart", state.to_str().unwrap());
    for dir in ["/etc/rempart/policies", "/usr/share/rempart/policies"] {
        text = text.replace(dir, policies.to_str().unwrap());
    }
    // Nothing left that points outside the temporary root.
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(
            !line.contains("\"/etc") && !line.contains("\"/usr") && !line.contains("\"/var"),
            "{}: unmapped path in {line:?}",
            config.display()
        );
    }
    let cfg = tmp.path().join("rempart.toml");
    std::fs::write(&cfg, text).unwrap();
    let out =
        run_ok(Command::new(common::bin()).args(["check", "--config", cfg.to_str().unwrap()]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_shipped_configuration_passes_rempart_check() {
    let base_policies = deploy("kubernetes/base/policies");
    for (config, policies) in [
        (deploy("container/rempart.toml"), repo().join("policies")),
        (deploy("systemd/rempart.toml"), repo().join("policies")),
        (
            deploy("kubernetes/base/rempart.toml"),
            base_policies.clone(),
        ),
        (
            deploy("kubernetes/overlays/egress-gateway/rempart-gateway.toml"),
            base_policies,
        ),
    ] {
        let out = rempart_check(&config, &policies);
        let files = format!("({} files)", shipped_policy_files().len());
        assert!(
            out.starts_with("ok: ") && out.contains("mode enforce") && out.contains(&files),
            "{}: {out}",
            config.display()
        );
    }
}

/// The systemd and Kubernetes configurations ship two commented identity
/// examples (`# a)` JWT, `# b)` trusted header): each, uncommented alone,
/// must pass `rempart check` and silence its "no identity source" warning,
/// so that a DSI who follows the comment gets the access rules on.
#[test]
fn shipped_identity_examples_pass_rempart_check_and_turn_identity_on() {
    for config in [
        deploy("systemd/rempart.toml"),
        deploy("kubernetes/base/rempart.toml"),
    ] {
        let text = read(&config);
        for (from, to) in [("# a) ", "# b) "), ("# b) ", "\n[admin]")] {
            let start = text
                .find(from)
                .unwrap_or_else(|| panic!("{}: no example {from:?}", config.display()));
            let end = start + text[start..].find(to).unwrap();
            let example: Vec<String> = text[start..end]
                .lines()
                .map(|l| match l.strip_prefix("# ") {
                    Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest.to_string(),
                    _ => l.to_string(),
                })
                .collect();
            assert!(
                example.iter().any(|l| l.starts_with("[identity")),
                "{}: example {from:?} has no [identity] table",
                config.display()
            );
            let tmp = tempfile::tempdir().unwrap();
            let uncommented = tmp.path().join("rempart.toml");
            let policies = repo().join("policies");
            let full = format!("{}{}{}", &text[..start], example.join("\n"), &text[end..])
                .replace("/var/lib/rempart", tmp.path().to_str().unwrap())
                .replace("/etc/rempart/policies", policies.to_str().unwrap());
            std::fs::create_dir_all(tmp.path().join("audit")).unwrap();
            std::fs::write(&uncommented, full).unwrap();
            let out = run_ok(Command::new(common::bin()).args([
                "check",
                "--config",
                uncommented.to_str().unwrap(),
            ]));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !err.contains("no identity source"),
                "{} example {from:?}: {err}",
                config.display()
            );
        }
    }
}

/// The files of `policies/` that `serve` loads (tests excluded), sorted.
fn shipped_policy_files() -> Vec<String> {
    let mut shipped: Vec<String> = std::fs::read_dir(repo().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n == "data.json" || (n.ends_with(".rego") && !n.ends_with("_test.rego")))
        .collect();
    shipped.sort();
    shipped
}

#[test]
fn kubernetes_policy_configmap_files_are_the_shipped_policies() {
    let copies = deploy("kubernetes/base/policies");
    let shipped = shipped_policy_files();
    let mut copied: Vec<String> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    copied.sort();
    assert_eq!(
        copied, shipped,
        "deploy/kubernetes/base/policies/ must mirror policies/"
    );
    for name in &shipped {
        assert_eq!(
            read(&copies.join(name)),
            read(&repo().join("policies").join(name)),
            "deploy/kubernetes/base/policies/{name} differs from policies/{name}: copy it again"
        );
    }
}

// ----------------------------------------------------------- kubernetes

fn kustomization_dirs() -> Vec<PathBuf> {
    vec![
        deploy("kubernetes/base"),
        deploy("kubernetes/overlays/egress-gateway"),
    ]
}

/// Files a kustomization names, relative to its directory: resources that
/// are files, patches, generator inputs (`key=file` forms included).
fn kustomization_files(k: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
    let resources = str_list(&k["resources"]);
    let patches: Vec<String> = k["patches"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut generated = Vec::new();
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        for f in str_list(&g["files"]) {
            generated.push(f.split_once('=').map_or(f.clone(), |(_, p)| p.to_string()));
        }
    }
    (resources, patches, generated)
}

#[test]
fn kustomizations_name_every_file_of_their_directory_and_only_existing_ones() {
    for dir in kustomization_dirs() {
        let k = yaml_file(&dir.join("kustomization.yaml"));
        assert_eq!(k["kind"], "Kustomization");
        let (resources, patches, generated) = kustomization_files(&k);
        let mut named = BTreeSet::new();
        for r in resources.iter().chain(&patches).chain(&generated) {
            let p = dir.join(r);
            assert!(p.exists(), "{}: {r} does not exist", dir.display());
            named.insert(p.canonicalize().unwrap());
        }
        // Every YAML or TOML file next to the kustomization is used by it.
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let relevant = name.ends_with(".yaml") || name.ends_with(".toml");
            if relevant && name != "kustomization.yaml" {
                assert!(
                    named.contains(&p.canonicalize().unwrap()),
                    "{}: {name} is not listed in kustomization.yaml",
                    dir.display()
                );
            }
        }
        if dir.ends_with("base") {
            for e in std::fs::read_dir(dir.join("policies")).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    generated.contains(&format!("policies/{name}")),
                    "policies/{name} is not in the rempart-policies ConfigMap"
                );
            }
        }
    }
}

fn kubectl_kustomize(dir: &Path) -> String {
    let kubectl = tool(
        "kubectl",
        "kubectl (with its built-in kustomize) comes with this machine image",
    );
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(dir));
    String::from_utf8(out.stdout).unwrap()
}

fn kubernetes_validate(path: &Path) {
    let out = run_ok(Command::new(venv_bin("kubernetes-validate")).args([
        "--strict",
        "--quiet",
        path.to_str().unwrap(),
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("ERROR") && !text.contains("WARN"),
        "{}: {text}",
        path.display()
    );
}

#[test]
fn every_manifest_and_every_rendered_kustomization_passes_schema_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for dir in kustomization_dirs() {
        // Each resource file alone (patches are fragments, checked rendered).
        let (resources, _, _) = kustomization_files(&yaml_file(&dir.join("kustomization.yaml")));
        for r in resources.iter().filter(|r| r.ends_with(".yaml")) {
            kubernetes_validate(&dir.join(r));
            checked += 1;
        }
        // The whole rendered output, generated ConfigMaps and patches applied.
        let rendered = tmp.path().join(format!(
            "{}.yaml",
            dir.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&rendered, kubectl_kustomize(&dir)).unwrap();
        kubernetes_validate(&rendered);
    }
    assert!(checked >= 10, "only {checked} manifests found");

    // The validator does reject a broken manifest (a misspelt field).
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&deploy("kubernetes/base/crm-pdb.yaml")).replace("maxUnavailable", "maxUnavailabel"),
    )
    .unwrap();
    let out = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--quiet", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field"
    );
}

fn rendered(dir: &str) -> Vec<Value> {
    yaml_docs_of(&kubectl_kustomize(&deploy(dir)))
}

fn object<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}*"))
}

fn env_of(container: &Value, name: &str) -> String {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name}"))
        .to_string()
}

fn mebibytes(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("unexpected quantity {q}")
    }
}

/// The hardening and probes every rempart container must have.
fn assert_hardened_rempart(c: &Value, what: &str) {
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["runAsNonRoot"], true, "{what}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
    let admin_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(admin_port, 9090, "{what}");
    // docs/performance.md, session 7: peak RSS 48-52 MiB in three runs,
    // 72.3 MiB in the fourth. The request must cover the highest peak
    // measured, the limit leave room (deploy/README.md, "Resources").
    let req = mebibytes(c["resources"]["requests"]["memory"].as_str().unwrap());
    let lim = mebibytes(c["resources"]["limits"]["memory"].as_str().unwrap());
    assert!(
        req >= 73 && lim >= 2 * req,
        "{what}: memory {req}Mi/{lim}Mi"
    );
    // Audit trail: one directory per pod.
    let audit = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/rempart/audit")
        .unwrap_or_else(|| panic!("{what}: no audit mount"));
    assert_eq!(audit["subPathExpr"], "$(POD_NAME)", "{what}");
    assert!(audit.get("readOnly").is_none_or(|r| r == false), "{what}");
}

/// The longest rempart can take from SIGTERM to exit with `cfg`: requests
/// and egress tunnels drain together within `drain_timeout`, then the
/// tunnels still open are cut and write their closing records within one
/// more second (src/pipeline/egress.rs, CUT_GRACE; tests/egress.rs checks
/// it on a real tunnel).
fn rempart_max_drain_secs(cfg: &toml::Table) -> u64 {
    duration_secs(cfg, "server", "drain_timeout") + 1
}

#[test]
fn rendered_sidecar_base_is_hardened_and_wired_to_rempart() {
    let docs = rendered("kubernetes/base");
    let cfg = toml_file(&deploy("kubernetes/base/rempart.toml"));
    let deployment = object(&docs, "Deployment", "crm");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    // rempart is a native sidecar: started before the CRM, stopped after.
    let rempart = &pod["initContainers"][0];
    assert_eq!(rempart["name"], "rempart");
    assert_eq!(rempart["restartPolicy"], "Always");
    assert_hardened_rempart(rempart, "sidecar");
    assert_eq!(rempart["startupProbe"]["httpGet"]["path"], "/readyz");

    // Its ingress port is the Service's target; the CRM's own port is not.
    let listen_port: u64 = cfg["server"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let http = rempart["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .unwrap();
    assert_eq!(http["containerPort"].as_u64().unwrap(), listen_port);
    let service = object(&docs, "Service", "crm");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        cfg["upstream"]["url"].as_str().unwrap(),
        "http://127.0.0.1:8000"
    );

    // The CRM sends its outbound calls to rempart's egress listener, which
    // only the pod can reach.
    let egress = cfg["egress"]["listen"].as_str().unwrap();
    assert_eq!(egress, "127.0.0.1:3128");
    let crm = &pod["containers"][0];
    assert_eq!(crm["name"], "crm");
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        assert_eq!(env_of(crm, var), format!("http://{egress}"), "{var}");
    }
    assert_eq!(env_of(crm, "LISTEN_ADDR"), "127.0.0.1:8000");

    // Shutdown budget: the CRM's preStop and its own drain, then rempart's
    // longest drain, within the grace period (deploy/README.md, "Rolling
    // restarts").
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = crm["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    let crm_drain: u64 = deployment["spec"]["template"]["metadata"]["annotations"]
        ["rempart.io/crm-drain-seconds"]
        .as_str()
        .expect("the CRM's drain is declared")
        .parse()
        .unwrap();
    assert!(crm_drain > 0);
    let rempart_drain = rempart_max_drain_secs(&cfg);
    assert!(
        grace >= pre_stop + crm_drain + rempart_drain,
        "terminationGracePeriodSeconds {grace} < CRM preStop {pre_stop} + CRM drain {crm_drain} + rempart's longest drain {rempart_drain}"
    );

    // The config ConfigMap carries exactly the file `rempart check` accepted.
    let cm = object(&docs, "ConfigMap", "rempart-config-");
    assert_eq!(
        cm["data"]["rempart.toml"].as_str().unwrap(),
        read(&deploy("kubernetes/base/rempart.toml"))
    );
    let policies = object(&docs, "ConfigMap", "rempart-policies");
    assert_eq!(
        policies["metadata"]["name"], "rempart-policies",
        "no hash suffix: hot reload"
    );
    assert_eq!(
        policies["data"].as_object().unwrap().len(),
        shipped_policy_files().len()
    );

    // Voluntary disruptions take one pod at a time.
    let pdb = object(&docs, "PodDisruptionBudget", "crm");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Ingress only on rempart's ports; the CRM's port 8000 is never opened.
    let np = object(&docs, "NetworkPolicy", "crm");
    let text = np["spec"]["ingress"].to_string();
    assert!(text.contains("8080") && text.contains("9090") && !text.contains("8000"));
    // Egress: DNS to kube-dns, and 80/443 to public addresses only — the
    // gap deploy/README.md documents is exactly this, no wider: no other
    // port, no private range, no metadata endpoint.
    let egress = np["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 2, "{egress:#?}");
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    let ports: BTreeSet<u64> = egress[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([53]));
    let ports: BTreeSet<u64> = egress[1]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([80, 443]));
    for block in egress[1]["to"].as_array().unwrap() {
        let except = str_list(&block["ipBlock"]["except"]);
        let must: &[&str] = if block["ipBlock"]["cidr"] == "0.0.0.0/0" {
            &[
                "10.0.0.0/8",
                "100.64.0.0/10",
                "169.254.0.0/16",
                "172.16.0.0/12",
                "192.168.0.0/16",
            ]
        } else {
            &["fc00::/7", "fe80::/10"]
        };
        for range in must {
            assert!(
                except.iter().any(|e| e == range),
                "{range} not excepted: {block}"
            );
        }
    }
    // The files a security team reads say plainly that the base does not
    // force outbound traffic, and where to go instead.
    for file in [
        "kubernetes/base/crm-networkpolicy.yaml",
        "kubernetes/base/kustomization.yaml",
    ] {
        let text = read(&deploy(file));
        assert!(
            text.contains("NOT force") && text.contains("overlays/egress-gateway"),
            "{file} does not warn about the sidecar's egress gap"
        );
    }
}

#[test]
fn rendered_egress_gateway_overlay_forces_crm_egress_through_the_gateway() {
    let docs = rendered("kubernetes/overlays/egress-gateway");
    let crm_pod = &object(&docs, "Deployment", "crm")["spec"]["template"]["spec"];
    let crm = &crm_pod["containers"][0];
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        assert_eq!(env_of(crm, var), "http://rempart-egress:3128", "{var}");
    }
    // The CRM pods may reach DNS and the gateway, nothing else.
    let np = object(&docs, "NetworkPolicy", "crm");
    let egress = np["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 2, "{egress:?}");
    assert!(!np["spec"]["egress"].to_string().contains("ipBlock"));
    assert_eq!(
        egress[1]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "rempart-egress"
    );
    assert_eq!(egress[1]["ports"][0]["port"], 3128);

    // The gateway: Service on 3128 to hardened, probed rempart pods whose
    // egress listener is on that port, on the pod IP, with no ingress proxy.
    let gw_toml = toml_file(&deploy(
        "kubernetes/overlays/egress-gateway/rempart-gateway.toml",
    ));
    assert_eq!(
        gw_toml["egress"]["listen"].as_str().unwrap(),
        "0.0.0.0:3128"
    );
    assert!(
        !gw_toml.contains_key("upstream"),
        "the gateway has no ingress side"
    );
    let svc = object(&docs, "Service", "rempart-egress");
    assert_eq!(svc["spec"]["ports"][0]["port"], 3128);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "proxy");
    let gw = object(&docs, "Deployment", "rempart-egress");
    let c = &gw["spec"]["template"]["spec"]["containers"][0];
    assert_hardened_rempart(c, "gateway");
    // Shutdown budget: preStop while the endpoint removal propagates, then
    // rempart's longest drain, within the grace period.
    let gw_pod = &gw["spec"]["template"]["spec"];
    let grace = gw_pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    let drain = rempart_max_drain_secs(&gw_toml);
    assert!(
        grace >= pre_stop + drain,
        "gateway terminationGracePeriodSeconds {grace} < preStop {pre_stop} + rempart's longest drain {drain}"
    );
    let proxy_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "proxy")
        .unwrap();
    assert_eq!(proxy_port["containerPort"], 3128);
    let cfg = object(&docs, "ConfigMap", "rempart-gateway-config-");
    assert_eq!(
        cfg["data"]["rempart.toml"].as_str().unwrap(),
        read(&deploy(
            "kubernetes/overlays/egress-gateway/rempart-gateway.toml"
        ))
    );
    let mounted = gw["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(mounted.contains(cfg["metadata"]["name"].as_str().unwrap()));
    assert_eq!(
        object(&docs, "PodDisruptionBudget", "rempart-egress")["spec"]["minAvailable"],
        1
    );
    // Only the gateway pods may reach the internet.
    let gw_np = object(&docs, "NetworkPolicy", "rempart-egress");
    assert!(gw_np["spec"]["egress"].to_string().contains("0.0.0.0/0"));
}

// --------------------------------------------------------------- systemd

#[test]
fn systemd_unit_is_hardened_and_passes_systemd_analyze_verify() {
    let unit_text = read(&deploy("systemd/rempart.service"));
    let directives: BTreeMap<String, String> = unit_text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("SystemCallFilter", "@system-service"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("KillSignal", "SIGTERM"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(directives.get(key).map(String::as_str), Some(want), "{key}");
    }
    assert!(directives["StateDirectory"].contains("rempart/audit"));
    // The stop timeout outlasts the drain of the config it runs.
    let cfg = toml_file(&deploy("systemd/rempart.toml"));
    let stop = humantime::parse_duration(&directives["TimeoutStopSec"]).unwrap();
    let drain = rempart_max_drain_secs(&cfg);
    assert!(
        stop.as_secs() > drain,
        "TimeoutStopSec {stop:?} <= rempart's longest drain {drain}s"
    );
    assert!(cfg["audit"]["path"]
        .as_str()
        .unwrap()
        .starts_with("/var/lib/rempart/"));

    // verify needs the executables to exist: point them at the built binary.
    let tmp = tempfile::tempdir().unwrap();
    let unit = tmp.path().join("rempart.service");
    std::fs::write(
        &unit,
        unit_text.replace("/usr/local/bin/rempart", common::bin()),
    )
    .unwrap();
    let analyze = tool("systemd-analyze", "apt-get install systemd");
    let out = Command::new(&analyze)
        .args(["verify", "--man=no", unit.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // And it does complain about a bad setting (a misspelt key).
    std::fs::write(
        &unit,
        unit_text
            .replace("/usr/local/bin/rempart", common::bin())
            .replace("ProtectSystem=strict", "ProtectSystm=strict"),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no", unit.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectSystm"));
}

// ------------------------------------------------------------ prometheus

fn promtool() -> PathBuf {
    tool("promtool", "apt-get install prometheus (.ci/run does)")
}

#[test]
fn prometheus_config_and_rules_pass_promtool_check_and_unit_tests() {
    let dir = deploy("prometheus");
    run_ok(
        Command::new(promtool())
            .current_dir(&dir)
            .args(["check", "config", "prometheus.yml"]),
    );
    let out =
        run_ok(
            Command::new(promtool())
                .current_dir(&dir)
                .args(["check", "rules", "rules.yml"]),
        );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));
    let out = run_ok(Command::new(promtool()).current_dir(&dir).args([
        "test",
        "rules",
        "rules_test.yml",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));
    // Every alert of rules.yml has a test case where it fires and one where
    // it stays quiet (promtool only checks the cases that exist).
    let tests = yaml_file(&dir.join("rules_test.yml"));
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
    {
        let name = case["alertname"].as_str().unwrap().to_string();
        if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
            firing.insert(name);
        } else {
            quiet.insert(name);
        }
    }
    for alert in rule_alert_names() {
        assert!(
            firing.contains(&alert),
            "{alert} has no firing case in rules_test.yml"
        );
        assert!(
            quiet.contains(&alert),
            "{alert} has no non-firing case in rules_test.yml"
        );
    }
    // The Kubernetes scrape job: Debian's promtool rejects
    // kubernetes_sd_configs (built without it), so check everything else
    // of the job with promtool, the discovery swapped for a file; what its
    // relabelling keeps is checked by a real Prometheus below.
    let (_tmp, swapped) = kubernetes_job_with_file_discovery(Path::new("targets.json"));
    run_ok(Command::new(promtool()).args(["check", "config", swapped.to_str().unwrap()]));
}

/// scrape-kubernetes.yml with its `kubernetes_sd_configs` (role pod)
/// replaced by a `file_sd_configs` reading `targets`: the same job and
/// relabelling, runnable by a Prometheus built without Kubernetes discovery.
fn kubernetes_job_with_file_discovery(targets: &Path) -> (tempfile::TempDir, PathBuf) {
    let mut k8s = yaml_file(&deploy("prometheus/scrape-kubernetes.yml"));
    let jobs = k8s["scrape_configs"].as_array_mut().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = jobs[0].as_object_mut().unwrap();
    assert_eq!(job["job_name"], "rempart-kubernetes");
    let sd = job
        .remove("kubernetes_sd_configs")
        .expect("kubernetes_sd_configs");
    assert_eq!(sd, serde_json::json!([{"role": "pod"}]));
    job.insert(
        "file_sd_configs".into(),
        serde_json::json!([{"files": [targets], "refresh_interval": "1s"}]),
    );
    k8s["global"] = serde_json::json!({"scrape_interval": "1s"});
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("prometheus.yml");
    // JSON is YAML.
    std::fs::write(&path, serde_json::to_string_pretty(&k8s).unwrap()).unwrap();
    (tmp, path)
}

fn rules() -> Value {
    yaml_file(&deploy("prometheus/rules.yml"))
}

fn rule_alert_names() -> Vec<String> {
    rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect()
}

fn rule_exprs() -> Vec<String> {
    rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect()
}

/// The dashboard's PromQL: panel targets and templating queries.
fn dashboard_exprs() -> Vec<String> {
    let dash: Value = serde_json::from_str(&read(&deploy("grafana/rempart.json"))).unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

/// Grafana's variables replaced by values PromQL accepts.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    // promtool parses PromQL in rule files: wrap each query in a recording
    // rule (label_values() is Grafana's, not PromQL: its metric is checked
    // by the metric-name test).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs
        .iter()
        .filter(|e| !e.starts_with("label_values("))
        .enumerate()
    {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&grafana_to_promql(e)).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    run_ok(Command::new(promtool()).args(["check", "rules", file.to_str().unwrap()]));
}

/// `name{label op "value", ...}` selectors of rempart metrics in a query:
/// (metric, [(label, op, value)]).
type Selector = (String, Vec<(String, String, String)>);

fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !ident(b[i]) || (i > 0 && ident(b[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && ident(b[i]) {
            i += 1;
        }
        let name = &expr[start..i];
        if !(name.starts_with("rempart_") || name == "up") {
            continue;
        }
        let mut matchers = Vec::new();
        if b.get(i) == Some(&b'{') {
            let end = i + expr[i..].find('}').unwrap();
            for m in expr[i + 1..end]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                let op_at = m.find(['=', '!']).unwrap();
                let label = m[..op_at].trim().to_string();
                let rest = &m[op_at..];
                let op_len =
                    if rest.starts_with("=~") || rest.starts_with("!=") || rest.starts_with("!~") {
                        2
                    } else {
                        1
                    };
                let value = rest[op_len..].trim().trim_matches('"').to_string();
                matchers.push((label, rest[..op_len].to_string(), value));
            }
            i = end + 1;
        }
        out.push((name.to_string(), matchers));
    }
    out
}

/// Samples of a scrape: metric name -> label name -> values seen.
fn scraped(text: &str) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line.as_bytes()[name_end] == b'{' {
            let end = line.rfind('}').unwrap();
            for pair in line[name_end + 1..end]
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair.split_once('=').unwrap();
                labels
                    .entry(k.to_string())
                    .or_default()
                    .insert(v.trim_matches('"').to_string());
            }
        }
    }
    out
}

/// A rempart with every metric family populated: a country and an ASN
/// database (for the GeoIP build-time gauge) placing loopback addresses,
/// an upstream, requests allowed, denied and failed upstream, and egress
/// calls refused for going outside the EU and to a US operator in the EU
/// (for the per-reason and per-destination counters).
async fn populated_rempart() -> (Rempart, Upstream, tempfile::TempDir) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (country, asn) = common::loopback_geo::write(dir.path(), &[]);
    let toml = format!(
        // Port 0 on the ingress address would be refused as the same
        // listener: the egress proxy takes another loopback address.
        "[upstream]\nurl = \"{}\"\n[egress]\nlisten = \"127.0.0.9:0\"\n{}",
        up.url(),
        common::loopback_geo::geo_toml(&country, &asn),
    );
    let rp = Rempart::with_config(dir.path(), "rempart.toml", &toml).unwrap();
    assert_eq!(get(&rp.url("/api/contacts/1")).await.status, 200);
    assert_eq!(
        request("TRACE", &rp.url("/api/contacts"), &[]).await.status,
        403
    );
    let proxy = rp.egress.expect("egress listener");
    for target in [
        common::loopback_geo::US,
        common::loopback_geo::US_OPERATOR_IN_EU,
    ] {
        assert_eq!(egress_connect(proxy, &format!("{target}:443")).await, 403);
    }
    // The geo files must outlive rempart (it watches them for reloads).
    (rp, up, dir)
}

/// Asks the egress proxy for a tunnel; returns the status it answered.
async fn egress_connect(proxy: std::net::SocketAddr, target: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("egress proxy answered in time")
        .unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_and_dashboard_use_only_metrics_and_labels_rempart_exports() {
    let (rp, _up, _geo) = populated_rempart().await;
    let text = rp.metrics().await;
    let exported = scraped(&text);
    // Families without any series are not rendered: make sure the ones the
    // traffic above creates are there, so a miss below is a real miss.
    for name in [
        "rempart_geo_database_build_timestamp_seconds",
        "rempart_policy_revision_info",
        "rempart_requests_total",
        "rempart_decision_reasons_total",
        "rempart_egress_decisions_total",
    ] {
        assert!(exported.contains_key(name), "{name} not in\n{text}");
    }

    let mut used = 0;
    for (source, exprs) in [
        ("rules.yml", rule_exprs()),
        ("grafana/rempart.json", dashboard_exprs()),
    ] {
        for expr in exprs {
            for (metric, matchers) in selectors(&expr) {
                used += 1;
                if metric == "up" {
                    // Made by Prometheus for every target, not by rempart.
                    continue;
                }
                let labels = exported.get(&metric).unwrap_or_else(|| {
                    panic!("{source}: {metric} is not exported by rempart (query: {expr})")
                });
                for (label, op, value) in matchers {
                    // Target labels added by Prometheus.
                    if label == "instance" || label == "job" {
                        continue;
                    }
                    let values = labels.get(&label).unwrap_or_else(|| {
                        panic!("{source}: {metric} has no label {label} (query: {expr})")
                    });
                    if op == "=" {
                        assert!(
                            values.contains(&value),
                            "{source}: {metric}{{{label}=\"{value}\"}} never exported; values: {values:?}"
                        );
                    } else if op == "=~" {
                        for alt in value
                            .split('|')
                            .filter(|a| a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                        {
                            // Alternatives are documented values; `as_country`
                            // needs a third database, the others are seen here.
                            if alt != "as_country" {
                                assert!(
                                    values.contains(alt),
                                    "{source}: {metric}{{{label}=~\"{alt}\"}} never exported; values: {values:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        used > 40,
        "only {used} selectors found: is the parser right?"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn prometheus_query(port: u16, query: &str) -> Value {
    let q: String =
        percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let r = get(&format!("http://127.0.0.1:{port}/api/v1/query?query={q}")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_rempart_and_evaluates_the_rules() {
    let prometheus = tool("prometheus", "apt-get install prometheus (.ci/run does)");
    let (rp, _up, _geo) = populated_rempart().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: rempart\n    static_configs:\n      - targets: [\"{}\"]\n",
            deploy("prometheus/rules.yml").display(),
            rp.admin
        ),
    )
    .unwrap();
    let port = common::unused_port();
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let _server = KillOnDrop(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_text =
        || std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default();

    // Wait (bounded) for a scrape that recorded the allowed request.
    let query = "rempart_requests_total{job=\"rempart\",direction=\"ingress\",outcome=\"allowed\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let ready = common::client()
            .get(format!("http://127.0.0.1:{port}/-/ready").parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            let v = prometheus_query(port, query).await;
            if let Some(sample) = v["data"]["result"].as_array().and_then(|a| a.first()) {
                break sample["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no scrape in 60 s; log:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(value >= 1.0, "recorded {value}");
    let denied = prometheus_query(
        port,
        "rempart_requests_total{outcome=\"denied\",direction=\"ingress\"}",
    )
    .await;
    assert_eq!(denied["data"]["result"][0]["value"][1], "1");
    let up = prometheus_query(port, "up{job=\"rempart\"}").await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1");

    // The alerting rules evaluate against the real series without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(&format!("http://127.0.0.1:{port}/api/v1/rules")).await;
        let rules: Vec<Value> = r.json()["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok");
        if evaluated {
            assert_eq!(rules.len(), rule_exprs().len());
            // Nothing is wrong with this rempart, so nothing fires (the old
            // MaxMind test database can only be pending: `for: 1h`).
            let firing: Vec<&Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
            assert!(firing.is_empty(), "firing: {firing:?}");
            break;
        }
        let errors: Vec<&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(errors.is_empty(), "rules failing: {errors:?}");
        assert!(
            Instant::now() < deadline,
            "rules not evaluated in 30 s: {rules:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts a real Prometheus on `config`; returns it and its port once
/// ready.
async fn start_prometheus(config: &Path, data: &Path) -> (KillOnDrop, u16) {
    let prometheus = tool("prometheus", "apt-get install prometheus (.ci/run does)");
    let port = common::unused_port();
    let log = std::fs::File::create(data.join("prometheus.log")).unwrap();
    let server = KillOnDrop(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = common::client()
            .get(format!("http://127.0.0.1:{port}/-/ready").parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return (server, port);
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus not ready in 60 s; log:\n{}",
            std::fs::read_to_string(data.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The job of scrape-kubernetes.yml, run by a real Prometheus on targets
/// carrying the labels Kubernetes pod discovery gives them (one target per
/// declared container port): it scrapes rempart's admin port of annotated
/// pods only, and labels the series with namespace, pod and app.
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_scrape_job_keeps_only_the_admin_port_of_annotated_pods() {
    let (rp, _up, _geo) = populated_rempart().await;
    let tmp = tempfile::tempdir().unwrap();
    let targets = tmp.path().join("targets.json");
    let pod = |address: String, port_name: &str, pod: &str, annotated: bool| {
        let mut labels = serde_json::json!({
            "__meta_kubernetes_namespace": "crm",
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "crm",
        });
        if annotated {
            labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "true".into();
            labels["__meta_kubernetes_pod_annotation_prometheus_io_port"] = "9090".into();
        }
        serde_json::json!({"targets": [address], "labels": labels})
    };
    let closed = format!("127.0.0.1:{}", common::unused_port());
    std::fs::write(
        &targets,
        serde_json::json!([
            // The sidecar pod: rempart's admin port (scraped), rempart's
            // proxy ports and the CRM's port (not).
            pod(rp.admin.to_string(), "admin", "crm-7d9f-abcde", true),
            pod(closed.clone(), "http", "crm-7d9f-abcde", true),
            pod(closed.clone(), "egress", "crm-7d9f-abcde", true),
            // A pod that did not ask to be scraped.
            pod(closed, "admin", "other-1", false),
        ])
        .to_string(),
    )
    .unwrap();
    let (_tmp, config) = kubernetes_job_with_file_discovery(&targets);
    let (_server, port) = start_prometheus(&config, tmp.path()).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let (active, dropped) = loop {
        let r = get(&format!("http://127.0.0.1:{port}/api/v1/targets")).await;
        let data = r.json()["data"].clone();
        let active = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let dropped = data["droppedTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if active.len() + dropped.len() == 4 && active.iter().all(|t| t["health"] == "up") {
            break (active, dropped);
        }
        assert!(
            Instant::now() < deadline,
            "targets not scraped in 60 s: {data:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(active.len(), 1, "{active:#?}");
    assert_eq!(dropped.len(), 3, "{dropped:#?}");
    let labels = &active[0]["labels"];
    assert_eq!(labels["job"], "rempart-kubernetes");
    assert_eq!(labels["instance"], rp.admin.to_string());
    assert_eq!(
        (&labels["namespace"], &labels["pod"], &labels["app"]),
        (&"crm".into(), &"crm-7d9f-abcde".into(), &"crm".into())
    );
    assert_eq!(
        active[0]["scrapeUrl"],
        format!("http://{}/metrics", rp.admin)
    );
    // And the series carry them.
    let q = prometheus_query(
        port,
        "rempart_requests_total{job=\"rempart-kubernetes\",namespace=\"crm\",pod=\"crm-7d9f-abcde\"}",
    )
    .await;
    assert!(!q["data"]["result"].as_array().unwrap().is_empty(), "{q:#}");
}
