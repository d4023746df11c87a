//! Noticing that this process stood still, so that a jetstream worker does
//! not apply what JetStream has meanwhile given to another replica.
//!
//! A worker frozen outright (SIGSTOP, a frozen cgroup such as `docker pause`,
//! a node that starves it for seconds) sends no in-progress acks. JetStream
//! redelivers what it held to another replica after the ack wait. Woken up,
//! the worker would apply those messages as well, and the merged windows
//! would count them twice. So time is cut into epochs: a watch thread stamps
//! the clock every 100 ms (more often for short limits), and a gap between two stamps longer than
//! the limit, noticed by the thread or by whoever looks first after waking,
//! starts a new epoch. What was received in an earlier epoch is given up: not
//! applied, not acknowledged, not handed back (a negative ack would have the
//! server deliver it once more while the other replica applies it), so that
//! JetStream's redelivery is the only copy that counts.
//!
//! The clock is the monotonic one, which runs on while a process is stopped
//! or a cgroup frozen. A suspended machine whose monotonic clock stands still
//! meanwhile is not noticed.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// The epochs of this process (cheap to clone; the watch thread ends when
/// the last clone is dropped).
#[derive(Clone)]
pub(crate) struct PauseWatch(Arc<Inner>);

struct Inner {
    /// When the clock was last looked at, and the epoch: together, so that
    /// whoever looks after a gap sees the new epoch, not only the one who
    /// noticed it.
    state: Mutex<(Instant, u64)>,
    limit: Duration,
}

impl PauseWatch {
    /// Gaps longer than `limit` start a new epoch.
    pub fn start(limit: Duration) -> Self {
        let watch = Self::unwatched(limit);
        let weak = Arc::downgrade(&watch.0);
        let tick = (limit / 8).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let spawned = std::thread::Builder::new()
            .name("pause-watch".into())
            .spawn(move || {
                while let Some(inner) = weak.upgrade() {
                    let _ = inner.look();
                    drop(inner);
                    std::thread::sleep(tick);
                }
            });
        if let Err(e) = spawned {
            // Pauses are then noticed only by those who look.
            tracing::warn!(error = %e, "cannot start the pause-watch thread");
        }
        watch
    }

    /// Without the watch thread: a gap is whatever passes between two looks.
    fn unwatched(limit: Duration) -> Self {
        PauseWatch(Arc::new(Inner {
            state: Mutex::new((Instant::now(), 0)),
            limit,
        }))
    }

    /// The current epoch, after noticing a pause that has just ended.
    pub fn epoch(&self) -> u64 {
        self.0.look()
    }

    /// A fence for what is received from now on.
    pub fn fence(&self) -> Fence {
        Fence {
            epoch: self.epoch(),
            watch: self.clone(),
        }
    }
}

impl Inner {
    /// The epoch, after a gap since the last look (if any) ended it.
    fn look(&self) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let gap = now.saturating_duration_since(state.0);
        state.0 = now;
        if gap > self.limit {
            state.1 += 1;
            tracing::warn!(
                stood_still_ms = gap.as_millis() as u64,
                limit_ms = self.limit.as_millis() as u64,
                epoch = state.1,
                "this process stood still; what it had received before is given up for JetStream to redeliver"
            );
        }
        state.1
    }
}

/// What was received in one epoch may be applied only while it lasts.
#[derive(Clone)]
pub(crate) struct Fence {
    watch: PauseWatch,
    epoch: u64,
}

impl Fence {
    /// No pause longer than the limit since the fence was set.
    pub fn holds(&self) -> bool {
        self.watch.epoch() == self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Limits of seconds: a loaded test machine may not run a thread for a
    // few hundred milliseconds.
    #[test]
    fn the_watch_thread_keeps_an_epoch_going_while_nobody_else_looks() {
        let watch = PauseWatch::start(Duration::from_secs(2));
        let fence = watch.fence();
        std::thread::sleep(Duration::from_secs(5));
        assert!(fence.holds(), "the thread looked every 100 ms: no gap");
    }

    #[test]
    fn a_gap_between_two_looks_ends_the_epoch_once() {
        // No watch thread: nobody looks while this one sleeps, as when the
        // whole process is stopped.
        let watch = PauseWatch::unwatched(Duration::from_secs(1));
        let fence = watch.fence();
        std::thread::sleep(Duration::from_millis(50));
        assert!(fence.holds(), "50 ms is no pause");
        std::thread::sleep(Duration::from_millis(1_500));
        // Several look at once on waking; one of them sees the gap.
        let lookers: Vec<_> = (0..4)
            .map(|_| {
                let w = watch.clone();
                std::thread::spawn(move || w.epoch())
            })
            .collect();
        for l in lookers {
            assert_eq!(l.join().unwrap(), 1, "one gap, one new epoch");
        }
        assert!(!fence.holds(), "received before the gap: given up");
        assert!(watch.fence().holds(), "a fence set after the gap holds");
    }
}
