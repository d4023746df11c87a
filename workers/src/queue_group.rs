//! A core worker's queue-group subscription, and leaving the group without
//! losing what the server routed to it.
//!
//! Unsubscribing outright loses what is on the wire: async-nats ends a
//! drained subscription after its next read of the socket, without waiting
//! for the server to confirm the unsubscribe, and nats-server sends this
//! member messages until it takes the unsubscribe. `UNSUB <sid> <max>` has
//! no such gap. The server counts the messages it sent on the subscription
//! since its `SUB` and stops at `max` (at once if it has already sent as
//! many; the group's other members get the rest), and async-nats counts the
//! messages it delivered and ends the subscription at `max` too. So the
//! worker first takes what the client holds, which makes its own count the
//! client's, and then sets `max` a margin above it: the messages in flight,
//! and a little more, come, and then the subscription ends.
//!
//! The two counts part, and the worker unsubscribes outright, when the
//! client dropped messages as a slow consumer (the server counted them; the
//! last ones then never come, and the quiet spell ends the wait) or
//! reconnected before the server took the `UNSUB` (the server counts from
//! the new connection's `SUB`; after it, async-nats sends a new connection
//! what is left of the count, which keeps the two agreed).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
    time::Duration,
};

use async_nats::{connection::State, Client, Message, Subscriber};
use futures::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for the server's last messages once the leaving began.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

/// The leaving gives up when no message came for this long: the traffic
/// stopped, or is so sparse that a message is rarely on the wire.
const LEAVE_QUIET: Duration = Duration::from_secs(1);

/// The margin covers the messages that arrive at the recent rate for this
/// long, plus for as long as the worker last took none (a stall, a frozen
/// process): what is in flight when the server takes the unsubscribe.
const LEAVE_MARGIN: Duration = Duration::from_millis(500);

/// The smallest margin, in messages.
const LEAVE_MARGIN_MIN: u64 = 1_000;

/// The arrival rate is measured over windows of at least this long...
const RATE_WINDOW: Duration = Duration::from_millis(250);

/// ...and the highest of this many recent windows counts.
const RATE_WINDOWS: usize = 4;

/// A core worker's subscription: it counts what it hands out, measures the
/// connection's arrival rate, and holds back what the client held when the
/// leaving began.
pub(crate) struct QueueMember {
    nats: Client,
    sub: Subscriber,
    /// The client's connections before it subscribed.
    connects: u64,
    /// Taken out of the client's buffer when the leaving began; handed out first.
    held: VecDeque<Message>,
    /// Messages taken from the client: the client's count of delivered ones.
    taken: u64,
    /// The connection's messages received at an instant; rates of recent windows.
    mark: (Instant, u64),
    rates: [f64; RATE_WINDOWS],
    /// When the last batch was taken.
    last_batch: Instant,
}

/// A leaving in progress.
pub(crate) struct Leaving {
    /// The count at which the server stops sending and the client ends the subscription.
    max: u64,
    began: Instant,
    /// When the loop last finished a batch and looked for more.
    last_submit: Instant,
}

impl Leaving {
    /// When to unsubscribe outright if the last messages have not come.
    pub fn give_up_at(&self) -> Instant {
        (self.began + LEAVE_WITHIN).min(self.last_submit + LEAVE_QUIET)
    }

    /// The loop finished a batch and looks for more now.
    pub fn submitted(&mut self) {
        self.last_submit = Instant::now();
    }

    /// Messages the server was still to send.
    pub fn left(&self, member: &QueueMember) -> u64 {
        self.max.saturating_sub(member.taken)
    }

    /// Whether the subscription ended at the agreed count on the connection
    /// that agreed it. More than the count means the client held more than
    /// the margin when it took the unsubscribe: some were on the wire past it.
    pub fn reached(&self, member: &QueueMember) -> bool {
        if member.taken > self.max {
            tracing::warn!(
                taken = member.taken,
                max = self.max,
                "the client had more than the margin: messages on the wire may be lost"
            );
        }
        member.taken == self.max && !member.reconnected()
    }
}

/// Sleeps until `at` (forever without one): the wait for [`Leaving::give_up_at`].
pub(crate) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl QueueMember {
    /// Subscribes `nats` to `filter` in `group`.
    ///
    /// # Errors
    /// The client's, when it cannot subscribe.
    pub async fn join(
        nats: &Client,
        filter: String,
        group: String,
    ) -> Result<Self, async_nats::SubscribeError> {
        // Before the SUB: a reconnect in between then counts as one.
        let connects = nats.statistics().connects.load(Ordering::Relaxed);
        let sub = nats.queue_subscribe(filter, group).await?;
        let now = Instant::now();
        let received = nats.statistics().in_messages.load(Ordering::Relaxed);
        Ok(Self {
            nats: nats.clone(),
            sub,
            connects,
            held: VecDeque::new(),
            taken: 0,
            mark: (now, received),
            rates: [0.0; RATE_WINDOWS],
            last_batch: now,
        })
    }

    /// Called after every batch taken: notes when, and measures the arrival rate.
    pub fn batch_taken(&mut self) {
        let now = Instant::now();
        self.last_batch = now;
        let elapsed = now.duration_since(self.mark.0);
        if elapsed >= RATE_WINDOW {
            let received = self.nats.statistics().in_messages.load(Ordering::Relaxed);
            self.rates.rotate_right(1);
            self.rates[0] = received.saturating_sub(self.mark.1) as f64 / elapsed.as_secs_f64();
            self.mark = (now, received);
        }
    }

    /// Whether the client connected again since it subscribed. Subscribed
    /// before its first connection (`retry_on_initial_connect`), the first
    /// connection's count is the subscription's.
    fn reconnected(&self) -> bool {
        let connects = self.nats.statistics().connects.load(Ordering::Relaxed);
        connects > self.connects.max(1)
    }

    /// Begins leaving the group (module docs): takes what the client holds
    /// and tells the server how many more to send. `None` when it cannot
    /// (not connected, or reconnected: the server's count started again)
    /// and has unsubscribed outright instead, or when `hard_stop` came first.
    pub async fn leave(&mut self, hard_stop: &CancellationToken) -> Option<Leaving> {
        // Unconstrained: tokio's budget would report the buffer empty early.
        while let Some(Some(m)) = tokio::task::unconstrained(self.sub.next()).now_or_never() {
            self.taken += 1;
            self.held.push_back(m);
        }
        if self.nats.connection_state() != State::Connected || self.reconnected() {
            tracing::info!("not on the connection it subscribed on, so the server counts differently; unsubscribing outright");
            self.unsubscribe_outright(hard_stop).await;
            return None;
        }
        let margin = self.margin();
        let max = self.taken + margin;
        tokio::select! {
            res = self.sub.unsubscribe_after(max) => warn_unless_sent(res),
            () = hard_stop.cancelled() => return None,
        }
        // The server has taken the UNSUB once it answers the flush's PING;
        // a reconnect before that may have sent the UNSUB on a connection
        // that counts from its own SUB. After it, async-nats sends the new
        // connection what is left of the count, which keeps them agreed.
        tokio::select! {
            _ = tokio::time::timeout(LEAVE_WITHIN, self.nats.flush()) => {}
            () = hard_stop.cancelled() => return None,
        }
        if self.reconnected() {
            tracing::info!("reconnected while leaving; unsubscribing outright");
            self.unsubscribe_outright(hard_stop).await;
            return None;
        }
        tracing::info!(
            held = self.held.len(),
            margin,
            "leaving the queue group: the server sends this many more, the other members the rest"
        );
        let now = Instant::now();
        Some(Leaving {
            max,
            began: now,
            last_submit: now,
        })
    }

    /// Messages the server is told to send after the leaving began.
    fn margin(&self) -> u64 {
        let rate = self.rates.iter().copied().fold(0.0, f64::max);
        // Capped: after that long the leaving gives up anyway.
        let cover = LEAVE_MARGIN + self.last_batch.elapsed().min(LEAVE_WITHIN);
        // `as` saturates, and a rate is never negative.
        ((rate * cover.as_secs_f64()) as u64).max(LEAVE_MARGIN_MIN)
    }

    /// Unsubscribes, keeping what had already reached the client.
    pub async fn unsubscribe_outright(&mut self, hard_stop: &CancellationToken) {
        tokio::select! {
            res = self.sub.drain() => {
                warn_unless_sent(res);
                tracing::info!("unsubscribed from the queue group; applying what had already arrived");
            }
            () = hard_stop.cancelled() => {}
        }
    }

    /// Unsubscribes without waiting for what is buffered (the worker stops).
    pub async fn unsubscribe(mut self) {
        warn_unless_sent(self.sub.unsubscribe().await);
    }
}

fn warn_unless_sent(res: Result<(), async_nats::UnsubscribeError>) {
    if let Err(e) = res {
        tracing::warn!(error = %e, "cannot unsubscribe; what is buffered is still applied");
    }
}

impl Stream for QueueMember {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(m) = self.held.pop_front() {
            return Poll::Ready(Some(m));
        }
        let polled = self.sub.poll_next_unpin(cx);
        if let Poll::Ready(Some(_)) = polled {
            self.taken += 1;
        }
        polled
    }
}
