//! The query plane: request and reply messages, a worker's answers, and merging partial windows.
//!
//! Every worker answers on the query subject with its *partial* windows (what it
//! applied itself); the asker merges the partials of all replicas. Replies are
//! split into chunks so that a large answer fits NATS' `max_payload`; the last
//! chunk of a node says `done`, so the asker knows how many nodes answered fully.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    store::{LatestRow, WindowRow},
    window::Aggregate,
    writer::Writer,
    Config,
};

/// Rows per reply chunk: about 150 bytes of JSON each, well under 1 MiB.
pub const ROWS_PER_CHUNK: usize = 2000;

/// A query for windows of series matching a pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRequest {
    /// Exact series, a prefix ending in `*`, or `*`.
    pub series: String,
    /// Only this value field, if given.
    #[serde(default)]
    pub field: Option<String>,
    /// Window resolution, seconds.
    pub resolution_secs: u32,
    /// Windows starting at or after this time (Unix ns).
    pub from_ns: i64,
    /// Windows starting before this time (Unix ns).
    pub to_ns: i64,
    /// Also return the latest value per series and field.
    #[serde(default)]
    pub latest: bool,
}

/// One chunk of one node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryReply {
    /// The answering worker's node id.
    pub node: String,
    /// Chunk number, from 0.
    pub chunk: u32,
    /// True on the node's last chunk.
    pub done: bool,
    /// Partial windows.
    #[serde(default)]
    pub windows: Vec<WindowRow>,
    /// Latest values (on chunk 0 only).
    #[serde(default)]
    pub latest: Vec<LatestRow>,
    /// Nodes whose data the answering node's store already holds: the asker
    /// leaves their partials out of the merge (see `worker.supersedes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<String>,
    /// Set if the node could not answer.
    #[serde(default)]
    pub error: Option<String>,
}

impl QueryReply {
    /// Splits a node's full answer into chunks.
    pub fn chunks(
        node: &str,
        supersedes: &[String],
        windows: Vec<WindowRow>,
        latest: Vec<LatestRow>,
    ) -> Vec<QueryReply> {
        // Taken from the front chunk by chunk (`split_off` there would move
        // the whole rest each time: quadratic in the rows).
        let mut rows = windows.into_iter();
        let mut latest = Some(latest);
        let mut out = Vec::with_capacity(rows.len().div_ceil(ROWS_PER_CHUNK).max(1));
        loop {
            let windows: Vec<WindowRow> = rows.by_ref().take(ROWS_PER_CHUNK).collect();
            let done = rows.len() == 0;
            out.push(QueryReply {
                node: node.to_owned(),
                chunk: out.len() as u32,
                done,
                windows,
                latest: latest.take().unwrap_or_default(),
                supersedes: supersedes.to_vec(),
                error: None,
            });
            if done {
                return out;
            }
        }
    }
}

/// Merges partial windows from any number of nodes into one row per
/// (series, field, resolution, start), sorted.
pub fn merge_windows(parts: impl IntoIterator<Item = WindowRow>) -> Vec<WindowRow> {
    let mut merged: BTreeMap<(String, String, u32, i64), Aggregate> = BTreeMap::new();
    for row in parts {
        merged
            .entry((row.series, row.field, row.resolution_secs, row.start_ns))
            .and_modify(|a| a.merge(&row.agg))
            .or_insert(row.agg);
    }
    merged
        .into_iter()
        .map(
            |((series, field, resolution_secs, start_ns), agg)| WindowRow {
                series,
                field,
                resolution_secs,
                start_ns,
                agg,
            },
        )
        .collect()
}

/// Merges latest values: per (series, field) the newest sample wins.
pub fn merge_latest(parts: impl IntoIterator<Item = LatestRow>) -> Vec<LatestRow> {
    let mut merged: BTreeMap<(String, String), LatestRow> = BTreeMap::new();
    for row in parts {
        let key = (row.series.clone(), row.field.clone());
        match merged.get(&key) {
            Some(cur) if (cur.ts_ns, cur.value.to_bits()) >= (row.ts_ns, row.value.to_bits()) => {}
            _ => {
                merged.insert(key, row);
            }
        }
    }
    merged.into_values().collect()
}

/// What a scatter-gather query collected, merged.
#[derive(Debug, Default)]
pub struct Gathered {
    /// Merged windows.
    pub windows: Vec<WindowRow>,
    /// Merged latest values.
    pub latest: Vec<LatestRow>,
    /// Nodes that sent their last chunk (including superseded ones).
    pub complete: Vec<String>,
    /// Nodes that answered but were left out of the merge because another
    /// node that answered supersedes them.
    pub superseded: Vec<String>,
    /// Nodes that sent some chunks but not the last in time.
    pub incomplete: Vec<String>,
    /// Errors reported by nodes.
    pub errors: Vec<String>,
}

/// Failures of [`gather`] itself (node errors are in [`Gathered::errors`]).
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    /// Subscribing or publishing failed.
    #[error("query over NATS failed: {0}")]
    Nats(String),
    /// A reply was not a [`QueryReply`].
    #[error("undecodable query reply: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends `request` to every worker on `subject` and merges their replies.
///
/// Returns when `expect_nodes` nodes answered fully, or when `timeout` passes.
///
/// # Errors
/// [`GatherError`] if the request cannot be sent or a reply cannot be read.
pub async fn gather(
    nats: &async_nats::Client,
    subject: &str,
    request: &QueryRequest,
    expect_nodes: Option<usize>,
    timeout: std::time::Duration,
) -> Result<Gathered, GatherError> {
    use futures::StreamExt;
    let inbox = nats.new_inbox();
    let mut replies = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| GatherError::Nats(e.to_string()))?;
    nats.publish_with_reply(
        subject.to_owned(),
        inbox,
        serde_json::to_vec(request)?.into(),
    )
    .await
    .map_err(|e| GatherError::Nats(e.to_string()))?;
    nats.flush()
        .await
        .map_err(|e| GatherError::Nats(e.to_string()))?;
    let mut nodes: BTreeMap<String, Answer> = BTreeMap::new();
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(n) = expect_nodes {
            if nodes.values().filter(|a| a.done).count() >= n {
                break;
            }
        }
        let msg = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(m)) => m,
            _ => break,
        };
        let reply: QueryReply = serde_json::from_slice(&msg.payload)?;
        if let Some(e) = reply.error {
            errors.push(format!("{}: {e}", reply.node));
        }
        let answer = nodes.entry(reply.node).or_default();
        answer.done |= reply.done;
        answer.windows.extend(reply.windows);
        answer.latest.extend(reply.latest);
        answer.supersedes.extend(reply.supersedes);
    }
    Ok(Gathered::from_answers(nodes, errors))
}

/// What one node sent.
#[derive(Debug, Default)]
struct Answer {
    done: bool,
    windows: Vec<WindowRow>,
    latest: Vec<LatestRow>,
    supersedes: Vec<String>,
}

impl Gathered {
    /// Merges the answers, leaving out those of superseded nodes.
    ///
    /// A superseding node's store holds everything the nodes it names had
    /// applied, so any set of answers that includes it merges exactly whether
    /// or not they still answer; that is what keeps a store swap exact.
    fn from_answers(nodes: BTreeMap<String, Answer>, errors: Vec<String>) -> Gathered {
        let superseded: std::collections::BTreeSet<&String> = nodes
            .iter()
            .flat_map(|(node, a)| a.supersedes.iter().filter(move |s| *s != node))
            .collect();
        let superseded: Vec<String> = nodes
            .keys()
            .filter(|n| superseded.contains(n))
            .cloned()
            .collect();
        let mut out = Gathered {
            windows: Vec::new(),
            latest: Vec::new(),
            complete: Vec::new(),
            incomplete: Vec::new(),
            superseded,
            errors,
        };
        let (mut windows, mut latest) = (Vec::new(), Vec::new());
        for (node, answer) in nodes {
            if answer.done {
                out.complete.push(node.clone());
            } else {
                out.incomplete.push(node.clone());
            }
            if !out.superseded.contains(&node) {
                windows.extend(answer.windows);
                latest.extend(answer.latest);
            }
        }
        out.windows = merge_windows(windows);
        out.latest = merge_latest(latest);
        out
    }
}

/// Answers every query on the query subject with this node's partial windows.
pub(crate) async fn answer(
    nats: async_nats::Client,
    writer: Writer,
    config: Arc<Config>,
    shutdown: CancellationToken,
) {
    let mut sub = match nats.subscribe(config.query_subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the query subject");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<QueryRequest>(&msg.payload) {
            Err(e) => Err(format!("bad query: {e}")),
            Ok(q) => match writer.query(q).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        // Chunking and encoding a large answer take a while: on a blocking
        // thread, not on the runtime's, which (with the default
        // `worker.threads = 1`) also reads the NATS socket and runs the batches.
        let config = config.clone();
        let bodies = match tokio::task::spawn_blocking(move || reply_bodies(&config, answer)).await
        {
            Ok(bodies) => bodies,
            Err(e) => {
                tracing::error!(error = %e, "encoding a query reply failed");
                continue;
            }
        };
        for body in bodies {
            if let Err(e) = nats.publish(reply.clone(), body).await {
                tracing::warn!(error = %e, "cannot send query reply");
            }
        }
    }
}

/// This node's answer (or why it has none) as encoded reply chunks.
fn reply_bodies(
    config: &Config,
    answer: Result<(Vec<WindowRow>, Vec<LatestRow>), String>,
) -> Vec<bytes::Bytes> {
    let replies = match answer {
        Ok((windows, latest)) => {
            QueryReply::chunks(&config.node_id, &config.supersedes, windows, latest)
        }
        Err(e) => vec![error_reply(&config.node_id, e)],
    };
    replies
        .iter()
        .filter_map(|r| match serde_json::to_vec(r) {
            Ok(body) => Some(body.into()),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode query reply");
                None
            }
        })
        .collect()
}

fn error_reply(node: &str, error: String) -> QueryReply {
    QueryReply {
        node: node.to_owned(),
        chunk: 0,
        done: true,
        windows: Vec::new(),
        latest: Vec::new(),
        supersedes: Vec::new(),
        error: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(series: &str, start: i64, v: f64) -> WindowRow {
        WindowRow {
            series: series.into(),
            field: "v".into(),
            resolution_secs: 1,
            start_ns: start,
            agg: Aggregate::of(start, v),
        }
    }

    #[test]
    fn partials_of_several_nodes_merge_per_window() {
        let merged = merge_windows(vec![
            row("a", 0, 1.0),
            row("b", 0, 5.0),
            row("a", 0, 3.0),
            row("a", 1, 2.0),
        ]);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0].series, "a");
        assert_eq!(merged[0].agg.count, 2);
        assert_eq!(merged[0].agg.sum, 4.0);
        assert_eq!(merged[0].agg.max, 3.0);
    }

    #[test]
    fn answers_are_chunked_and_the_last_chunk_is_done() {
        let rows: Vec<WindowRow> = (0..(ROWS_PER_CHUNK as i64 * 2 + 1))
            .map(|i| row("a", i, 1.0))
            .collect();
        let latest = vec![LatestRow {
            series: "a".into(),
            field: "v".into(),
            ts_ns: 1,
            value: 2.0,
        }];
        let chunks = QueryReply::chunks("n1", &["n0".into()], rows.clone(), latest.clone());
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            chunks
                .iter()
                .map(|c| (c.chunk, c.done, c.windows.len(), c.latest.len()))
                .collect::<Vec<_>>(),
            [
                (0, false, ROWS_PER_CHUNK, 1),
                (1, false, ROWS_PER_CHUNK, 0),
                (2, true, 1, 0)
            ]
        );
        assert_eq!(chunks[0].latest, latest);
        assert!(chunks
            .iter()
            .all(|c| c.node == "n1" && c.supersedes == ["n0"]));
        // In order, each row once.
        let joined: Vec<WindowRow> = chunks.into_iter().flat_map(|c| c.windows).collect();
        assert_eq!(joined, rows);
        // Exactly full chunks: no empty one after them.
        let two: Vec<WindowRow> = rows[..ROWS_PER_CHUNK * 2].to_vec();
        let chunks = QueryReply::chunks("n1", &[], two, vec![]);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[1].done && !chunks[0].done);
        // Nothing: one chunk, done.
        let none = QueryReply::chunks("n1", &[], vec![], vec![]);
        assert_eq!(none.len(), 1);
        assert!(none[0].done && none[0].windows.is_empty());
    }

    fn answer(done: bool, windows: Vec<WindowRow>, supersedes: &[&str]) -> Answer {
        Answer {
            done,
            windows,
            latest: Vec::new(),
            supersedes: supersedes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn superseded_nodes_are_left_out_only_while_their_successor_answers() {
        // Old nodes a and b split the messages; "r" holds all of them.
        let old = || {
            [
                ("a".to_owned(), answer(true, vec![row("s", 0, 1.0)], &[])),
                ("b".to_owned(), answer(true, vec![row("s", 0, 2.0)], &[])),
            ]
        };
        let rebuilt = (
            "r".to_owned(),
            answer(true, vec![row("s", 0, 1.0), row("s", 0, 2.0)], &["a", "b"]),
        );
        let merged = |nodes: Vec<(String, Answer)>| {
            Gathered::from_answers(nodes.into_iter().collect(), Vec::new())
        };

        let before = merged(old().into());
        assert_eq!(before.windows[0].agg.count, 2);
        assert!(before.superseded.is_empty());

        let during = merged(old().into_iter().chain([rebuilt]).collect());
        assert_eq!(during.windows.len(), 1);
        assert_eq!(during.windows[0].agg.count, 2, "not counted twice");
        assert_eq!(during.windows[0].agg.sum, 3.0);
        assert_eq!(during.superseded, ["a", "b"]);
        assert_eq!(during.complete, ["a", "b", "r"]);

        // A node never supersedes itself, and naming an absent node is harmless.
        let alone = merged(vec![(
            "r".to_owned(),
            answer(true, vec![row("s", 0, 3.0)], &["r", "gone"]),
        )]);
        assert_eq!(alone.windows[0].agg.sum, 3.0);
        assert!(alone.superseded.is_empty());
    }
}
