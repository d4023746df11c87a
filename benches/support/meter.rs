//! Counting what measuring clients in the benchmark process receive.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

/// Message count and first/last arrival, updated by measuring clients on any thread.
///
/// Times are nanoseconds since the meter was made, so that they fit atomics
/// and the hot path takes no lock.
pub struct Meter {
    base: Instant,
    count: AtomicU64,
    /// `u64::MAX` until the first hit.
    first: AtomicU64,
    last: AtomicU64,
}

impl Meter {
    /// A meter whose clock starts now.
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter {
            base: Instant::now(),
            count: AtomicU64::new(0),
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
        })
    }

    /// Records `n` messages arriving now.
    pub fn hit(&self, n: u64) {
        let t = self.base.elapsed().as_nanos() as u64;
        if self.first.load(Relaxed) == u64::MAX {
            self.first.fetch_min(t, Relaxed);
        }
        self.last.fetch_max(t, Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Messages so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// When the meter was made.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// When the first message arrived; `None` before that.
    pub fn first_at(&self) -> Option<Instant> {
        let first = self.first.load(Relaxed);
        (self.count() > 0 && first != u64::MAX).then(|| self.base + Duration::from_nanos(first))
    }

    /// When the last message arrived; `None` before the first.
    pub fn last_at(&self) -> Option<Instant> {
        (self.count() > 0).then(|| self.base + Duration::from_nanos(self.last.load(Relaxed)))
    }

    /// Time from the first to the last message (zero before two arrived).
    pub fn window(&self) -> Duration {
        let first = self.first.load(Relaxed);
        let last = self.last.load(Relaxed);
        Duration::from_nanos(last.saturating_sub(first.min(last)))
    }
}

/// Counts of the NATS client events that mean loss.
#[derive(Default)]
pub struct ClientEvents {
    /// Slow-consumer events: the client's subscription buffer overflowed.
    pub slow_consumer: AtomicU64,
    /// Disconnects from the server.
    pub disconnects: AtomicU64,
}

impl ClientEvents {
    /// (slow-consumer events, disconnects) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.slow_consumer.load(Relaxed),
            self.disconnects.load(Relaxed),
        )
    }
}

/// A NATS client with a subscription buffer of `capacity` messages that counts
/// its loss events into `events`.
///
/// # Panics
/// If it cannot connect to `url`.
pub async fn measuring_client(
    url: &str,
    events: Arc<ClientEvents>,
    capacity: usize,
) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .subscription_capacity(capacity)
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(_) => {
                        events.slow_consumer.fetch_add(1, Relaxed);
                    }
                    async_nats::Event::Disconnected => {
                        events.disconnects.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect a measuring client to {url}: {e}"))
}
