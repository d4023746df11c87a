//! Head sampling and W3C trace-context propagation into NATS headers.
//!
//! The bridge decides per message whether to trace, before any span exists: an
//! untraced message costs one atomic increment, so tracing at a low ratio does
//! not cut throughput, and a traced message's `traceparent` lets the workers
//! continue the trace.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Traces every n-th message (deterministic, so the ratio holds exactly).
#[derive(Debug)]
pub struct Sampler {
    every: u64,
    seen: AtomicU64,
}

impl Sampler {
    /// A sampler keeping `ratio` (0 to 1) of messages.
    pub fn new(ratio: f64) -> Self {
        let every = if ratio <= 0.0 {
            0
        } else {
            (1.0 / ratio.min(1.0)).round().max(1.0) as u64
        };
        Self {
            every,
            seen: AtomicU64::new(0),
        }
    }

    /// Whether the next message is traced.
    pub fn sample(&self) -> bool {
        self.every != 0
            && self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Writes `span`'s context as `traceparent` (and `tracestate`) into `headers`.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_keeps_the_ratio() {
        let s = Sampler::new(0.01);
        let kept = (0..10_000).filter(|_| s.sample()).count();
        assert_eq!(kept, 100);
        let off = Sampler::new(0.0);
        assert!(!(0..100).any(|_| off.sample()));
        let all = Sampler::new(1.0);
        assert!((0..100).all(|_| all.sample()));
    }
}
