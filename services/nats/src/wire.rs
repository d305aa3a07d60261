//! CloudEvents on NATS messages: binary mode out, binary or structured in.

use std::str::FromStr;
use std::sync::Arc;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use watchtower::codec::{self, Binding};
use watchtower::{Error, ErrorKind, Event, Poison, RawMessage};

/// The header JetStream deduplicates on.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

const STATIC_NAMES: [&str; 9] = [
    "ce-specversion",
    "ce-id",
    "ce-type",
    "ce-source",
    "ce-time",
    "ce-subject",
    "ce-dataschema",
    "ce-datacontenttype",
    "ce-traceparent",
];

fn header_name(name: &str) -> Result<HeaderName, Error> {
    // Interned names skip an allocation and a validation per header.
    for known in STATIC_NAMES {
        if known == name {
            return Ok(HeaderName::from_static(known));
        }
    }
    HeaderName::from_str(name).map_err(|_| {
        Error::new(
            ErrorKind::Encode,
            format!("{name:?} is not a valid NATS header name"),
        )
    })
}

/// The `ce-` headers of `event`, plus `Nats-Msg-Id` when `msg_id` is set.
pub(crate) fn headers(event: &Event, msg_id: bool) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    let mut failed = None;
    Binding::NATS.write_headers(event, |name, value| {
        if failed.is_some() {
            return;
        }
        let value = match HeaderValue::from_str(value) {
            Ok(value) => value,
            Err(_) => {
                failed = Some(Error::new(
                    ErrorKind::Encode,
                    format!("attribute {name:?} holds a character NATS headers cannot carry"),
                ));
                return;
            }
        };
        match header_name(name) {
            Ok(name) => map.insert(name, value),
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if msg_id {
        map.insert(HeaderName::from_static(MSG_ID), HeaderValue::from(event.id()));
    }
    Ok(map)
}

/// Decodes a received message: structured mode when its `Content-Type`
/// says so, binary mode when it has `ce-` headers, and structured mode for
/// a header-less JSON body (what most clients write).
pub(crate) fn decode(subject: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Result<Event, Poison> {
    let content_type = headers.and_then(|h| {
        h.iter()
            .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case("content-type"))
            .and_then(|(_, values)| values.first())
    });
    let has_ce = headers.is_some_and(|h| {
        h.iter().any(|(name, _)| {
            AsRef::<str>::as_ref(name)
                .get(..3)
                .is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
        })
    });
    let result = if content_type.is_some_and(|ct| codec::is_structured(ct.as_str())) {
        codec::structured::from_bytes(&payload)
    } else if has_ce {
        let pairs = headers
            .into_iter()
            .flat_map(|h| h.iter())
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (AsRef::<str>::as_ref(name), v.as_str()))
            });
        Binding::NATS.decode(pairs, Some(payload.clone()))
    } else if payload.first() == Some(&b'{') {
        codec::structured::from_bytes(&payload)
    } else {
        Err(Error::decode(
            "not a CloudEvent: no ce- headers and no application/cloudevents+json content type",
        ))
    };
    result.map_err(|error| {
        let error = if error.kind() == ErrorKind::Decode {
            error
        } else {
            Error::decode(error.message().to_owned())
        };
        Poison::new(raw(subject, headers, payload), error)
    })
}

fn raw(subject: &str, headers: Option<&HeaderMap>, body: Bytes) -> RawMessage {
    let headers = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            values.iter().map(move |v| {
                (
                    AsRef::<str>::as_ref(name).to_owned(),
                    Bytes::copy_from_slice(v.as_str().as_bytes()),
                )
            })
        })
        .collect();
    RawMessage {
        topic: Arc::from(subject),
        headers,
        body,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn binary_round_trip() {
        let event = Event::builder("user.created")
            .subject("42")
            .extension("tenant", "acme")
            .json(&serde_json::json!({"id": 42}))
            .and_then(|b| b.build())
            .unwrap();
        let map = headers(&event, true).unwrap();
        assert_eq!(map.get("ce-type").map(|v| v.as_str()), Some("user.created"));
        assert_eq!(map.get("ce-tenant").map(|v| v.as_str()), Some("acme"));
        assert_eq!(map.get(MSG_ID).map(|v| v.as_str()), Some(event.id()));
        let back = decode(
            "user.created",
            Some(&map),
            event.data().cloned().unwrap_or_default(),
        )
        .unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(back, event);
    }

    #[test]
    fn structured_with_and_without_content_type() {
        let event = Event::new("order.paid", serde_json::json!({"n": 1}));
        let body = codec::structured::to_bytes(&event).unwrap();
        let mut map = HeaderMap::new();
        map.insert("Content-Type", codec::CLOUDEVENTS_JSON);
        let back = decode("x", Some(&map), body.clone()).unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(back, event);
        let back = decode("x", None, body).unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(back, event);
    }

    #[test]
    fn garbage_is_poison_with_raw_bytes() {
        let mut map = HeaderMap::new();
        map.insert("x-other", "1");
        let poison = decode("a.b", Some(&map), Bytes::from_static(b"\xff\x00garbage"))
            .err()
            .unwrap_or_else(|| panic!("garbage decoded"));
        assert_eq!(poison.error.kind(), ErrorKind::Decode);
        assert_eq!(&*poison.raw.topic, "a.b");
        assert_eq!(poison.raw.body, Bytes::from_static(b"\xff\x00garbage"));
        assert_eq!(
            poison.raw.headers,
            vec![("x-other".to_owned(), Bytes::from_static(b"1"))]
        );

        let mut missing = HeaderMap::new();
        missing.insert("ce-specversion", "1.0");
        missing.insert("ce-id", "1");
        let poison = decode("a.b", Some(&missing), Bytes::new())
            .err()
            .unwrap_or_else(|| panic!("event without type decoded"));
        assert!(poison.error.message().contains("type"), "{}", poison.error);

        let poison = decode("a.b", None, Bytes::from_static(b"{not json"))
            .err()
            .unwrap_or_else(|| panic!("bad json decoded"));
        assert_eq!(poison.error.kind(), ErrorKind::Decode);
    }

    #[test]
    fn newline_in_attribute_is_an_encode_error() {
        let event = Event::builder("a.b").subject("line\r\nbreak").build().unwrap();
        let err = headers(&event, false).err().unwrap_or_else(|| panic!("encoded"));
        assert_eq!(err.kind(), ErrorKind::Encode);
    }
}
