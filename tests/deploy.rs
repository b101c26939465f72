//! The files of `deploy/`, checked by the real tools (SPEC §8.4):
//! systemd-analyze, promtool and kubernetes-validate, plus the wiring the
//! tools cannot see (CRD manifests, names shared between files) and the
//! metric names used by the dashboard and the rules.
//!
//! The tools come from `.ci/setup-deploy`; a missing tool fails the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

const SETUP_HINT: &str = "run `.ci/setup-deploy` to install the deploy tools";

/// Kubernetes versions the core manifests must validate against: the
/// oldest and newest that kubernetes-validate bundles and we support.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The metric names of SPEC §8.3 (fixed: dashboards and alerts use them).
const METRICS: &[&str] = &[
    "pqmig_jobs_claimed_total",
    "pqmig_jobs_finished_total",
    "pqmig_items_processed_total",
    "pqmig_item_failures_total",
    "pqmig_batch_duration_seconds",
    "pqmig_jobs_running",
    "pqmig_worker_slots",
    "pqmig_queue_jobs",
    "pqmig_queue_oldest_pending_age_seconds",
    "pqmig_leases_reclaimed_total",
    "pqmig_leases_lost_total",
    "pqmig_claim_duration_seconds",
    "pqmig_db_pool_connections",
    "pqmig_listener_connected",
    "pqmig_exposed_items",
    "pqmig_build_info",
    "pqmig_inventory_last_success_timestamp_seconds",
    "pqmig_throttled_seconds_total",
    "pqmig_throttle_active",
    "pqmig_maintenance_deleted_jobs_total",
    "pqmig_job_duration_seconds",
    "pqmig_job_wait_seconds",
    "pqmig_batch_retries_total",
    "pqmig_heartbeat_failures_total",
    "pqmig_items_remaining",
    "pqmig_attestations_total",
    "pqmig_key_provider_requests_total",
    "pqmig_key_provider_request_seconds",
];
const HISTOGRAMS: &[&str] = &[
    "pqmig_batch_duration_seconds",
    "pqmig_claim_duration_seconds",
    "pqmig_job_duration_seconds",
    "pqmig_job_wait_seconds",
    "pqmig_key_provider_request_seconds",
];

/// The image `deploy/image/build` tags by default.
const IMAGE: &str = concat!("pqmig:", env!("CARGO_PKG_VERSION"));

/// The default `worker.shutdown_timeout` (SPEC §8.2).
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Runs `program` in the repository root; a tool that cannot be started
/// fails the test with the setup hint.
fn run_tool(program: impl AsRef<Path>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {SETUP_HINT}", program.display()))
}

/// A program of the repository's virtualenv (`.venv`, made by setup-deploy).
fn venv_tool(name: &str) -> PathBuf {
    let path = repo().join(".venv/bin").join(name);
    assert!(path.exists(), "{} is missing; {SETUP_HINT}", path.display());
    path
}

fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        combined(out)
    );
}

/// YAML documents of the given files as JSON values, loaded by PyYAML
/// (a dependency of kubernetes-validate) in the virtualenv.
fn yaml_docs(files: &[&str]) -> Vec<Value> {
    const LOAD: &str = "import json, sys, yaml\n\
        docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d is not None]\n\
        json.dump(docs, sys.stdout)";
    let mut args = vec!["-c", LOAD];
    args.extend_from_slice(files);
    let out = run_tool(venv_tool("python"), &args);
    assert_success(&out, "loading YAML with PyYAML");
    match serde_json::from_slice(&out.stdout).expect("PyYAML output is JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in the manifests"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v}"))
}

/// The unit as `systemd-analyze` may load it here: the binary is not
/// installed, so ExecStart runs /bin/true instead. Nothing else changes; in
/// particular `User=pqmig` need not exist, verify does not resolve it.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let unit = read("deploy/systemd/pqmig.service");
    let mut rewritten = 0;
    let text: Vec<String> = unit
        .lines()
        .map(|line| match line.strip_prefix("ExecStart=/usr/bin/pqmig") {
            Some(rest) => {
                rewritten += 1;
                format!("ExecStart=/bin/true{rest}")
            }
            None => line.to_owned(),
        })
        .collect();
    assert_eq!(rewritten, 1, "expected one ExecStart=/usr/bin/pqmig line");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pqmig.service");
    std::fs::write(&path, text.join("\n") + "\n").expect("write unit copy");
    (dir, path)
}

fn unit_setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_unit_verifies_without_a_word() {
    let (_dir, path) = unit_copy();
    let path = path.to_str().expect("utf-8 path");
    let out = run_tool("systemd-analyze", &["verify", "--man=no", path]);
    assert_success(&out, "systemd-analyze verify");
    // Warnings (unknown keys, bad values) exit 0 but print: they fail too.
    assert_eq!(
        combined(&out),
        "",
        "systemd-analyze verify printed something"
    );
}

#[test]
fn systemd_unit_exposure_is_at_most_2() {
    let (_dir, path) = unit_copy();
    let path = path.to_str().expect("utf-8 path");
    // --threshold counts tenths: 20 is an exposure of 2.0.
    let out = run_tool(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            path,
        ],
    );
    assert_success(&out, "systemd-analyze security --threshold=20");
    let text = combined(&out);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for pqmig.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{text}");
}

#[test]
fn systemd_unit_keeps_the_daemon_contract() {
    let unit = read("deploy/systemd/pqmig.service");
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("KillSignal", "SIGTERM"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "pqmig"),
        ("Group", "pqmig"),
        ("CapabilityBoundingSet", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryMax", "1G"),
        ("TasksMax", "512"),
    ] {
        assert_eq!(unit_setting(&unit, key), [value], "{key}=");
    }
    assert!(
        !unit_setting(&unit, "WatchdogSec").is_empty(),
        "WatchdogSec= is missing"
    );
    let stop = unit_setting(&unit, "TimeoutStopSec");
    let stop = humantime::parse_duration(stop.first().expect("TimeoutStopSec=")).expect("duration");
    assert!(
        stop > DEFAULT_SHUTDOWN_TIMEOUT + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} leaves no room for the {DEFAULT_SHUTDOWN_TIMEOUT:?} drain"
    );
}

#[test]
fn prometheus_rules_pass_promtool_check() {
    let out = run_tool(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
    );
    assert_success(&out, "promtool check rules");
}

#[test]
fn prometheus_rules_pass_their_unit_tests() {
    let out = run_tool(
        "promtool",
        &["test", "rules", "deploy/prometheus/tests.yml"],
    );
    assert_success(&out, "promtool test rules");
}

/// The rules of alerts.yml, alerts and recording rules alike.
fn rules() -> Vec<Value> {
    let docs = yaml_docs(&["deploy/prometheus/alerts.yml"]);
    docs[0]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

fn recording_rules(rules: &[Value]) -> BTreeSet<String> {
    rules
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_alert_is_unit_tested_and_documented() {
    let rules = rules();
    let tests = yaml_docs(&["deploy/prometheus/tests.yml"]);
    let tested: BTreeSet<&str> = tests[0]["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .filter_map(|t| t["alert_rule_test"].as_array())
        .flatten()
        .map(|t| str_at(t, "/alertname"))
        .collect();
    let alerts: Vec<&Value> = rules.iter().filter(|r| r.get("alert").is_some()).collect();
    assert!(alerts.len() >= 6, "expected at least 6 alerts");
    for alert in alerts {
        let name = str_at(alert, "/alert");
        assert!(tested.contains(name), "{name} has no promtool unit test");
        for key in ["summary", "description", "runbook"] {
            assert!(
                alert["annotations"][key].is_string(),
                "{name} lacks annotation {key}"
            );
        }
        let severity = str_at(alert, "/labels/severity");
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity}"
        );
    }
}

/// Metric names in `text`: words starting with `pqmig_` or `pqmig:`
/// (recording rules). The bare word `pqmig` (a job or product name) is not
/// a metric.
fn metric_tokens(text: &str) -> Vec<&str> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut tokens = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("pqmig").map(|i| from + i) {
        let len = text[at..].find(|c| !word(c)).unwrap_or(text.len() - at);
        let token = text[at..at + len].trim_end_matches(':');
        let glued = text[..at].chars().next_back().is_some_and(word);
        if !glued && token != "pqmig" {
            tokens.push(token);
        }
        from = at + len;
    }
    tokens
}

fn is_known_metric(name: &str, records: &BTreeSet<String>) -> bool {
    METRICS.contains(&name)
        || records.contains(name)
        || HISTOGRAMS.iter().any(|h| {
            name.strip_prefix(h)
                .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        })
}

#[test]
fn metric_tokens_are_found_in_promql_and_prose() {
    let text = "sum(rate(pqmig_items_processed_total{job=\"pqmig\"}[5m])) \
        pqmig:items_processed:rate5m, pqmig_build_info: one row; xpqmig_no";
    assert_eq!(
        metric_tokens(text),
        [
            "pqmig_items_processed_total",
            "pqmig:items_processed:rate5m",
            "pqmig_build_info"
        ]
    );
}

#[test]
fn alert_and_recording_expressions_use_only_known_metrics() {
    let rules = rules();
    let records = recording_rules(&rules);
    assert!(
        records.iter().all(|r| r.starts_with("pqmig:")),
        "{records:?}"
    );
    for rule in &rules {
        let expr = str_at(rule, "/expr");
        for token in metric_tokens(expr) {
            assert!(
                is_known_metric(token, &records),
                "unknown metric {token} in: {expr}"
            );
        }
    }
}

fn strings_of(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| strings_of(i, out)),
        Value::Object(map) => map.values().for_each(|i| strings_of(i, out)),
        _ => {}
    }
}

fn panels_of(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in v["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panels_of(panel));
    }
    out
}

#[test]
fn grafana_dashboard_uses_the_datasource_variable_and_known_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/pqmig.json")).expect("dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );

    let mut exprs = Vec::new();
    for panel in panels_of(&dashboard)
        .into_iter()
        .filter(|p| p["type"] != "row")
    {
        let title = str_at(panel, "/title");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title}"
            );
            exprs.push(str_at(target, "/expr").to_owned());
        }
    }
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());

    // Titles, descriptions and variable queries name metrics too.
    let records = recording_rules(&rules());
    let mut strings = Vec::new();
    strings_of(&dashboard, &mut strings);
    let mut used = BTreeSet::new();
    for s in &strings {
        for token in metric_tokens(s) {
            assert!(
                is_known_metric(token, &records),
                "unknown metric {token} in: {s}"
            );
            used.insert(token.to_owned());
        }
    }
    let unused: Vec<&&str> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    assert!(
        unused.is_empty(),
        "the dashboard shows nothing of {unused:?}"
    );
}

#[test]
fn kubernetes_core_manifests_pass_strict_schema_validation() {
    let validate = venv_tool("kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let out = run_tool(
            &validate,
            &[
                "--strict",
                "--quiet",
                "--kubernetes-version",
                version,
                "deploy/kubernetes/deployment.yaml",
                "deploy/kubernetes/pdb.yaml",
                "deploy/kubernetes/configmap.yaml",
                "deploy/kubernetes/secret.example.yaml",
                "deploy/kubernetes/service.yaml",
                "deploy/kubernetes/networkpolicy.yaml",
            ],
        );
        assert_success(&out, &format!("kubernetes-validate for {version}"));
        // An unknown kind or version is only a warning: fail on it too.
        assert_eq!(
            combined(&out),
            "",
            "kubernetes-validate for {version} printed something"
        );
    }
}

const MANIFESTS: &[&str] = &[
    "deploy/kubernetes/deployment.yaml",
    "deploy/kubernetes/pdb.yaml",
    "deploy/kubernetes/configmap.yaml",
    "deploy/kubernetes/secret.example.yaml",
    "deploy/kubernetes/service.yaml",
    "deploy/kubernetes/servicemonitor.yaml",
    "deploy/kubernetes/keda-scaledobject.yaml",
    "deploy/kubernetes/networkpolicy.yaml",
];

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("env {name} is not set"))
}

#[test]
fn kubernetes_manifests_are_wired_together() {
    let docs = yaml_docs(MANIFESTS);
    let deployment = find_kind(&docs, "Deployment");
    let name = str_at(deployment, "/metadata/name");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert!(
        deployment["spec"]["replicas"].as_u64() >= Some(2),
        "several replicas"
    );
    assert_eq!(container["args"], serde_json::json!(["run"]));
    // The name and tag deploy/image/build gives the image by default.
    assert_eq!(container["image"], IMAGE);
    assert_eq!(
        env_value(container, "PQMIG_METRICS_ADDR")["value"],
        "0.0.0.0:9464"
    );
    assert_eq!(env_value(container, "PQMIG_LOG_FORMAT")["value"], "json");
    let db_secret = &env_value(container, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    assert_eq!(container["ports"][0]["name"], "metrics");
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // The keyring Secret is mounted as is (root, group fsGroup, 0440: the
    // rule pqmig shares with PostgreSQL's ssl_key_file accepts it), where
    // PQMIG_KEYRING points, without subPath so a rotation reaches it.
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(pod.get("initContainers").is_none(), "no keyring copy");
    let keyring = env_value(container, "PQMIG_KEYRING")["value"]
        .as_str()
        .expect("PQMIG_KEYRING");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| keyring.starts_with(&format!("{}/", str_at(m, "/mountPath"))))
        .expect("a mount holding the keyring");
    assert!(mount.get("subPath").is_none(), "{mount}");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the keyring volume");
    assert_eq!(volume["secret"]["defaultMode"], 0o440, "{volume}");
    assert!(
        pod["securityContext"]["fsGroup"].is_u64(),
        "group read needs fsGroup"
    );
    let file = keyring.rsplit('/').next().expect("file name");
    assert_eq!(volume["secret"]["items"][0]["path"], file);

    // The drain (shutdown_timeout of the ConfigMap's pqmig.toml) ends
    // before Kubernetes kills the pod.
    let configmap = find_kind(&docs, "ConfigMap");
    let config: toml::Table =
        toml::from_str(str_at(configmap, "/data/pqmig.toml")).expect("pqmig.toml is TOML");
    let shutdown = config["worker"]["shutdown_timeout"]
        .as_str()
        .expect("shutdown_timeout");
    let shutdown = humantime::parse_duration(shutdown).expect("duration");
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(Duration::from_secs(grace) > shutdown + Duration::from_secs(5));

    // Secrets referenced by the Deployment and KEDA exist in the example.
    let secrets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Secret").collect();
    let has_secret_key = |secret: &str, key: &str| {
        secrets
            .iter()
            .any(|s| s["metadata"]["name"] == secret && s["stringData"].get(key).is_some())
    };
    assert!(has_secret_key(
        str_at(db_secret, "/name"),
        str_at(db_secret, "/key")
    ));

    // The ServiceMonitor scrapes the Service's "metrics" port, which
    // selects the Deployment's pods.
    let service = find_kind(&docs, "Service");
    let monitor = find_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    let selects = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
    };
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert!(selects(&service["spec"]["selector"], pod_labels));
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let pdb = find_kind(&docs, "PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    // The NetworkPolicy covers these pods: in on the metrics port only,
    // out to PostgreSQL and DNS only.
    let policy = find_kind(&docs, "NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    let egress_ports: Vec<&Value> = policy["spec"]["egress"]
        .as_array()
        .expect("egress")
        .iter()
        .flat_map(|e| e["ports"].as_array().expect("ports"))
        .map(|p| &p["port"])
        .collect();
    assert_eq!(
        egress_ports,
        [
            &serde_json::json!(5432),
            &serde_json::json!(53),
            &serde_json::json!(53)
        ]
    );

    // KEDA scales this Deployment on the job queue, one target per worker slot.
    let scaled = find_kind(&docs, "ScaledObject");
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(str_at(scaled, "/spec/scaleTargetRef/name"), name);
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "postgresql");
    let query = str_at(trigger, "/metadata/query");
    assert!(
        query.contains("pq_migration_jobs") && query.contains("'pending'"),
        "{query}"
    );
    let concurrency = config["worker"]["concurrency"]
        .as_integer()
        .expect("concurrency");
    assert_eq!(
        str_at(trigger, "/metadata/targetQueryValue"),
        concurrency.to_string()
    );
    let auth = find_kind(&docs, "TriggerAuthentication");
    assert_eq!(auth["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(
        trigger["authenticationRef"]["name"],
        auth["metadata"]["name"]
    );
    let secret_ref = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(secret_ref["parameter"], "connection");
    assert!(has_secret_key(
        str_at(secret_ref, "/name"),
        str_at(secret_ref, "/key")
    ));
}

#[test]
fn kustomization_lists_existing_manifests() {
    let docs = yaml_docs(&["deploy/kubernetes/kustomization.yaml"]);
    let (name, tag) = IMAGE.split_once(':').expect("name:tag");
    assert_eq!(
        docs[0]["images"],
        serde_json::json!([{"name": name, "newTag": tag}]),
        "kustomize's image is not the one deploy/image/build tags"
    );
    let resources = docs[0]["resources"].as_array().expect("resources");
    assert!(!resources.is_empty());
    for resource in resources {
        let file = resource.as_str().expect("resource path");
        assert!(
            repo().join("deploy/kubernetes").join(file).is_file(),
            "{file} does not exist"
        );
    }
}
