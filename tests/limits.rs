//! Decoding limits: a message that carries more than the limits allow is
//! refused with a decode error naming the limit, by every codec, whatever
//! the order of its attributes.

use bytes::Bytes;
use watchtower::codec::{Binding, Limits, structured};
use watchtower::{Error, ErrorKind};

const BINDINGS: [(&str, Binding); 4] = [
    ("nats", Binding::NATS),
    ("http", Binding::HTTP),
    ("amqp", Binding::AMQP),
    ("redis", Binding::REDIS),
];

/// `n` extension names, `a000000`, `a000001`, ..., in ascending or
/// descending order.
fn names(n: usize, descending: bool) -> Vec<String> {
    let mut names: Vec<String> = (0..n).map(|i| format!("a{i:06}")).collect();
    if descending {
        names.reverse();
    }
    names
}

/// A structured event carrying `names` as extensions, in that order.
fn structured_with(names: &[String]) -> Vec<u8> {
    let mut json = String::from(r#"{"specversion":"1.0","id":"1","type":"t","source":"/s""#);
    for name in names {
        json.push_str(&format!(r#","{name}":"v""#));
    }
    json.push('}');
    json.into_bytes()
}

/// Binary-mode headers of `binding` carrying `names` as extensions.
fn headers_with(binding: Binding, names: &[String]) -> Vec<(String, String)> {
    let p = binding.prefix();
    let mut headers = vec![
        (format!("{p}specversion"), "1.0".to_owned()),
        (format!("{p}id"), "1".to_owned()),
        (format!("{p}type"), "t".to_owned()),
        (format!("{p}source"), "/s".to_owned()),
    ];
    headers.extend(names.iter().map(|name| (format!("{p}{name}"), "v".to_owned())));
    headers
}

fn assert_refused(result: Result<watchtower::Event, Error>, limit: &str, what: &str) {
    match result {
        Ok(event) => panic!(
            "{what}: decoded an event with {} extensions",
            event.extensions().len()
        ),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Decode, "{what}: {e}");
            assert!(e.message().contains(limit), "{what}: {e}");
        }
    }
}

#[test]
fn a_megabyte_of_100k_extensions_is_refused_in_either_order_by_every_codec() {
    for descending in [false, true] {
        let names = names(100_000, descending);
        let json = structured_with(&names);
        assert!(json.len() >= 1 << 20, "{} bytes", json.len());
        assert_refused(
            structured::from_slice(&json),
            "max_extensions",
            "structured::from_slice",
        );
        assert_refused(
            structured::from_bytes(&Bytes::from(json)),
            "max_extensions",
            "structured::from_bytes",
        );
        for (label, binding) in BINDINGS {
            let headers = headers_with(binding, &names);
            assert_refused(binding.decode(headers, None), "max_extensions", label);
        }
    }
}

#[test]
fn the_default_limit_is_128_extensions() {
    for (n, ok) in [(128, true), (129, false)] {
        let names = names(n, true);
        let json = structured_with(&names);
        assert_eq!(structured::from_slice(&json).is_ok(), ok, "{n} structured");
        let headers = headers_with(Binding::NATS, &names);
        assert_eq!(Binding::NATS.decode(headers, None).is_ok(), ok, "{n} nats");
    }
}

#[test]
fn raised_limits_decode_many_extensions_in_any_order() {
    let limits = Limits::default().max_extensions(10_000);
    for descending in [false, true] {
        let names = names(10_000, descending);
        let json = structured_with(&names);
        let event = structured::from_slice_with_limits(&json, limits).unwrap();
        assert_eq!(event.extensions().len(), 10_000);
        let sorted: Vec<&str> = event.extensions().map(|(k, _)| k).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        let shared = structured::from_bytes_with_limits(&Bytes::from(json), limits).unwrap();
        assert_eq!(shared, event);
        for (label, binding) in BINDINGS {
            let headers = headers_with(binding, &names);
            let back = binding.decode_with_limits(headers, None, limits).unwrap();
            assert_eq!(back, event, "{label}");
        }
    }
}

#[test]
fn null_extensions_count_against_the_limit_too() {
    let mut json = String::from(r#"{"specversion":"1.0","id":"1","type":"t","source":"/s""#);
    for i in 0..200 {
        json.push_str(&format!(r#","n{i}":null"#));
    }
    json.push('}');
    assert_refused(structured::from_slice(json.as_bytes()), "max_extensions", "nulls");
}

#[test]
fn repeated_names_count_each_time_and_the_last_value_wins() {
    let limits = Limits::default().max_extensions(3);
    let json = br#"{"specversion":"1.0","id":"1","type":"t","source":"/s","a":"1","b":"2","a":"3"}"#;
    let event = structured::from_slice_with_limits(json, limits).unwrap();
    assert_eq!(event.extension("a"), Some("3"));
    assert_eq!(event.extension("b"), Some("2"));
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-type", "t"),
        ("ce-source", "/s"),
        ("ce-a", "1"),
        ("ce-b", "2"),
        ("ce-a", "3"),
    ];
    let back = Binding::NATS.decode_with_limits(headers, None, limits).unwrap();
    assert_eq!(back, event);
    let strict = limits.max_extensions(2);
    assert_refused(
        structured::from_slice_with_limits(json, strict),
        "max_extensions",
        "structured",
    );
    assert_refused(
        Binding::NATS.decode_with_limits(headers, None, strict),
        "max_extensions",
        "nats",
    );
}

#[test]
fn long_values_and_long_names_are_refused_by_every_codec() {
    let limits = Limits::default().max_value_len(16).max_name_len(8);
    let long_value = "x".repeat(17);
    let long_name = "n".repeat(9);
    for (attr, value, limit) in [
        ("id", long_value.as_str(), "max_value_len"),
        ("subject", long_value.as_str(), "max_value_len"),
        ("ext", long_value.as_str(), "max_value_len"),
        (long_name.as_str(), "v", "max_name_len"),
    ] {
        let mut fields = vec![("id", "1"), ("type", "t"), ("source", "/s")];
        fields.retain(|(k, _)| *k != attr);
        fields.push((attr, value));
        let mut json = String::from(r#"{"specversion":"1.0""#);
        for (k, v) in &fields {
            json.push_str(&format!(r#","{k}":"{v}""#));
        }
        json.push('}');
        assert_refused(
            structured::from_slice_with_limits(json.as_bytes(), limits),
            limit,
            &format!("structured {attr}"),
        );
        for (label, binding) in BINDINGS {
            let p = binding.prefix();
            let mut headers = vec![(format!("{p}specversion"), "1.0".to_owned())];
            headers.extend(fields.iter().map(|(k, v)| (format!("{p}{k}"), (*v).to_owned())));
            assert_refused(
                binding.decode_with_limits(headers, None, limits),
                limit,
                &format!("{label} {attr}"),
            );
        }
    }
    // Within the limits, the same shapes decode.
    let json = br#"{"specversion":"1.0","id":"1","type":"t","source":"/s","nnnnnnnn":"xxxxxxxxxxxxxxxx"}"#;
    assert!(structured::from_slice_with_limits(json, limits).is_ok());
}

/// The payload is not an attribute value: binary data larger than
/// `max_value_len` round-trips in structured mode (as `data_base64`), as
/// JSON data does (as `data`).
#[test]
fn large_binary_payload_is_not_an_attribute_value() {
    let limits = Limits::default().max_value_len(1024);
    let payload: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
    let event = watchtower::Event::binary("t", "application/octet-stream", Bytes::from(payload));
    let json = structured::to_vec(&event).unwrap();
    assert_eq!(structured::from_slice_with_limits(&json, limits).unwrap(), event);
    let long_subject = watchtower::Event::builder("t")
        .subject("s".repeat(2000))
        .build()
        .unwrap();
    let json = structured::to_vec(&long_subject).unwrap();
    assert_refused(
        structured::from_slice_with_limits(&json, limits),
        "max_value_len",
        "subject",
    );
}
