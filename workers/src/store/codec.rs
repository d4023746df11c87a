//! Order-preserving binary keys and fixed-size values of the store.
//!
//! Window keys sort by series, field, resolution, then time, so one series is
//! a prefix range and a time range within one series, field and resolution is
//! a contiguous key range. Big-endian, time-ordered keys are also LMDB's
//! fastest insert pattern (pages fill in order instead of splitting at random).

use super::StoreError;

/// Separator after the series and after the field (neither may contain it).
pub const SEP: u8 = 0;

/// LMDB's key size limit (`MDB_MAXKEYSIZE` as lmdb-master-sys builds it).
/// A longer key fails the whole transaction, so names are checked up front.
pub const MAX_KEY_BYTES: usize = 511;

/// Bytes a window key adds to the series and field: two separators, the
/// resolution and the start.
const WINDOW_KEY_OVERHEAD: usize = 2 + 4 + 8;

/// Maps a signed time to an unsigned one with the same order (sign bit flipped).
fn ordered(ts: i64) -> u64 {
    (ts as u64) ^ (1 << 63)
}

/// Inverse of [`ordered`].
fn unordered(u: u64) -> i64 {
    (u ^ (1 << 63)) as i64
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> StoreError {
    StoreError::InvalidKey {
        what,
        value: value.chars().take(64).collect(),
        reason,
    }
}

/// Checks that `series` and `field` can form window and latest keys.
///
/// # Errors
/// [`StoreError::InvalidKey`] if either contains 0x00 or the key would exceed
/// [`MAX_KEY_BYTES`].
pub fn check_names(series: &str, field: &str) -> Result<(), StoreError> {
    if series.as_bytes().contains(&SEP) {
        return Err(invalid("series", series, "contains 0x00"));
    }
    if field.as_bytes().contains(&SEP) {
        return Err(invalid("field", field, "contains 0x00"));
    }
    if series.len() + field.len() + WINDOW_KEY_OVERHEAD > MAX_KEY_BYTES {
        return Err(invalid(
            "series",
            series,
            "series and field together exceed 497 bytes",
        ));
    }
    Ok(())
}

/// Checks that `stream` can form an applied key.
///
/// # Errors
/// [`StoreError::InvalidKey`] if it contains 0x00 or is too long.
pub fn check_stream(stream: &str) -> Result<(), StoreError> {
    if stream.as_bytes().contains(&SEP) {
        return Err(invalid("stream", stream, "contains 0x00"));
    }
    if stream.len() + 9 > MAX_KEY_BYTES {
        return Err(invalid("stream", stream, "longer than 502 bytes"));
    }
    Ok(())
}

/// `series 0x00 field 0x00 resolution(u32 BE) start(u64 BE, sign bit flipped)`.
pub fn window_key(series: &str, field: &str, resolution_secs: u32, start_ns: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(series.len() + field.len() + WINDOW_KEY_OVERHEAD);
    put_window_key(&mut k, series, field, resolution_secs, start_ns);
    k
}

/// Appends a [`window_key`] to `buf` (the writer builds a batch's keys in one buffer).
pub fn put_window_key(
    buf: &mut Vec<u8>,
    series: &str,
    field: &str,
    resolution_secs: u32,
    start_ns: i64,
) {
    put_latest_key(buf, series, field);
    put_window_tail(buf, resolution_secs, start_ns);
}

/// A decoded [`window_key`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WindowKey {
    /// Series.
    pub series: String,
    /// Field.
    pub field: String,
    /// Resolution, seconds.
    pub resolution_secs: u32,
    /// Window start, Unix ns.
    pub start_ns: i64,
}

/// Bytes before the names in a [`put_recent_key`] key.
pub const RECENT_HEAD: usize = 12;

/// Appends a `recent` key to `buf`: `resolution(u32 BE) start(u64 BE, sign bit
/// flipped) series 0x00 field`, the window key's parts with time first, from
/// the window's [`recent_head`] and its series and field already encoded as
/// a [`put_latest_key`] key (a batch encodes each sample's names once, for
/// every resolution and for the latest value).
///
/// A batch's windows are written to `recent` in this order: one batch's
/// windows lie next to each other (the current seconds and minutes of every
/// series), so a commit rewrites a few pages at the end of the tree. In the
/// series-first order of `windows` and the runs, every series a batch touches dirties a
/// page of its own once it has a page of windows: measured, 11 KiB written
/// per message after a quarter of an hour of 20,000 series (BENCHMARKS.md).
pub fn put_recent_key(buf: &mut Vec<u8>, head: &[u8; RECENT_HEAD], latest: &[u8]) {
    buf.extend_from_slice(head);
    buf.extend_from_slice(latest);
}

/// The first [`RECENT_HEAD`] bytes of a `recent` key: where a resolution's
/// windows starting at `start_ns` (or later) begin.
pub fn recent_head(resolution_secs: u32, start_ns: i64) -> [u8; RECENT_HEAD] {
    let mut h = [0u8; RECENT_HEAD];
    h[..4].copy_from_slice(&resolution_secs.to_be_bytes());
    h[4..].copy_from_slice(&ordered(start_ns).to_be_bytes());
    h
}

/// The `recent` key's names part (`series 0x00 field`, what a window key
/// starts with), if it is one: exactly one 0x00, as [`check_names`] lets
/// through. (A compaction orders windows by their names alone, which
/// agrees with their window keys' order only then.)
fn recent_names(k: &[u8]) -> Option<&[u8]> {
    let names = k.get(RECENT_HEAD..)?;
    let cut = names.iter().position(|b| *b == SEP)?;
    (!names[cut + 1..].contains(&SEP)).then_some(names)
}

/// A `recent` key's resolution, start and names (`series 0x00 field`), if
/// it is one.
pub fn recent_parts(k: &[u8]) -> Option<(u32, i64, &[u8])> {
    let names = recent_names(k)?;
    let (res, start) = parse_head(&k[..RECENT_HEAD])?;
    Some((res, start, names))
}

/// Decodes [`recent_head`]: resolution and start.
fn parse_head(h: &[u8]) -> Option<(u32, i64)> {
    let res = u32::from_be_bytes(h.get(..4)?.try_into().ok()?);
    let start = unordered(u64::from_be_bytes(h.get(4..RECENT_HEAD)?.try_into().ok()?));
    Some((res, start))
}

/// Appends what follows a window key's names: 0x00 and its [`recent_head`].
fn put_window_tail(buf: &mut Vec<u8>, resolution_secs: u32, start_ns: i64) {
    buf.push(SEP);
    buf.extend_from_slice(&recent_head(resolution_secs, start_ns));
}

/// Appends a [`window_key`] to `buf` from its names already encoded as a
/// [`put_latest_key`] key.
pub fn put_window_key_of_names(
    buf: &mut Vec<u8>,
    names: &[u8],
    resolution_secs: u32,
    start_ns: i64,
) {
    buf.extend_from_slice(names);
    put_window_tail(buf, resolution_secs, start_ns);
}

/// Resolution and start of a window key without decoding the names (for
/// filtering before allocating).
pub fn window_key_tail(k: &[u8]) -> Option<(u32, i64)> {
    parse_head(&k[k.len().checked_sub(RECENT_HEAD)?..])
}

/// Decodes [`window_key`]; `None` if it is not one.
pub fn parse_window_key(k: &[u8]) -> Option<WindowKey> {
    let (resolution_secs, start_ns) = window_key_tail(k)?;
    let names = k[..k.len() - 12].strip_suffix(&[SEP])?;
    let (series, field) = split_names(names)?;
    Some(WindowKey {
        series,
        field,
        resolution_secs,
        start_ns,
    })
}

fn split_names(names: &[u8]) -> Option<(String, String)> {
    let cut = names.iter().position(|b| *b == SEP)?;
    let series = std::str::from_utf8(&names[..cut]).ok()?;
    let field = std::str::from_utf8(&names[cut + 1..]).ok()?;
    Some((series.to_owned(), field.to_owned()))
}

/// Appends a latest-value key, `series 0x00 field`, to `buf`; a window key
/// starts with it.
pub fn put_latest_key(buf: &mut Vec<u8>, series: &str, field: &str) {
    buf.extend_from_slice(series.as_bytes());
    buf.push(SEP);
    buf.extend_from_slice(field.as_bytes());
}

/// Decodes a [`put_latest_key`] key: (series, field).
pub fn parse_latest_key(k: &[u8]) -> Option<(String, String)> {
    split_names(k)
}

/// Latest value: `ts_ns i64 LE, value f64 LE`.
pub fn latest_value(ts_ns: i64, value: f64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&ts_ns.to_le_bytes());
    b[8..].copy_from_slice(&value.to_le_bytes());
    b
}

/// Decodes [`latest_value`]; `None` if the length is wrong.
pub fn parse_latest_value(b: &[u8]) -> Option<(i64, f64)> {
    let b: &[u8; 16] = b.try_into().ok()?;
    let (ts, v) = b.split_at(8);
    Some((
        i64::from_le_bytes(ts.try_into().ok()?),
        f64::from_le_bytes(v.try_into().ok()?),
    ))
}

/// Whether sample `a` replaces `b` as the latest: greater (time, value bits),
/// the same tie rule as `Aggregate::merge`'s last, so arrival order never matters.
pub fn is_newer(a: (i64, f64), b: (i64, f64)) -> bool {
    (a.0, a.1.to_bits()) > (b.0, b.1.to_bits())
}

/// `stream 0x00 (seq >> 16) u64 BE`: the chunk holding `seq`; its value is a
/// roaring bitmap of [`applied_low`] of the applied sequences in the chunk.
pub fn applied_key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&(seq >> 16).to_be_bytes());
    k
}

/// The bit of `seq` within its [`applied_key`] chunk.
pub fn applied_low(seq: u64) -> u32 {
    (seq & 0xFFFF) as u32
}

/// The key prefix selecting a series pattern: `series 0x00` for an exact
/// series, the bytes before the `*` for `prefix*`, empty for `*`.
///
/// # Errors
/// [`StoreError::InvalidKey`] if the pattern contains 0x00.
pub fn pattern_prefix(pattern: &str) -> Result<Vec<u8>, StoreError> {
    if pattern.as_bytes().contains(&SEP) {
        return Err(invalid("pattern", pattern, "contains 0x00"));
    }
    Ok(match pattern.strip_suffix('*') {
        Some(prefix) => prefix.as_bytes().to_vec(),
        None => [pattern.as_bytes(), &[SEP]].concat(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn recent_keys_are_window_keys_in_time_order(
            series in "[a-z0-9/ .]{0,20}", field in "[a-z]{0,8}", res in any::<u32>(), a in any::<i64>(), b in any::<i64>(),
            other in "[a-z0-9/ .]{0,20}"
        ) {
            let recent = |series: &str, ts| {
                let mut latest = Vec::new();
                put_latest_key(&mut latest, series, &field);
                let mut k = Vec::new();
                put_recent_key(&mut k, &recent_head(res, ts), &latest);
                k
            };
            let mut w = Vec::new();
            let key = recent(&series, a);
            let parts = recent_parts(&key);
            prop_assert!(parts.is_some());
            if let Some((r, t, names)) = parts {
                put_window_key_of_names(&mut w, names, r, t);
            }
            prop_assert_eq!(w, window_key(&series, &field, res, a));
            // Time first, whatever the series.
            if a != b {
                prop_assert_eq!(recent(&series, a) < recent(&other, b), a < b);
            }
            prop_assert!(recent(&series, a).starts_with(&recent_head(res, a)));
            prop_assert!(recent_parts(&recent_head(res, a)).is_none());
            // Names of one series and one field, nothing else.
            let mut two = recent(&series, a);
            two.push(SEP);
            prop_assert!(recent_parts(&two).is_none());
            prop_assert_eq!(recent_parts(&recent(&series, a)).map(|(r, t, _)| (r, t)), Some((res, a)));
        }
    }

    proptest! {
        #[test]
        fn window_keys_round_trip_and_keep_time_order(
            series in "[a-z0-9/ .]{0,20}", field in "[a-z]{0,8}", res in any::<u32>(), a in any::<i64>(), b in any::<i64>()
        ) {
            let ka = window_key(&series, &field, res, a);
            let want = WindowKey { series: series.clone(), field: field.clone(), resolution_secs: res, start_ns: a };
            prop_assert_eq!(parse_window_key(&ka), Some(want));
            let kb = window_key(&series, &field, res, b);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn latest_values_round_trip(ts in any::<i64>(), v in any::<f64>()) {
            let (t, w) = parse_latest_value(&latest_value(ts, v)).unwrap();
            prop_assert_eq!((t, w.to_bits()), (ts, v.to_bits()));
        }

        #[test]
        fn applied_keys_order_by_sequence(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(applied_key("S", a).cmp(&applied_key("S", b)), (a >> 16).cmp(&(b >> 16)));
            prop_assert_eq!(((a >> 16) << 16) | u64::from(applied_low(a)), a);
        }
    }

    #[test]
    fn a_series_sorts_before_its_longer_neighbours() {
        // "a" 0x00 … < "a/b" …: one exact series is one contiguous prefix.
        assert!(window_key("a", "t", 1, i64::MAX) < window_key("a/b", "t", 1, i64::MIN));
        assert!(window_key("a", "t", 1, 0) < window_key("a", "u", 1, 0));
        assert!(window_key("a", "t", 1, i64::MAX) < window_key("a", "t", 60, i64::MIN));
    }

    #[test]
    fn names_with_the_separator_or_too_long_are_rejected() {
        assert!(check_names("a\0b", "t").is_err());
        assert!(check_names("a", "t\0").is_err());
        assert!(check_names(&"x".repeat(496), "t").is_ok());
        assert!(check_names(&"x".repeat(497), "t").is_err());
        assert!(check_stream("S\0").is_err());
        assert!(pattern_prefix("a\0*").is_err());
        assert_eq!(pattern_prefix("a/*").unwrap(), b"a/".to_vec());
        assert_eq!(pattern_prefix("a").unwrap(), b"a\0".to_vec());
        assert!(pattern_prefix("*").unwrap().is_empty());
        assert_eq!(
            parse_latest_key(&{
                let mut k = Vec::new();
                put_latest_key(&mut k, "a/b", "t");
                k
            }),
            Some(("a/b".into(), "t".into()))
        );
        assert_eq!(parse_window_key(b"short"), None);
    }
}
