//! Verifying a rebuilt store against the live fleet's merged answers.

use std::{sync::Arc, time::Duration};

use prometheus_client::registry::Registry;

use crate::{
    config::Config,
    events::Metrics,
    query::{gather, merge_windows, QueryRequest},
    store::{SystemClock, WindowRow},
    writer::Writer,
    Error,
};

/// One difference between the rebuilt store and the live fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub series: String,
    pub field: String,
    pub resolution_secs: u32,
    pub start_ns: i64,
    /// (count, sum, min, max) in the rebuilt store, if present.
    pub rebuilt: Option<(u64, f64, f64, f64)>,
    /// The same from the fleet's merged answer, if present.
    pub live: Option<(u64, f64, f64, f64)>,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Windows compared (union of both sides), per resolution.
    pub windows: usize,
    /// Nodes of the live fleet that answered fully.
    pub nodes: Vec<String>,
    /// Differences (all of them).
    pub differences: Vec<Difference>,
}

fn same(a: &WindowRow, b: &WindowRow) -> bool {
    let (x, y) = (&a.agg, &b.agg);
    let close = |p: f64, q: f64| (p - q).abs() <= 1e-9 * p.abs().max(q.abs()).max(1.0);
    x.count == y.count
        && close(x.sum, y.sum)
        && x.min == y.min
        && x.max == y.max
        && x.first_ts_ns == y.first_ts_ns
        && x.first == y.first
        && x.last_ts_ns == y.last_ts_ns
        && x.last == y.last
}

/// Compares the store at `worker.store.dir` with the live fleet's merged
/// windows over `[from_ns, to_ns)` at every configured resolution.
///
/// Sums are compared with a relative tolerance of 1e-9 (floating-point sums
/// depend on the order of addition, which differs between one store and
/// merged partials); everything else exactly.
///
/// # Errors
/// Store or NATS errors, or fewer than `expect_nodes` nodes answering fully.
pub async fn verify(
    worker: &Config,
    from_ns: i64,
    to_ns: i64,
    expect_nodes: Option<usize>,
    timeout: Duration,
) -> Result<Verification, Error> {
    let metrics = Metrics::register(&mut Registry::default());
    let (writer, writer_thread) =
        Writer::start(worker.store.clone(), Arc::new(SystemClock), metrics)?;
    let nats =
        windrow_jetstream::connect(&worker.nats, "windrow-replay-verify", |_| async {}).await?;
    let mut out = Verification::default();
    let result = async {
        for &res in &worker.store.resolutions_secs {
            let step = i64::from(res) * 1_000_000_000;
            let request = QueryRequest {
                series: "*".into(),
                field: None,
                resolution_secs: res,
                from_ns: from_ns.div_euclid(step) * step,
                to_ns,
                latest: false,
            };
            let live = gather(
                &nats,
                &worker.query_subject,
                &request,
                expect_nodes,
                timeout,
            )
            .await
            .map_err(|e| Error::Replay(format!("query plane: {e}")))?;
            if let Some(n) = expect_nodes {
                if live.complete.len() < n {
                    return Err(Error::Replay(format!(
                        "expected {n} node(s) to answer, {} did fully",
                        live.complete.len()
                    )));
                }
            }
            if !live.errors.is_empty() {
                return Err(Error::Replay(format!("node errors: {:?}", live.errors)));
            }
            out.nodes = live.complete.clone();
            let rebuilt = match writer.query(request).await {
                Ok(Ok((w, _))) => merge_windows(w),
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(Error::Replay(e.to_string())),
            };
            let key = |w: &WindowRow| (w.series.clone(), w.field.clone(), w.start_ns);
            let live: std::collections::BTreeMap<_, _> =
                live.windows.into_iter().map(|w| (key(&w), w)).collect();
            let rebuilt: std::collections::BTreeMap<_, _> =
                rebuilt.into_iter().map(|w| (key(&w), w)).collect();
            let keys: std::collections::BTreeSet<_> =
                live.keys().chain(rebuilt.keys()).cloned().collect();
            out.windows += keys.len();
            let brief = |w: &WindowRow| (w.agg.count, w.agg.sum, w.agg.min, w.agg.max);
            for k in keys {
                let (r, l) = (rebuilt.get(&k), live.get(&k));
                let equal = matches!((r, l), (Some(a), Some(b)) if same(a, b));
                if !equal {
                    out.differences.push(Difference {
                        series: k.0.clone(),
                        field: k.1.clone(),
                        resolution_secs: res,
                        start_ns: k.2,
                        rebuilt: r.map(brief),
                        live: l.map(brief),
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    result.map(|()| out)
}
