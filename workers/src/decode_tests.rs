//! Tests of decoding: payload shapes, field mapping, timestamps, and
//! what is refused and why.

use super::*;
use proptest::prelude::*;

const TOPIC: &str = "site-1/d42/temp";

fn cfg(f: impl FnOnce(&mut DecodeConfig)) -> DecodeConfig {
    let mut c = DecodeConfig::default();
    f(&mut c);
    c
}

/// Decodes `payload` from [`TOPIC`], received at 7 ns.
fn run(c: &DecodeConfig, payload: &str) -> Result<Vec<Sample>, DecodeError> {
    decode(c, TOPIC, payload.as_bytes(), Some(7))
}

/// The error's reason code, or "ok".
fn why(c: &DecodeConfig, payload: &str) -> &'static str {
    run(c, payload).err().map_or("ok", |e| e.reason())
}

fn s(series: &str, field: &str, ts_ns: i64, value: f64) -> Sample {
    Sample {
        series: series.into(),
        field: field.into(),
        ts_ns,
        value,
    }
}

/// The time of `{"ts": <ts>, "v": 1}`.
fn ts(c: &DecodeConfig, ts: &str) -> Result<i64, DecodeError> {
    run(c, &format!(r#"{{"ts":{ts},"v":1}}"#)).map(|v| v[0].ts_ns)
}

#[test]
fn typical_object_maps_levels_fields_and_every_other_number() {
    let c = cfg(|c| (c.series_levels, c.series_fields) = (vec![0], vec!["device".into()]));
    let p = r#"{"device":"d42","ts":1764000000123,"temp":21.5,"hum":40,"ok":true,"n":"x","o":{"a":1},"l":[1]}"#;
    let ns = 1_764_000_000_123_000_000;
    let want = vec![
        s("site-1/d42", "hum", ns, 40.0),
        s("site-1/d42", "temp", ns, 21.5),
    ];
    assert_eq!(run(&c, p), Ok(want));
}

#[test]
fn series_from_negative_levels_numeric_fields_or_whole_topic() {
    let c = cfg(|c| {
        (c.series_levels, c.series_fields) = (vec![-1, 0], vec!["id".into(), "room".into()])
    });
    let got = run(&c, r#"{"id":7,"room":"k\u00fcche","v":1.5}"#);
    assert_eq!(got, Ok(vec![s("temp/site-1/7/küche", "v", 7, 1.5)]));
    assert_eq!(
        run(&DecodeConfig::default(), r#"{"v":-1}"#).unwrap()[0].series,
        TOPIC
    );
    for index in [3, -4, i32::MIN] {
        let c = cfg(|c| c.series_levels = vec![index]);
        assert_eq!(
            run(&c, "1"),
            Err(DecodeError::MissingLevel { index, levels: 3 })
        );
    }
}

#[test]
fn plain_numbers_use_receive_time_and_levels_only() {
    let c = cfg(|c| {
        (c.series_levels, c.series_fields) = (vec![1], vec!["device".into()]);
        c.plain_field = "reading".into();
    });
    for (p, v) in [
        ("24.5", 24.5),
        (" 24.5\n", 24.5),
        ("-3", -3.0),
        ("1e3", 1000.0),
    ] {
        assert_eq!(run(&c, p), Ok(vec![s("d42", "reading", 7, v)]), "{p:?}");
    }
    assert_eq!(
        decode(&c, TOPIC, b"1", None),
        Err(DecodeError::MissingTimestamp)
    );
    assert_eq!(run(&DecodeConfig::default(), "2").unwrap()[0].series, TOPIC);
}

#[test]
fn configured_value_fields_are_strict() {
    let c = cfg(|c| c.value_fields = vec!["temp".into(), "hum".into()]);
    let got = run(&c, r#"{"temp":1,"hum":2.5,"other":3}"#);
    assert_eq!(
        got,
        Ok(vec![s(TOPIC, "temp", 7, 1.0), s(TOPIC, "hum", 7, 2.5)])
    );
    let err = run(&c, r#"{"temp":1}"#).unwrap_err();
    assert_eq!(
        err,
        DecodeError::MissingField {
            field: "hum".into()
        }
    );
    for (v, want) in [
        (r#""2.5""#, "string"),
        ("true", "bool"),
        ("null", "null"),
        ("{}", "object"),
    ] {
        let got = run(&c, &format!(r#"{{"temp":1,"hum":{v}}}"#));
        assert!(
            matches!(got, Err(DecodeError::NotNumeric { ref field, found }) if field == "hum" && found == want)
        );
    }
}

#[test]
fn objects_without_numbers_and_repeated_keys() {
    let d = DecodeConfig::default();
    assert_eq!(why(&d, r#"{"ts":1,"s":"2","b":false,"a":[]}"#), "no_values");
    assert_eq!(run(&d, r#"{"a":1,"a":2}"#), Ok(vec![s(TOPIC, "a", 7, 2.0)]));
    assert_eq!(why(&d, r#"{"a":1,"a":"x"}"#), "no_values");
    assert_eq!(run(&d, r#"{"t\u0065mp":1}"#).unwrap()[0].field, "temp");
}

#[test]
fn malformed_payloads() {
    let d = DecodeConfig::default();
    assert_eq!(
        decode(&d, TOPIC, &[b'{', 0xff, b'}'], None),
        Err(DecodeError::NotUtf8)
    );
    let deep = format!(r#"{{"a":{}"#, "[".repeat(100_000));
    for p in [
        "",
        "hello",
        "nan",
        "inf",
        "1e400",
        r#"{"a":"#,
        r#"{"a":1} x"#,
        "{\"a\":1,}",
        &deep,
    ] {
        assert_eq!(why(&d, p), "not_json", "{p:?}");
    }
    for (p, found) in [
        ("[1]", "array"),
        (r#""1""#, "string"),
        ("true", "bool"),
        ("null", "null"),
    ] {
        assert_eq!(run(&d, p), Err(DecodeError::NotAnObject { found }));
    }
}

#[test]
fn series_and_field_names_must_be_storable() {
    let c = cfg(|c| c.series_fields = vec!["device".into()]);
    let cases = [
        (r#"{"device":"a\u0000b","v":1}"#, "invalid_series"),
        (r#"{"device":"","v":1}"#, "invalid_series"),
        (r#"{"v":1}"#, "missing_field"),
        (r#"{"device":true,"v":1}"#, "bad_series_field"),
        (r#"{"device":"a","v\u0000":1}"#, "invalid_field"),
    ];
    for (p, reason) in cases {
        assert_eq!(why(&c, p), reason, "{p}");
    }
}

#[test]
fn each_timestamp_unit() {
    use TimestampUnit::*;
    let unit = |u| cfg(|c| c.timestamp_unit = u);
    let rfc = r#""2025-11-24T17:00:00.123456789+02:00""#;
    let cases = [
        (S, "5", 5_000_000_000),
        (Ms, "5", 5_000_000),
        (Us, "5", 5_000),
        (Ns, "5", 5),
        (S, "1.5", 1_500_000_000),
        (Ms, r#""1764000000123""#, 1_764_000_000_123_000_000),
        (Ns, rfc, 1_763_996_400_123_456_789),
        (Auto, r#""1970-01-01T00:00:01Z""#, 1_000_000_000),
    ];
    for (u, t, want) in cases {
        assert_eq!(ts(&unit(u), t), Ok(want), "{u:?} {t}");
    }
}

#[test]
fn auto_unit_switches_at_powers_of_ten() {
    let a = DecodeConfig::default();
    // Just below each limit the coarser unit applies, and overflows i64 ns.
    for t in [
        "99999999999",
        "99999999999999",
        "99999999999999999",
        "99999999999.5",
    ] {
        assert_eq!(
            why(&a, &format!(r#"{{"ts":{t},"v":1}}"#)),
            "bad_timestamp",
            "{t}"
        );
    }
    let cases = [
        ("0", 0),
        ("9223372036", 9_223_372_036_000_000_000),
        ("100000000000", 100_000_000_000_000_000),
        ("100000000000000", 100_000_000_000_000_000),
        ("100000000000000000", 100_000_000_000_000_000),
        ("1764000000123456789", 1_764_000_000_123_456_789),
        ("1764000000.25", 1_764_000_000_250_000_000),
        ("1e11", 100_000_000_000_000_000),
        (r#""1764000000""#, 1_764_000_000_000_000_000),
    ];
    for (t, want) in cases {
        assert_eq!(ts(&a, t), Ok(want), "{t}");
    }
}

#[test]
fn bad_and_missing_timestamps() {
    let a = DecodeConfig::default();
    let cases = [
        ("-1", "negative"),
        ("-0.5", "negative"),
        (r#""1960-01-01T00:00:00Z""#, "negative"),
        ("18446744073709551615", "out of range"),
        ("1e30", "out of range"),
        (r#""2263-01-01T00:00:00Z""#, "out of range"),
        (r#""NaN""#, "not finite"),
        (r#""yesterday""#, "neither RFC 3339 nor a number"),
        ("true", "not a number or string"),
        ("null", "not a number or string"),
    ];
    for (t, want) in cases {
        assert!(
            matches!(ts(&a, t), Err(DecodeError::BadTimestamp { reason, .. }) if reason == want),
            "{t}"
        );
    }
    let s = cfg(|c| c.timestamp_unit = TimestampUnit::S);
    assert_eq!(
        ts(&s, "9223372037").map_err(|e| e.reason()),
        Err("bad_timestamp")
    );
    assert_eq!(
        decode(&a, TOPIC, br#"{"v":1}"#, Some(9)).unwrap()[0].ts_ns,
        9
    );
    assert_eq!(
        decode(&a, TOPIC, br#"{"v":1}"#, None),
        Err(DecodeError::MissingTimestamp)
    );
    assert_eq!(
        decode(&a, TOPIC, b"1", Some(-1)).unwrap_err().reason(),
        "bad_timestamp"
    );
    let long = format!(r#""{}""#, "é".repeat(100));
    let Err(DecodeError::BadTimestamp { value, .. }) = ts(&a, &long) else {
        panic!()
    };
    assert_eq!(value.chars().count(), 64);
}

#[test]
fn reasons_are_distinct_snake_case_codes() {
    let (field, found, reason) = (String::new(), "", "");
    let all = [
        DecodeError::NotUtf8,
        DecodeError::NotJson {
            detail: String::new(),
        },
        DecodeError::NotAnObject { found },
        DecodeError::MissingField {
            field: field.clone(),
        },
        DecodeError::NotNumeric {
            field: field.clone(),
            found,
        },
        DecodeError::BadSeriesField {
            field: field.clone(),
            found,
        },
        DecodeError::NoValues,
        DecodeError::MissingTimestamp,
        DecodeError::BadTimestamp {
            value: field.clone(),
            reason,
        },
        DecodeError::MissingLevel {
            index: 0,
            levels: 0,
        },
        DecodeError::InvalidSeries { reason },
        DecodeError::InvalidField { field },
    ];
    let mut codes: Vec<_> = all.iter().map(DecodeError::reason).collect();
    let snake = |c: &&str| {
        c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    assert!(codes.iter().all(snake));
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), all.len());
}

#[test]
fn config_defaults_serde_and_problems() {
    let d: DecodeConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(d, DecodeConfig::default());
    assert_eq!(
        (d.timestamp_field.as_str(), d.plain_field.as_str()),
        ("ts", "value")
    );
    assert!(d.problems("worker.decode").is_empty());
    let u: DecodeConfig = serde_json::from_str(r#"{"timestamp_unit":"us"}"#).unwrap();
    assert_eq!(u.timestamp_unit, TimestampUnit::Us);
    assert!(serde_json::from_str::<DecodeConfig>(r#"{"timestamp":"ts"}"#).is_err());
    let bad = cfg(|c| {
        c.plain_field = String::new();
        c.series_fields = vec!["a\0".into()];
        c.value_fields = vec!["t".into(), "ts".into(), "t".into()];
    });
    let want = [
        r#"worker.decode.plain_field: must be non-empty without NUL, got """#,
        r#"worker.decode.series_fields[0]: must be non-empty without NUL, got "a\0""#,
        r#"worker.decode.value_fields[1]: "ts" is the timestamp field"#,
        r#"worker.decode.value_fields[2]: duplicate "t" would count every sample twice"#,
    ];
    assert_eq!(bad.problems("worker.decode"), want);
}

/// Not a benchmark (no assertion on speed): a rough decodes/s figure for review.
#[test]
fn decode_rate_of_a_typical_payload() {
    let c = cfg(|c| (c.series_levels, c.series_fields) = (vec![0], vec!["device".into()]));
    let p = br#"{"device":"d42","ts":1764000000123,"temp":21.5,"hum":40.25,"pressure":1013.2,"battery":3.71,"rssi":-67,"fw":"1.4.2","uptime_s":86400,"ok":true,"site":"north-field-3","note":"routine reading"}"#;
    assert_eq!(decode(&c, TOPIC, p, None).map(|v| v.len()), Ok(6));
    let start = std::time::Instant::now();
    let mut n = 0u32;
    while start.elapsed() < std::time::Duration::from_millis(500) {
        for _ in 0..1000 {
            let _ = std::hint::black_box(decode(&c, TOPIC, std::hint::black_box(p), None));
        }
        n += 1000;
    }
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    eprintln!(
        "decode: {rate:.0} msgs/s ({} B payload, 6 samples each)",
        p.len()
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        levels in proptest::collection::vec(any::<i32>(), 0..3),
    ) {
        let _ = decode(&cfg(|c| c.series_levels = levels), "a/b", &bytes, None);
        let _ = decode(&DecodeConfig::default(), "", &bytes, Some(i64::MAX));
    }

    #[test]
    fn json_like_text_never_panics(text in r#"[ {}\[\]":,0-9eE.+\-a-z\\]{0,64}"#, unit in 0..5usize) {
        use TimestampUnit::*;
        let c = cfg(|c| {
            (c.series_fields, c.timestamp_field) = (vec!["a".into()], "t".into());
            c.timestamp_unit = [Auto, S, Ms, Us, Ns][unit];
        });
        let _ = decode(&c, "x/y", text.as_bytes(), Some(1));
        let _ = decode(&c, "x/y", format!(r#"{{"t":{text},"a":{text},"v":1}}"#).as_bytes(), None);
    }

    #[test]
    fn integer_values_and_times_survive(v in -(1i64 << 53)..(1i64 << 53), t in 0..i64::MAX) {
        let c = cfg(|c| c.timestamp_unit = TimestampUnit::Ns);
        let got = decode(&c, "x", format!(r#"{{"ts":{t},"v":{v}}}"#).as_bytes(), None);
        prop_assert_eq!(got, Ok(vec![s("x", "v", t, v as f64)]));
    }
}
