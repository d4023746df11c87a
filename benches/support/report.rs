//! Numbers and machine facts for the Markdown reports.

use std::process::Command;

use windrow_harness::require_binary;

/// `1234567` → `1,234,567`.
pub fn group(v: i64) -> String {
    let digits: Vec<char> = v.unsigned_abs().to_string().chars().collect();
    let groups: Vec<String> = digits
        .rchunks(3)
        .rev()
        .map(|g| g.iter().collect())
        .collect();
    let sign = if v < 0 { "-" } else { "" };
    format!("{sign}{}", groups.join(","))
}

/// A rate in messages per second, rounded and grouped.
pub fn rate_text(r: f64) -> String {
    group(r.round() as i64)
}

/// The median of `v`; 0 for none, so that a report row never fails.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Sums the samples of metric `name` (all label sets) in a Prometheus text exposition.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The cumulative count of histogram `name`'s bucket `le` (e.g. `"0.1"`);
/// NaN, and a warning (once), if the exposition has no such bucket.
pub fn bucket(body: &str, name: &str, le: &str) -> f64 {
    let label = format!("le=\"{le}\"");
    let counts: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .collect();
    if counts.is_empty() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| eprintln!("[bench] no bucket {label} of {name} in /metrics"));
        return f64::NAN;
    }
    counts.iter().sum()
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The first line containing `needle` of what `bin arg` prints on stdout or
/// stderr, e.g. its version: `mosquitto -h` prints it among many help lines
/// (and exits with 3), `nats-server --version` prints only it.
///
/// # Panics
/// If `bin` is not installed, with the command that installs it.
pub fn version_line(bin: &str, arg: &str, needle: &str) -> String {
    let path = require_binary(bin);
    match Command::new(&path).arg(arg).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or("unknown version")
                .trim()
                .to_owned()
        }
        Err(e) => format!("{bin}: {e}"),
    }
}
