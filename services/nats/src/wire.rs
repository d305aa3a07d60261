//! CloudEvents on NATS messages: structured or binary mode out, both in.

use std::str::FromStr;
use std::sync::Arc;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Bytes, BytesMut};
use watchtower::codec::{self, Binding};
use watchtower::{Error, ErrorKind, Event, Poison, RawMessage};

/// The header JetStream deduplicates on.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

// Header names built once: a `HeaderName` made from a static string holds
// no allocation, and cloning one copies a pointer.
const SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const ID: HeaderName = HeaderName::from_static("ce-id");
const TYPE: HeaderName = HeaderName::from_static("ce-type");
const SOURCE: HeaderName = HeaderName::from_static("ce-source");
const TIME: HeaderName = HeaderName::from_static("ce-time");
const SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const DATASCHEMA: HeaderName = HeaderName::from_static("ce-dataschema");
const DATACONTENTTYPE: HeaderName = HeaderName::from_static("ce-datacontenttype");
const TRACEPARENT: HeaderName = HeaderName::from_static("ce-traceparent");
const NATS_MSG_ID: HeaderName = HeaderName::from_static(MSG_ID);
const NATS_EXPECTED_STREAM: HeaderName = HeaderName::from_static("Nats-Expected-Stream");

/// Extension header names a publisher keeps, at most.
const CACHED_EXTENSIONS: usize = 16;

/// Header maps a publisher keeps as templates, at most.
const TEMPLATES: usize = 8;

/// With every template slot taken, one unmatched event in this many
/// replaces a template (a publisher whose events keep changing type or
/// source does not pay for a copy each time).
const TEMPLATE_TURNOVER: u32 = 16;

/// How a publisher writes an event on a NATS message. Receivers read both
/// modes, whichever a publisher uses.
///
/// Set with [`NatsPublisher::content_mode`](crate::NatsPublisher::content_mode)
/// and [`JetStreamPublisher::content_mode`](crate::JetStreamPublisher::content_mode).
/// See the [crate docs](crate#wire-format) for why structured mode is the
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The whole event as one CloudEvents JSON object in the body, a JSON
    /// payload spliced in as is (`"data"`), any other as `"data_base64"`.
    /// No header on core NATS; on JetStream only `Nats-Msg-Id` (and
    /// `Nats-Expected-Stream` when set). The default: the CloudEvents NATS
    /// binding's original mode, what the CloudEvents Go SDK sends on core
    /// NATS, and the fastest by far with async-nats, whose header maps cost
    /// a few allocations per header on both ends.
    #[default]
    Structured,
    /// Attributes as `ce-` headers (`ce-id`, `ce-type`, `ce-source`,
    /// `ce-time`, `ce-datacontenttype`, extensions as `ce-<name>`), the
    /// payload alone as the body: for consumers that route or filter on
    /// headers without reading the body.
    Binary,
}

/// An encoded event: the headers (none at all in structured mode on core
/// NATS) and the body.
pub(crate) struct Encoded {
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) body: Bytes,
}

/// Encodes events in one [`ContentMode`], keeping what repeats between a
/// publisher's events.
#[derive(Clone, Default)]
pub(crate) struct Encoder {
    pub(crate) mode: ContentMode,
    headers: HeaderEncoder,
    bodies: Bodies,
}

/// Where a publisher's structured bodies are written: one scratch buffer,
/// reused, and blocks that many bodies share, so that a body costs neither
/// an allocation of its own here nor a free of its own on the connection's
/// thread, which drops it once written (a body keeps its block alive until
/// then).
#[derive(Default)]
struct Bodies {
    scratch: Vec<u8>,
    block: BytesMut,
}

/// The size of a block of bodies.
const BLOCK: usize = 16 * 1024;

impl Bodies {
    fn encode(&mut self, event: &Event) -> Result<Bytes, Error> {
        self.scratch.clear();
        codec::structured::write(event, &mut self.scratch)?;
        if self.scratch.len() > BLOCK / 4 {
            // A large body gets its own allocation, leaving the block for
            // small ones.
            return Ok(Bytes::copy_from_slice(&self.scratch));
        }
        if self.block.capacity() < self.scratch.len() {
            self.block = BytesMut::with_capacity(BLOCK);
        }
        self.block.extend_from_slice(&self.scratch);
        Ok(self.block.split().freeze())
    }
}

impl Clone for Bodies {
    /// A copy starts with buffers of its own.
    fn clone(&self) -> Self {
        Bodies::default()
    }
}

impl Encoder {
    /// `event` on the wire, with `Nats-Msg-Id` (the event id) when `msg_id`
    /// is set and `Nats-Expected-Stream` when `expected_stream` is.
    pub(crate) fn encode(
        &mut self,
        event: &Event,
        msg_id: bool,
        expected_stream: Option<&str>,
    ) -> Result<Encoded, Error> {
        watchtower::delay::refuse(event, "nats")?;
        match self.mode {
            ContentMode::Structured => {
                let body = self.bodies.encode(event)?;
                let headers = if msg_id || expected_stream.is_some() {
                    Some(stream_headers(event, msg_id, expected_stream)?)
                } else {
                    None
                };
                Ok(Encoded { headers, body })
            }
            ContentMode::Binary => Ok(Encoded {
                headers: Some(self.headers.headers(event, msg_id, expected_stream)?),
                body: event.data().cloned().unwrap_or_default(),
            }),
        }
    }
}

/// Only the JetStream headers: `Nats-Msg-Id` and `Nats-Expected-Stream`.
fn stream_headers(event: &Event, msg_id: bool, expected_stream: Option<&str>) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    if msg_id {
        map.insert(NATS_MSG_ID, value(&NATS_MSG_ID, event.id())?);
    }
    if let Some(stream) = expected_stream {
        map.insert(NATS_EXPECTED_STREAM, value(&NATS_EXPECTED_STREAM, stream)?);
    }
    Ok(map)
}

/// Writes events as `ce-` headers, the same as
/// [`Binding::NATS`](watchtower::codec::Binding::NATS) does, with the work
/// that repeats from event to event done once per publisher:
///
/// * header names are built once (constants, and a small cache of
///   `ce-<extension>` names);
/// * the headers that usually stay the same across a publisher's events
///   (`ce-specversion`, `ce-type`, `ce-source`, `ce-datacontenttype` and
///   `Nats-Expected-Stream`) are kept as a ready header map, a template,
///   keyed by exactly those values. An event whose values match copies the
///   template (no hashing: the table and, per header, a `Vec` and a
///   `String`, the least async-nats' `HeaderMap` allows) and adds its own
///   headers; any other event gets a map built from its own values.
#[derive(Clone, Default)]
pub(crate) struct HeaderEncoder {
    /// `ce-<name>` for extension names seen before.
    extensions: Vec<(Box<str>, HeaderName)>,
    templates: Vec<Template>,
    /// Unmatched events since the last template was replaced.
    misses: u32,
    /// The slot the next replacement takes.
    next: usize,
}

#[derive(Clone)]
struct Template {
    ty: Box<str>,
    source: Box<str>,
    content_type: Option<Box<str>>,
    expected_stream: Option<Box<str>>,
    map: HeaderMap,
}

impl Template {
    fn matches(&self, event: &Event, expected_stream: Option<&str>) -> bool {
        *self.ty == *event.ty()
            && *self.source == *event.source()
            && self.content_type.as_deref() == event.datacontenttype()
            && self.expected_stream.as_deref() == expected_stream
    }
}

impl HeaderEncoder {
    /// The `ce-` headers of `event`, plus `Nats-Msg-Id` (the event id) when
    /// `msg_id` is set and `Nats-Expected-Stream` when `expected_stream` is.
    pub(crate) fn headers(
        &mut self,
        event: &Event,
        msg_id: bool,
        expected_stream: Option<&str>,
    ) -> Result<HeaderMap, Error> {
        let mut map = self.base(event, expected_stream)?;
        map.insert(ID, value(&ID, event.id())?);
        if let Some(time) = event.time() {
            map.insert(TIME, HeaderValue::from(codec::format_time(time)));
        }
        if let Some(subject) = event.subject() {
            map.insert(SUBJECT, value(&SUBJECT, subject)?);
        }
        if let Some(schema) = event.dataschema() {
            map.insert(DATASCHEMA, value(&DATASCHEMA, schema)?);
        }
        for (name, text) in event.extensions() {
            let name = self.extension_name(name)?;
            let text = value(&name, text)?;
            map.insert(name, text);
        }
        if msg_id {
            map.insert(NATS_MSG_ID, value(&NATS_MSG_ID, event.id())?);
        }
        Ok(map)
    }

    /// The headers that usually repeat: a copy of the matching template, or
    /// built from `event` (and kept as a template when there is room).
    fn base(&mut self, event: &Event, expected_stream: Option<&str>) -> Result<HeaderMap, Error> {
        if let Some(template) = self.templates.iter().find(|t| t.matches(event, expected_stream)) {
            return Ok(template.map.clone());
        }
        let mut map = HeaderMap::new();
        map.insert(SPECVERSION, HeaderValue::from(event.specversion()));
        map.insert(TYPE, value(&TYPE, event.ty())?);
        map.insert(SOURCE, value(&SOURCE, event.source())?);
        if let Some(ct) = event.datacontenttype() {
            map.insert(DATACONTENTTYPE, value(&DATACONTENTTYPE, ct)?);
        }
        if let Some(stream) = expected_stream {
            map.insert(NATS_EXPECTED_STREAM, value(&NATS_EXPECTED_STREAM, stream)?);
        }
        let keep = self.templates.len() < TEMPLATES || {
            self.misses += 1;
            self.misses >= TEMPLATE_TURNOVER
        };
        if keep {
            let template = Template {
                ty: event.ty().into(),
                source: event.source().into(),
                content_type: event.datacontenttype().map(Into::into),
                expected_stream: expected_stream.map(Into::into),
                map: map.clone(),
            };
            if self.templates.len() < TEMPLATES {
                self.templates.push(template);
            } else {
                self.templates[self.next] = template;
                self.next = (self.next + 1) % TEMPLATES;
                self.misses = 0;
            }
        }
        Ok(map)
    }

    fn extension_name(&mut self, name: &str) -> Result<HeaderName, Error> {
        if name == "traceparent" {
            return Ok(TRACEPARENT);
        }
        if let Some((_, header)) = self.extensions.iter().find(|(known, _)| **known == *name) {
            return Ok(header.clone());
        }
        let mut text = String::with_capacity(3 + name.len());
        text.push_str("ce-");
        text.push_str(name);
        let header = HeaderName::from_str(&text).map_err(|_| {
            Error::new(
                ErrorKind::Encode,
                format!("{text:?} is not a valid NATS header name"),
            )
        })?;
        if self.extensions.len() < CACHED_EXTENSIONS {
            self.extensions.push((name.into(), header.clone()));
        }
        Ok(header)
    }
}

fn value(name: &HeaderName, text: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(text).map_err(|_| {
        Error::new(
            ErrorKind::Encode,
            format!(
                "attribute {:?} holds a character NATS headers cannot carry",
                name.as_ref() as &str
            ),
        )
    })
}

/// The last subject a subscription received on, kept so that deliveries on
/// one subject (the usual case) share one topic string instead of copying
/// it each time.
#[derive(Default)]
pub(crate) struct TopicCache {
    last: Option<Arc<str>>,
}

impl TopicCache {
    pub(crate) fn get(&mut self, subject: &str) -> Arc<str> {
        match &self.last {
            Some(topic) if **topic == *subject => topic.clone(),
            _ => {
                let topic: Arc<str> = Arc::from(subject);
                self.last = Some(topic.clone());
                topic
            }
        }
    }
}

/// Decodes a received message: structured mode when its `Content-Type`
/// says so, binary mode when it has `ce-` headers, and structured mode for
/// a header-less JSON body (what most clients write).
pub(crate) fn decode(subject: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Result<Event, Poison> {
    // One pass over the headers: the content type, and whether any is `ce-`.
    let mut content_type = None;
    let mut has_ce = false;
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let name: &str = name.as_ref();
        if name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-")) {
            has_ce = true;
        } else if content_type.is_none() && name.eq_ignore_ascii_case("content-type") {
            content_type = values.first();
        }
    }
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

    /// Bodies written into shared blocks stay each their own: many small
    /// ones across several blocks, a large one beside them, a copy of the
    /// encoder with buffers of its own, and a refused event that leaves
    /// nothing behind.
    #[test]
    fn bodies_sharing_blocks_are_each_intact() {
        let mut encoder = Encoder::default();
        let events: Vec<Event> = (0..500)
            .map(|i| {
                Event::new(
                    "order.placed",
                    serde_json::json!({"n": i, "pad": "x".repeat(i % 50)}),
                )
            })
            .collect();
        let large = Event::new("order.large", serde_json::json!({"pad": "y".repeat(3 * BLOCK)}));
        let mut bodies: Vec<Bytes> = events
            .iter()
            .map(|e| encoder.encode(e, false, None).unwrap().body)
            .collect();
        let mut copy = encoder.clone();
        bodies.push(copy.encode(&large, false, None).unwrap().body);
        let mut bad = Event::new("order.placed", serde_json::json!({}));
        bad.set_source("");
        let refused = encoder.encode(&bad, false, None).err().map(|e| e.kind());
        assert_eq!(refused, Some(ErrorKind::InvalidEvent));
        bodies.push(encoder.encode(&events[0], false, None).unwrap().body);
        for (body, event) in bodies.iter().zip(events.iter().chain([&large, &events[0]])) {
            assert_eq!(body, &codec::structured::to_bytes(event).unwrap());
        }
        assert_eq!(bodies.len(), 502);
    }

    #[test]
    fn binary_round_trip() {
        let event = Event::builder("user.created")
            .subject("42")
            .extension("tenant", "acme")
            .json(&serde_json::json!({"id": 42}))
            .and_then(|b| b.build())
            .unwrap();
        let map = HeaderEncoder::default().headers(&event, true, None).unwrap();
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
    fn structured_mode_writes_no_header_on_core_and_only_stream_headers_on_jetstream() {
        let event = Event::builder("order.paid")
            .extension("tenant", "acme")
            .json(&serde_json::json!({"n": 1}))
            .and_then(|b| b.build())
            .unwrap();
        let mut encoder = Encoder::default();
        assert_eq!(encoder.mode, ContentMode::Structured);
        let core = encoder.encode(&event, false, None).unwrap();
        assert!(core.headers.is_none());
        assert_eq!(core.body, codec::structured::to_bytes(&event).unwrap());
        let back = decode("order.paid", None, core.body).unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(back, event);

        let js = encoder.encode(&event, true, Some("ORDERS")).unwrap();
        let headers = js.headers.unwrap();
        let mut names: Vec<String> = headers.iter().map(|(k, _)| k.to_string()).collect();
        names.sort();
        assert_eq!(names, ["Nats-Expected-Stream", "Nats-Msg-Id"]);
        assert_eq!(headers.get(MSG_ID).map(|v| v.as_str()), Some(event.id()));
        let back = decode("order.paid", Some(&headers), js.body).unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(back, event);
    }

    #[test]
    fn binary_mode_writes_ce_headers_and_the_bare_payload() {
        let event = Event::new("order.paid", serde_json::json!({"n": 1}));
        let mut encoder = Encoder {
            mode: ContentMode::Binary,
            ..Encoder::default()
        };
        let encoded = encoder.encode(&event, false, None).unwrap();
        let headers = encoded.headers.unwrap();
        assert_eq!(headers.get("ce-id").map(|v| v.as_str()), Some(event.id()));
        assert!(headers.get(MSG_ID).is_none());
        assert_eq!(Some(&encoded.body), event.data());
        let back =
            decode("order.paid", Some(&headers), encoded.body).unwrap_or_else(|p| panic!("{}", p.error));
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
        let err = HeaderEncoder::default()
            .headers(&event, false, None)
            .err()
            .unwrap_or_else(|| panic!("encoded"));
        assert_eq!(err.kind(), ErrorKind::Encode);
    }

    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = map
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (AsRef::<str>::as_ref(name).to_owned(), v.as_str().to_owned()))
            })
            .collect();
        pairs.sort();
        pairs
    }

    fn decoded(map: &HeaderMap, event: &Event) -> Event {
        decode("t", Some(map), event.data().cloned().unwrap_or_default())
            .unwrap_or_else(|p| panic!("{}", p.error))
    }

    #[test]
    fn encoder_writes_what_the_core_binding_writes() {
        let time = codec::parse_time("2026-03-04T05:06:07.123456780Z").unwrap();
        let event = Event::builder("order.paid")
            .source("/billing")
            .time(time)
            .subject("o-17")
            .dataschema("https://example.com/schema")
            .extension("tenant", "acme")
            .extension(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .data("text/plain", "hello")
            .build()
            .unwrap();
        let mut expected = Vec::new();
        Binding::NATS.write_headers(&event, |name, value| {
            expected.push((name.to_owned(), value.to_owned()))
        });
        expected.sort();
        let map = HeaderEncoder::default().headers(&event, false, None).unwrap();
        assert_eq!(pairs(&map), expected);
        assert_eq!(
            map.get("ce-time").map(|v| v.as_str()),
            Some("2026-03-04T05:06:07.12345678Z")
        );
        assert_eq!(map.get(MSG_ID), None);
        assert_eq!(map.get("Nats-Expected-Stream"), None);

        let js = HeaderEncoder::default()
            .headers(&event, true, Some("ORDERS"))
            .unwrap();
        assert_eq!(js.get(MSG_ID).map(|v| v.as_str()), Some(event.id()));
        assert_eq!(js.get("Nats-Expected-Stream").map(|v| v.as_str()), Some("ORDERS"));
        assert_eq!(js.len(), map.len() + 2);
    }

    #[test]
    fn one_encoder_gives_each_event_exactly_its_own_headers() {
        let mut encoder = HeaderEncoder::default();
        let a = Event::builder("user.created")
            .source("/a")
            .subject("1")
            .extension("tenant", "acme")
            .extension("region", "eu")
            .json(&serde_json::json!({"n": 1}))
            .and_then(|b| b.build())
            .unwrap();
        let b = Event::builder("user.deleted")
            .source("/b")
            .no_time()
            .extension("tenant", "globex")
            .extension("shard", "7")
            .data("application/octet-stream", Bytes::from_static(b"\x00\x01"))
            .build()
            .unwrap();
        let c = Event::empty("user.seen");
        // Interleaved, and each twice, so that cached names serve later events.
        for event in [&a, &b, &c, &b, &a, &c] {
            let map = encoder.headers(event, false, None).unwrap();
            assert_eq!(&decoded(&map, event), event);
            let mut expected = Vec::new();
            Binding::NATS.write_headers(event, |name, value| {
                expected.push((name.to_owned(), value.to_owned()))
            });
            expected.sort();
            assert_eq!(pairs(&map), expected);
        }
        let map = encoder.headers(&b, false, None).unwrap();
        assert_eq!(map.get("ce-region"), None);
        assert_eq!(map.get("ce-subject"), None);
        assert_eq!(map.get("ce-time"), None);
        assert_eq!(map.get("ce-tenant").map(|v| v.as_str()), Some("globex"));
    }

    fn core_pairs(event: &Event) -> Vec<(String, String)> {
        let mut expected = Vec::new();
        Binding::NATS.write_headers(event, |name, value| {
            expected.push((name.to_owned(), value.to_owned()))
        });
        expected.sort();
        expected
    }

    #[test]
    fn templates_only_serve_events_with_the_same_repeated_values() {
        let mut encoder = HeaderEncoder::default();
        let base = || Event::builder("same.type").source("/one");
        let events = [
            base().build().unwrap(),
            base().source("/two").build().unwrap(),
            base().data("text/plain", "x").build().unwrap(),
            base().data("text/csv", "x").build().unwrap(),
            Event::builder("other.type").source("/one").build().unwrap(),
            Event::empty("same.type"),
        ];
        for round in 0..3 {
            for event in &events {
                let map = encoder.headers(event, false, None).unwrap();
                assert_eq!(pairs(&map), core_pairs(event), "round {round}");
                assert_eq!(&decoded(&map, event), event);
            }
        }
        // The expected stream is part of a template's key too.
        let event = &events[0];
        let plain = encoder.headers(event, true, None).unwrap();
        assert_eq!(plain.get("Nats-Expected-Stream"), None);
        let a = encoder.headers(event, true, Some("A")).unwrap();
        let b = encoder.headers(event, true, Some("B")).unwrap();
        assert_eq!(a.get("Nats-Expected-Stream").map(|v| v.as_str()), Some("A"));
        assert_eq!(b.get("Nats-Expected-Stream").map(|v| v.as_str()), Some("B"));
        assert_eq!(encoder.headers(event, true, None).unwrap(), plain);
    }

    #[test]
    fn many_kinds_of_event_turn_templates_over_and_stay_correct() {
        let mut encoder = HeaderEncoder::default();
        let events: Vec<Event> = (0..40)
            .map(|i| {
                Event::builder(format!("kind.{i}"))
                    .source(format!("/s{}", i % 3))
                    .build()
                    .unwrap()
            })
            .collect();
        for _ in 0..5 {
            for event in &events {
                let map = encoder.headers(event, false, None).unwrap();
                assert_eq!(pairs(&map), core_pairs(event));
            }
        }
        assert_eq!(encoder.templates.len(), TEMPLATES);
        // Replaced along the way, not frozen at the first eight kinds.
        assert!(
            encoder
                .templates
                .iter()
                .any(|t| !(0..TEMPLATES).any(|i| *t.ty == *format!("kind.{i}")))
        );
    }

    #[test]
    fn extension_names_beyond_the_cache_are_still_written() {
        let mut builder = Event::builder("many.ext");
        for i in 0..(CACHED_EXTENSIONS + 8) {
            builder = builder.extension(&format!("x{i}"), format!("v{i}"));
        }
        let event = builder.build().unwrap();
        let mut encoder = HeaderEncoder::default();
        for _ in 0..2 {
            let map = encoder.headers(&event, false, None).unwrap();
            assert_eq!(&decoded(&map, &event), &event);
            assert_eq!(map.get("ce-x23").map(|v| v.as_str()), Some("v23"));
        }
        assert_eq!(encoder.extensions.len(), CACHED_EXTENSIONS);
    }

    #[test]
    fn times_are_formatted_as_the_codec_formats_them() {
        let base = codec::parse_time("2026-11-27T13:05:09Z").unwrap();
        let nanos = [
            0,
            1,
            10,
            100,
            1_000,
            999_999_999,
            100_000_000,
            120_000_000,
            123_456_789,
            500_000,
            7,
        ];
        let years = [0, 1, 999, 1970, 2026, 9999];
        for year in years {
            for nano in nanos {
                let time = base
                    .replace_year(year)
                    .and_then(|t| t.replace_nanosecond(nano))
                    .unwrap();
                let event = Event::builder("t").time(time).build().unwrap();
                let map = HeaderEncoder::default().headers(&event, false, None).unwrap();
                assert_eq!(
                    map.get("ce-time").map(|v| v.as_str().to_owned()),
                    Some(codec::format_time(time)),
                    "{time}"
                );
            }
        }
        // Other offsets go through the codec, converted to UTC.
        let offset = codec::parse_time("2026-01-01T01:30:00.5+02:00").unwrap();
        let event = Event::builder("t").time(offset).build().unwrap();
        let map = HeaderEncoder::default().headers(&event, false, None).unwrap();
        assert_eq!(
            map.get("ce-time").map(|v| v.as_str()),
            Some("2025-12-31T23:30:00.5Z")
        );
        assert_eq!(decoded(&map, &event).time(), Some(offset));
    }

    #[test]
    fn topic_cache_shares_one_string_per_subject() {
        let mut topics = TopicCache::default();
        let a = topics.get("a.b");
        let again = topics.get("a.b");
        assert!(Arc::ptr_eq(&a, &again));
        let other = topics.get("a.c");
        assert_eq!(&*other, "a.c");
        assert_eq!(&*topics.get("a.b"), "a.b");
    }
}
