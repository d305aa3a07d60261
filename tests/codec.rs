//! The CloudEvents codecs: fixed cases and property tests over arbitrary
//! input.

use bytes::Bytes;
use proptest::prelude::*;
use watchtower::codec::{Binding, structured};
use watchtower::{ErrorKind, Event};

fn decode_json(text: &str) -> Result<Event, watchtower::Error> {
    structured::from_slice(text.as_bytes())
}

#[test]
fn json_data_is_inline_and_binary_data_is_base64() {
    let event = Event::new("user.created", serde_json::json!({"user_id": 123}));
    let text = String::from_utf8(structured::to_vec(&event).unwrap()).unwrap();
    assert!(text.contains(r#""data":{"user_id":123}"#), "{text}");
    assert!(text.starts_with(r#"{"specversion":"1.0","id":""#), "{text}");

    let binary = Event::binary("blob", "application/octet-stream", &b"\x00\xff"[..]);
    let text = String::from_utf8(structured::to_vec(&binary).unwrap()).unwrap();
    assert!(text.contains(r#""data_base64":"AP8=""#), "{text}");
    assert_eq!(structured::from_slice(text.as_bytes()).unwrap(), binary);
}

#[test]
fn attribute_strings_are_written_as_serde_json_writes_them() {
    let values = [
        "plain",
        "quote \" and backslash \\",
        "tab\tnewline\ncontrol\u{1}\u{1f}",
        "del \u{7f} and non-ascii é 漢字 🎉",
        "/a/b?c=d&e",
    ];
    for value in values {
        let event = Event::builder("t")
            .source(value)
            .subject(value)
            .extension("ext", value)
            .data("text/plain", "x")
            .build()
            .unwrap();
        let text = String::from_utf8(structured::to_vec(&event).unwrap()).unwrap();
        let quoted = serde_json::to_string(value).unwrap();
        assert!(text.contains(&format!(r#""source":{quoted}"#)), "{text}");
        assert!(text.contains(&format!(r#""subject":{quoted}"#)), "{text}");
        assert!(text.contains(&format!(r#""ext":{quoted}"#)), "{text}");
        assert_eq!(structured::from_slice(text.as_bytes()).unwrap(), event);
    }
}

#[test]
fn structured_encoding_allocates_exactly_its_length() {
    let time = |text: &str| watchtower::codec::parse_time(text).unwrap();
    let events = [
        Event::new("user.created", serde_json::json!({"user_id": 123})),
        Event::builder("t").no_time().build().unwrap(),
        Event::builder("t")
            .time(time("2026-03-04T05:06:07Z"))
            .subject("s")
            .dataschema("https://example.com/s")
            .extension("tenant", "acme")
            .extension("n", "17")
            .data("text/plain", "hello")
            .build()
            .unwrap(),
        Event::builder("t")
            .time(time("0001-01-01T00:00:00.000000001Z"))
            .json(&serde_json::json!([1, 2, 3]))
            .unwrap()
            .build()
            .unwrap(),
        Event::builder("t")
            .time(time("9999-12-31T23:59:59.12+01:00"))
            .data(
                "application/octet-stream",
                Bytes::from_static(b"\x00\x01\x02\x03"),
            )
            .build()
            .unwrap(),
        Event::binary("t", "application/json", &b"not json"[..]),
        Event::binary("t", "application/json", &b" {} "[..]),
    ];
    for event in &events {
        let bytes = structured::to_vec(event).unwrap();
        assert_eq!(
            bytes.len(),
            bytes.capacity(),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(&structured::from_slice(&bytes).unwrap(), event);
    }
}

#[test]
fn json_content_type_with_invalid_json_bytes_falls_back_to_base64() {
    let event = Event::binary("t", "application/json", &b"not json"[..]);
    let bytes = structured::to_vec(&event).unwrap();
    let back = structured::from_slice(&bytes).unwrap();
    assert_eq!(back.data().map(|d| &d[..]), Some(&b"not json"[..]));
}

#[test]
fn json_payloads_that_would_not_read_back_the_same_go_as_base64() {
    // Whitespace around a JSON value, and the value `null` (which reads
    // back as no data), would be lost inline.
    for (content_type, payload) in [
        (None, &b"\t1"[..]),
        (Some("application/json"), &b" {\"a\":1}\n"[..]),
        (Some("application/json"), &b"null"[..]),
        (None, &b"null"[..]),
    ] {
        let mut event = Event::empty("t");
        event.set_data(content_type, Some(Bytes::from_static(payload)));
        let json = structured::to_vec(&event).unwrap();
        assert!(
            String::from_utf8_lossy(&json).contains("data_base64"),
            "{payload:?}"
        );
        let back = structured::from_slice(&json).unwrap();
        assert_eq!(back.data().map(|d| &d[..]), Some(payload));
        assert_eq!(back, event);
    }
    let null = Event::new("t", serde_json::Value::Null);
    assert_eq!(
        structured::from_slice(&structured::to_vec(&null).unwrap()).unwrap(),
        null
    );
}

#[test]
fn missing_datacontenttype_means_json() {
    let event =
        decode_json(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":[1,2]}}"#).unwrap();
    assert_eq!(event.datacontenttype(), None);
    assert!(event.is_json());
    assert_eq!(
        event.json::<serde_json::Value>().unwrap(),
        serde_json::json!({"a": [1, 2]})
    );
}

#[test]
fn text_data_given_as_a_json_string_is_its_text() {
    let event =
        decode_json(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"héllo\n"}"#)
            .unwrap();
    assert_eq!(event.data().map(|d| &d[..]), Some("héllo\n".as_bytes()));
}

#[test]
fn extension_values_of_other_json_types_become_text_and_nulls_vanish() {
    let event = decode_json(
        r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","count":3,"flag":true,"ratio":0.5,"gone":null,"subject":null}"#,
    )
    .unwrap();
    assert_eq!(event.extension("count"), Some("3"));
    assert_eq!(event.extension("flag"), Some("true"));
    assert_eq!(event.extension("ratio"), Some("0.5"));
    assert_eq!(event.extension("gone"), None);
    assert_eq!(event.subject(), None);
}

#[test]
fn invalid_documents_are_decode_errors() {
    let cases = [
        ("", "empty"),
        ("[]", "not an object"),
        (r#"{"id":"1","source":"/s","type":"t"}"#, "no specversion"),
        (
            r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
            "old specversion",
        ),
        (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "no id"),
        (
            r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
            "empty id",
        ),
        (r#"{"specversion":"1.0","id":"1","type":"t"}"#, "no source"),
        (r#"{"specversion":"1.0","id":"1","source":"/s"}"#, "no type"),
        (
            r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
            "numeric id",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
            "bad time",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad-Name":"x"}"#,
            "bad extension name",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":{"a":1}}"#,
            "object extension",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"***"}"#,
            "bad base64",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
            "both data",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"} trailing"#,
            "trailing bytes",
        ),
    ];
    for (text, why) in cases {
        let err = decode_json(text).expect_err(why);
        assert_eq!(err.kind(), ErrorKind::Decode, "{why}: {err}");
    }
}

#[test]
fn bindings_name_headers_as_each_protocol_expects() {
    let event = Event::builder("user.created")
        .subject("42")
        .extension("tenant", "acme")
        .data("text/plain; charset=utf-8", "hi")
        .build()
        .unwrap();
    let headers = |binding: Binding| {
        let mut out = Vec::new();
        binding.write_headers(&event, |k, v| out.push((k.to_owned(), v.to_owned())));
        out
    };
    let nats = headers(Binding::NATS);
    assert!(nats.contains(&("ce-specversion".into(), "1.0".into())));
    assert!(nats.contains(&("ce-tenant".into(), "acme".into())));
    assert!(nats.contains(&("ce-datacontenttype".into(), "text/plain; charset=utf-8".into())));
    let amqp = headers(Binding::AMQP);
    assert!(amqp.contains(&("cloudEvents_type".into(), "user.created".into())));
    assert!(amqp.contains(&("content-type".into(), "text/plain; charset=utf-8".into())));
    let http = headers(Binding::HTTP);
    assert!(http.contains(&("content-type".into(), "text/plain; charset=utf-8".into())));
    let redis = headers(Binding::REDIS);
    assert!(redis.contains(&("subject".into(), "42".into())));
    for binding in [Binding::NATS, Binding::AMQP, Binding::HTTP, Binding::REDIS] {
        let back = binding.decode(headers(binding), event.data().cloned()).unwrap();
        assert_eq!(back, event, "{binding:?}");
    }
}

#[test]
fn http_header_names_match_without_case() {
    let headers = [
        ("CE-SpecVersion", "1.0"),
        ("Ce-Id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("Content-Type", "application/json"),
        ("CE-Tenant", "acme"),
        ("ce-region", "eu"),
        ("x-other", "ignored"),
    ];
    let event = Binding::HTTP
        .decode(headers, Some(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(event.id(), "1");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    assert_eq!(event.extension("tenant"), Some("acme"));
    assert_eq!(event.extension("region"), Some("eu"));
    assert_eq!(event.extensions().count(), 2);
}

#[test]
fn binary_mode_rejects_broken_headers() {
    let base = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ];
    let broken: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "no id",
            base.iter().copied().filter(|(k, _)| *k != "ce-id").collect(),
        ),
        ("bad version", [&base[1..], &[("ce-specversion", "2.0")]].concat()),
        ("bad time", [&base[..], &[("ce-time", "noon")]].concat()),
        ("bad ext", [&base[..], &[("ce-Bad_Ext", "x")]].concat()),
        ("data header", [&base[..], &[("ce-data", "x")]].concat()),
    ];
    for (why, headers) in broken {
        let err = Binding::NATS.decode(headers, None).expect_err(why);
        assert_eq!(err.kind(), ErrorKind::Decode, "{why}");
    }
    let not_utf8 = [("ce-specversion", &b"1.0"[..]), ("ce-id", &b"\xff"[..])];
    assert_eq!(
        Binding::NATS.decode(not_utf8, None).unwrap_err().kind(),
        ErrorKind::Decode
    );
    let bad_percent = [
        ("ce-specversion", "1.0"),
        ("ce-id", "%zz"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ];
    assert_eq!(
        Binding::HTTP.decode(bad_percent, None).unwrap_err().kind(),
        ErrorKind::Decode
    );
}

fn arb_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ -~é✓\u{1F600}]{1,24}").expect("regex")
}

fn arb_event() -> impl Strategy<Value = Event> {
    (
        arb_text(),
        arb_text(),
        arb_text(),
        proptest::option::of(arb_text()),
        proptest::collection::btree_map("[a-z0-9]{1,12}", arb_text(), 0..4),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        any::<bool>(),
        proptest::option::of(0i64..4_000_000_000i64),
    )
        .prop_map(|(id, ty, source, subject, exts, data, json, secs)| {
            let mut b = Event::builder(ty).id(id).source(source).no_time();
            if let Some(subject) = subject {
                b = b.subject(subject);
            }
            if let Some(secs) = secs {
                b = b.time(time::OffsetDateTime::from_unix_timestamp(secs).unwrap());
            }
            for (k, v) in &exts {
                if ![
                    "id",
                    "type",
                    "source",
                    "time",
                    "subject",
                    "datacontenttype",
                    "dataschema",
                    "data",
                    "specversion",
                ]
                .contains(&k.as_str())
                {
                    b = b.extension(k, v.as_str());
                }
            }
            b = match (data, json) {
                (Some(_), true) => b.json(&serde_json::json!({"k": "v"})).unwrap(),
                (Some(bytes), false) => b.data("application/octet-stream", bytes),
                (None, _) => b,
            };
            b.build().unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn structured_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = structured::from_slice(&bytes);
        let _ = structured::from_bytes(&Bytes::from(bytes));
    }

    #[test]
    fn structured_decoding_of_json_like_text_never_panics(text in r#"\{("[a-z_]{1,16}":("[^"]{0,8}"|[0-9]{1,3}|null|true|\{\}|\[\]),?){0,10}\}"#) {
        let _ = structured::from_slice(text.as_bytes());
    }

    #[test]
    fn binary_decoding_never_panics(
        headers in proptest::collection::vec(("(ce-|cloudEvents_|)[a-zA-Z_-]{0,12}", proptest::collection::vec(any::<u8>(), 0..24)), 0..12),
        body in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
    ) {
        for binding in [Binding::NATS, Binding::AMQP, Binding::HTTP, Binding::REDIS] {
            let _ = binding.decode(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())), body.clone().map(Bytes::from));
        }
    }

    #[test]
    fn every_event_round_trips_through_every_encoding(event in arb_event()) {
        let json = structured::to_vec(&event).unwrap();
        prop_assert_eq!(&structured::from_slice(&json).unwrap(), &event);
        for binding in [Binding::NATS, Binding::AMQP, Binding::HTTP, Binding::REDIS] {
            let mut headers = Vec::new();
            binding.write_headers(&event, |k, v| headers.push((k.to_owned(), v.to_owned())));
            let back = binding.decode(headers, event.data().cloned()).unwrap();
            prop_assert_eq!(&back, &event);
        }
    }

    #[test]
    fn topic_parsing_never_panics_and_matching_agrees_with_itself(text in "[a-z*>. ]{0,24}", topic in "[a-z.]{0,16}") {
        if let Ok(pattern) = watchtower::TopicPattern::new(&text) {
            let _ = pattern.matches(&topic);
            let _ = pattern.to_amqp();
            if !pattern.is_wildcard() {
                prop_assert_eq!(pattern.matches(&topic), text == topic);
            }
        }
    }
}

#[test]
fn odd_content_types_never_panic() {
    let text = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"€€","data":1}"#;
    let event = structured::from_slice(text.as_bytes()).unwrap();
    assert!(!event.is_json());
    let _ = format!("{event:?}");
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-datacontenttype", "x€€"),
    ];
    let event = Binding::NATS
        .decode(headers, Some(Bytes::from_static(b"x")))
        .unwrap();
    let _ = format!("{event:?}");
    assert_eq!(event.json::<u8>().unwrap_err().kind(), ErrorKind::Decode);
}

#[test]
fn time_is_written_in_utc_and_out_of_range_years_are_invalid() {
    let offset = time::UtcOffset::from_hms(1, 0, 30).unwrap();
    let local = time::OffsetDateTime::from_unix_timestamp(1_700_000_000)
        .unwrap()
        .to_offset(offset);
    let event = Event::builder("t").time(local).build().unwrap();
    let text = String::from_utf8(structured::to_vec(&event).unwrap()).unwrap();
    assert!(text.contains(r#""time":"2023-11-14T22:13:20Z""#), "{text}");
    assert_eq!(
        structured::from_slice(text.as_bytes()).unwrap().time(),
        Some(local)
    );

    let ancient = time::OffsetDateTime::from_unix_timestamp(-70_000_000_000).unwrap();
    let err = Event::builder("t").time(ancient).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidEvent);
}

#[test]
fn amqp_accepts_the_older_colon_prefix() {
    let headers = [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", "1"),
        ("cloudEvents:source", "/s"),
        ("cloudEvents:type", "t"),
    ];
    assert_eq!(Binding::AMQP.decode(headers, None).unwrap().id(), "1");
}

proptest! {
    #[test]
    fn any_content_type_is_safe(ct in "\\PC{1,12}", data in proptest::collection::vec(any::<u8>(), 0..16)) {
        let event = Event::builder("t").data(ct.as_str(), data).build().unwrap();
        let _ = format!("{event:?}");
        let json = structured::to_vec(&event).unwrap();
        prop_assert_eq!(&structured::from_slice(&json).unwrap(), &event);
        let mut headers = Vec::new();
        Binding::HTTP.write_headers(&event, |k, v| headers.push((k.to_owned(), v.to_owned())));
        let _ = Binding::HTTP.decode(headers, event.data().cloned());
    }
}

#[test]
fn time_is_written_as_the_general_rfc3339_formatter_writes_it() {
    use time::format_description::well_known::Rfc3339;
    let base = watchtower::codec::parse_time("2026-11-27T13:05:09Z").unwrap();
    let nanos = [
        0,
        1,
        7,
        10,
        100,
        1_000,
        500_000,
        100_000_000,
        120_000_000,
        123_456_789,
        999_999_999,
    ];
    for year in [0, 1, 999, 1970, 2026, 9999] {
        for nano in nanos {
            let time = base
                .replace_year(year)
                .and_then(|t| t.replace_nanosecond(nano))
                .unwrap();
            assert_eq!(
                watchtower::codec::format_time(time),
                time.format(&Rfc3339).unwrap(),
                "{time}"
            );
        }
    }
    // Other offsets are written in UTC.
    let offset = watchtower::codec::parse_time("2026-01-01T01:30:00.5+02:00").unwrap();
    assert_eq!(watchtower::codec::format_time(offset), "2025-12-31T23:30:00.5Z");
}
