//! What a JetStream message's reply subject says about its delivery.
//!
//! The server puts a consumed message's place in its stream into the reply
//! subject (`$JS.ACK.…`, ADR-15). Workers and replay read three of its
//! numbers for every message: the stream sequence (the key of idempotency),
//! the time the stream stored it (lateness is judged against it) and what the
//! consumer still has pending. async-nats' `Message::info` reads all nine
//! tokens, parses the time as an `i128` and turns it into an `OffsetDateTime`;
//! perf put that at about a twelfth of an ordered replay's CPU. This reads
//! the three numbers and nothing else.

/// A JetStream message's delivery, from its reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The message's sequence in its stream.
    pub stream_seq: u64,
    /// When the stream stored the message: Unix nanoseconds.
    pub stored_ns: i64,
    /// Messages the consumer still had for this client after this one.
    pub pending: u64,
}

/// The prefix of every acknowledgement subject.
const PREFIX: &str = "$JS.ACK.";

/// Reads a JetStream reply subject in either of ADR-15's forms: the original
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
/// seq>.<time>.<pending>`, and the one with `<domain>.<account hash>.` before
/// the stream and optionally more tokens after `<pending>`. `None` if it is
/// neither (the same subjects async-nats' `Message::info` refuses, except
/// that tokens this does not read are not checked).
pub fn parse_delivery(reply: &str) -> Option<Delivery> {
    let rest = reply.strip_prefix(PREFIX)?;
    // The first ten tokens are all either form uses.
    let mut tokens = [""; 10];
    let mut n = 0;
    for (slot, token) in tokens.iter_mut().zip(rest.split('.')) {
        *slot = token;
        n += 1;
    }
    // Where `<stream>` is: the tokens before it are the domain and hash.
    let at = match n {
        7 => 0,
        9.. => 2,
        _ => return None,
    };
    let number = |i: usize| tokens[at + i].parse::<u64>().ok();
    Some(Delivery {
        stream_seq: number(3)?,
        stored_ns: i64::try_from(number(5)?).ok()?,
        pending: number(6)?,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn both_forms_are_read() {
        let want = Delivery {
            stream_seq: 42,
            stored_ns: 1_764_028_800_123_456_789,
            pending: 7,
        };
        assert_eq!(
            parse_delivery("$JS.ACK.TELEMETRY.workers.1.42.40.1764028800123456789.7"),
            Some(want)
        );
        assert_eq!(
            parse_delivery("$JS.ACK._.ACCHASH.TELEMETRY.workers.3.42.40.1764028800123456789.7"),
            Some(want)
        );
        assert_eq!(
            parse_delivery(
                "$JS.ACK.hub.ACCHASH.TELEMETRY.workers.3.42.40.1764028800123456789.7.tok.more"
            ),
            Some(want)
        );
    }

    #[test]
    fn other_subjects_are_refused() {
        for reply in [
            "",
            "_INBOX.abc",
            "$JS.ACK.TELEMETRY.workers.1.42.40.1764028800123456789",
            "$JS.ACK._.H.TELEMETRY.workers.1.42.40.1764028800123456789",
            "$JS.ACK.TELEMETRY.workers.1.x.40.1764028800123456789.7",
            "$JS.ACK.TELEMETRY.workers.1.42.40.-5.7",
            "$JS.ACK.TELEMETRY.workers.1.42.40.99999999999999999999.7",
        ] {
            assert_eq!(parse_delivery(reply), None, "{reply}");
        }
    }

    proptest! {
        /// Whatever the names and numbers, in either form, the three numbers
        /// come back as written.
        #[test]
        fn the_numbers_come_back(
            stream in "[A-Za-z0-9_-]{1,12}", consumer in "[A-Za-z0-9_-]{1,12}",
            delivered in any::<u64>(), seq in any::<u64>(), cseq in any::<u64>(),
            ns in 0..i64::MAX, pending in any::<u64>(),
            domain in proptest::option::of("[A-Za-z0-9_]{1,8}"),
            extra in prop::collection::vec("[A-Za-z0-9]{1,6}", 0..3),
        ) {
            let tail = format!("{stream}.{consumer}.{delivered}.{seq}.{cseq}.{ns}.{pending}");
            let reply = match &domain {
                None => format!("$JS.ACK.{tail}"),
                Some(d) => {
                    let mut r = format!("$JS.ACK.{d}.HASH.{tail}");
                    for e in &extra {
                        r.push('.');
                        r.push_str(e);
                    }
                    r
                }
            };
            let want = Delivery { stream_seq: seq, stored_ns: ns, pending };
            prop_assert_eq!(parse_delivery(&reply), Some(want));
        }
    }
}
