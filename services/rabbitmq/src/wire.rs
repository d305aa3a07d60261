//! CloudEvents on AMQP 0-9-1, in either [`ContentMode`]: structured (the
//! event as CloudEvents JSON in the body, `content-type:
//! application/cloudevents+json`) or binary (attributes as `cloudEvents_*`
//! headers, the `content-type` property for `datacontenttype`, data as the
//! body). Both set `message-id` = event id and `timestamp` from `time`.
//! Both are read, whatever the publisher's mode.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use watchtower::codec::{self, Binding};
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event, RawMessage};

use crate::config::{ContentMode, PublishOptions, millis};

/// The AMQP properties and body that carry `event` in `mode`.
pub(crate) fn encode(
    event: &Event,
    options: &PublishOptions,
    mode: ContentMode,
) -> Result<(BasicProperties, Bytes), Error> {
    // Delayed events are routed to a delay queue first, losing the mark
    // (`publisher::delay`); a request cannot be delayed.
    watchtower::delay::refuse(event, "rabbitmq")?;
    match mode {
        ContentMode::Structured => {
            let body = codec::structured::to_bytes(event)?;
            let props = common(
                event,
                options,
                BasicProperties::default().with_content_type(ShortString::from(codec::CLOUDEVENTS_JSON)),
            );
            Ok((props, body))
        }
        ContentMode::Binary => {
            let props = properties(event, options)?;
            Ok((props, event.data().cloned().unwrap_or_default()))
        }
    }
}

/// The properties both modes set: delivery mode, `message-id`, `timestamp`
/// and `expiration`.
fn common(event: &Event, options: &PublishOptions, mut props: BasicProperties) -> BasicProperties {
    props = props.with_delivery_mode(if options.persistent { 2 } else { 1 });
    if let Ok(id) = ShortString::try_new(event.id()) {
        props = props.with_message_id(id);
    }
    if let Some(time) = event.time()
        && let Ok(secs) = u64::try_from(time.unix_timestamp())
    {
        props = props.with_timestamp(secs);
    }
    // A reply: AMQP requesters match on the property.
    if let Some(correlation) = event.extension(ext::CORRELATION_ID)
        && let Ok(correlation) = ShortString::try_new(correlation)
    {
        props = props.with_correlation_id(correlation);
    }
    if let Some(ttl) = options.message_ttl {
        props = props.with_expiration(millis(ttl).to_string().into());
    }
    props
}

/// The AMQP properties that carry `event` in binary mode.
fn properties(event: &Event, options: &PublishOptions) -> Result<BasicProperties, Error> {
    let mut headers = FieldTable::default();
    let mut content_type: Option<Result<ShortString, String>> = None;
    let mut bad_name = None;
    Binding::AMQP.write_headers(event, |name, value| {
        if name == "content-type" {
            content_type = Some(ShortString::try_new(value).map_err(|_| value.to_owned()));
            return;
        }
        match ShortString::try_new(name) {
            Ok(key) => {
                headers.insert(key, AMQPValue::LongString(value.as_bytes().into()));
            }
            Err(_) => bad_name = Some(name.chars().take(64).collect::<String>()),
        }
    });
    if let Some(name) = bad_name {
        return Err(Error::new(
            ErrorKind::Encode,
            format!("header {name:?}... is longer than 255 bytes"),
        ));
    }
    let mut props = BasicProperties::default();
    match content_type {
        Some(Ok(ct)) => props = props.with_content_type(ct),
        // Too long for the property: the attribute header carries it.
        Some(Err(ct)) => {
            headers.insert(
                "cloudEvents_datacontenttype".into(),
                AMQPValue::LongString(ct.into_bytes().into()),
            );
        }
        None => {}
    }
    Ok(common(event, options, props).with_headers(headers))
}

/// A received message: the event or why it is poison, the raw message for
/// the poison path, and the broker's delivery count if it keeps one.
pub(crate) struct Decoded {
    pub(crate) event: Result<Event, Error>,
    pub(crate) delivery_count: Option<u32>,
}

/// Decodes a message's properties and body; `routing_key` becomes the
/// event's topic.
pub(crate) fn decode(routing_key: &str, properties: &BasicProperties, body: Bytes) -> (Decoded, RawMessage) {
    let mut raw_headers: Vec<(String, Bytes)> = Vec::new();
    let mut delivery_count = None;
    let mut death = None;
    if let Some(table) = properties.headers() {
        for (key, value) in table.inner() {
            match key.as_str() {
                "x-delivery-count" => delivery_count = as_u64(value),
                "x-death" => death = first_death(value),
                _ => {}
            }
            if let Some(text) = as_text(value) {
                raw_headers.push((key.as_str().to_owned(), text));
            }
        }
    }
    if let Some(ct) = properties.content_type() {
        raw_headers.push((
            "content-type".to_owned(),
            Bytes::copy_from_slice(ct.as_str().as_bytes()),
        ));
    }
    let structured = properties
        .content_type()
        .as_ref()
        .is_some_and(|ct| codec::is_structured(ct.as_str()));
    let event = if structured {
        codec::structured::from_bytes(&body)
    } else {
        Binding::AMQP.decode(
            raw_headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
            Some(body.clone()),
        )
    };
    let event = event.map(|mut event| {
        if !routing_key.is_empty() {
            event.set_topic(routing_key);
        }
        // A delayed event leaves its delay queue by expiring there: it is
        // on time, not a dead letter.
        if let Some(death) = death
            && !death
                .queue
                .as_deref()
                .is_some_and(|q| q.starts_with(crate::publisher::DELAY_QUEUE_PREFIX))
        {
            annotate_death(&mut event, death);
        }
        // A request: the broker's address for its reply (direct reply-to
        // rewrites the requester's) is where a responder answers.
        if let Some(reply_to) = properties.reply_to() {
            let _ = event.set_extension(ext::REPLY_TO, reply_to.as_str());
        }
        event
    });
    let decoded = Decoded {
        event,
        delivery_count: delivery_count.map(|n| u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX)),
    };
    let raw = RawMessage {
        topic: routing_key.into(),
        headers: raw_headers,
        body,
    };
    (decoded, raw)
}

struct Death {
    reason: Option<String>,
    queue: Option<String>,
    routing_key: Option<String>,
}

fn first_death(value: &AMQPValue) -> Option<Death> {
    let AMQPValue::FieldArray(array) = value else {
        return None;
    };
    let AMQPValue::FieldTable(table) = array.as_slice().first()? else {
        return None;
    };
    let get = |name: &str| {
        table
            .inner()
            .get(name)
            .and_then(as_text)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let routing_key = match table.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys
            .as_slice()
            .first()
            .and_then(as_text)
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        _ => None,
    };
    Some(Death {
        reason: get("reason"),
        queue: get("queue"),
        routing_key,
    })
}

/// Makes the broker's dead-lettering visible to the dead-letter tooling as
/// the `deadletter*` extensions, unless the event already carries them.
fn annotate_death(event: &mut Event, death: Death) {
    if event.extension(ext::DEAD_LETTER_REASON).is_none() {
        let reason = match (&death.reason, &death.queue) {
            (Some(reason), Some(queue)) => format!("rabbitmq: {reason} in queue {queue}"),
            (Some(reason), None) => format!("rabbitmq: {reason}"),
            _ => "rabbitmq: dead-lettered".to_owned(),
        };
        let _ = event.set_extension(ext::DEAD_LETTER_REASON, reason);
        if let Some(reason) = death.reason {
            let _ = event.set_extension(ext::DEAD_LETTER_KIND, reason);
        }
    }
    if event.extension(ext::DEAD_LETTER_TOPIC).is_none()
        && let Some(key) = death.routing_key
    {
        let _ = event.set_extension(ext::DEAD_LETTER_TOPIC, key);
    }
}

fn as_u64(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

/// A header value as text, as other clients may send attributes typed.
fn as_text(value: &AMQPValue) -> Option<Bytes> {
    let text = match value {
        AMQPValue::LongString(s) => return Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ShortString(s) => return Some(Bytes::copy_from_slice(s.as_str().as_bytes())),
        AMQPValue::ByteArray(b) => return Some(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(secs) => {
            let time = time::OffsetDateTime::from_unix_timestamp(i64::try_from(*secs).ok()?).ok()?;
            codec::format_time(time)
        }
        other => as_i128(other)?.to_string(),
    };
    Some(Bytes::from(text))
}

fn as_i128(value: &AMQPValue) -> Option<i128> {
    Some(match *value {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n.into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_attribute() {
        let event = Event::builder("user.created")
            .subject("42")
            .extension("correlationid", "c-1")
            .json(&serde_json::json!({"user_id": 42}))
            .unwrap()
            .build()
            .unwrap();
        let props = properties(&event, &PublishOptions::new()).unwrap();
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some(event.id()));
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        let headers = props.headers().as_ref().unwrap();
        assert!(headers.contains_key("cloudEvents_type"));
        assert!(headers.contains_key("cloudEvents_correlationid"));
        let (decoded, _) = decode("user.created", &props, event.data().cloned().unwrap());
        assert_eq!(decoded.event.unwrap(), event);
        assert_eq!(decoded.delivery_count, None);
    }

    #[test]
    fn structured_mode_has_no_header_table_and_round_trips() {
        let event = Event::builder("user.created")
            .subject("42")
            .extension("correlationid", "c-1")
            .json(&serde_json::json!({"user_id": 42}))
            .unwrap()
            .build()
            .unwrap();
        let options = PublishOptions::new().message_ttl(std::time::Duration::from_secs(2));
        let (props, body) = encode(&event, &options, ContentMode::Structured).unwrap();
        assert_eq!(props.headers(), &None);
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/cloudevents+json")
        );
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some(event.id()));
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.expiration().as_ref().map(|s| s.as_str()), Some("2000"));
        assert_eq!(body, codec::structured::to_bytes(&event).unwrap());
        let (decoded, raw) = decode("user.created", &props, body.clone());
        assert_eq!(decoded.event.unwrap(), event);
        assert_eq!(raw.body, body);

        let (props, body) = encode(&event, &options, ContentMode::Binary).unwrap();
        assert!(props.headers().as_ref().unwrap().contains_key("cloudEvents_id"));
        assert_eq!(Some(&body), event.data());
        assert_eq!(decode("user.created", &props, body).0.event.unwrap(), event);
    }

    #[test]
    fn content_type_too_long_for_the_property_goes_in_a_header() {
        let long = format!("application/x.{}", "a".repeat(300));
        let event = Event::builder("user.created")
            .data(long.clone(), Bytes::from_static(b"payload"))
            .build()
            .unwrap();
        let props = properties(&event, &PublishOptions::new()).unwrap();
        assert_eq!(props.content_type(), &None);
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("cloudEvents_datacontenttype"),
            Some(&AMQPValue::LongString(long.as_bytes().into()))
        );
        let (decoded, _) = decode("user.created", &props, Bytes::from_static(b"payload"));
        assert_eq!(decoded.event.unwrap().datacontenttype(), Some(long.as_str()));
    }

    #[test]
    fn garbage_is_poison_with_raw_bytes() {
        let props = BasicProperties::default().with_content_type("application/cloudevents+json".into());
        let (decoded, raw) = decode("a.b", &props, Bytes::from_static(b"\xff\x00garbage"));
        assert_eq!(decoded.event.unwrap_err().kind(), ErrorKind::Decode);
        assert_eq!(&raw.body[..], b"\xff\x00garbage");
        assert_eq!(&*raw.topic, "a.b");
        let (decoded, _) = decode("a.b", &BasicProperties::default(), Bytes::from_static(b"{}"));
        assert_eq!(decoded.event.unwrap_err().kind(), ErrorKind::Decode);
    }

    #[test]
    fn quorum_count_and_death_are_read() {
        let event = Event::new("order.placed", serde_json::json!({}));
        let props = properties(&event, &PublishOptions::new()).unwrap();
        let mut headers = props.headers().clone().unwrap();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
        death.insert("queue".into(), AMQPValue::LongString("q".into()));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("order.placed".into())].into()),
        );
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        let props = props.with_headers(headers);
        let (decoded, _) = decode("dlq-key", &props, event.data().cloned().unwrap());
        assert_eq!(decoded.delivery_count, Some(4));
        let got = decoded.event.unwrap();
        assert_eq!(got.extension(ext::DEAD_LETTER_KIND), Some("delivery_limit"));
        assert_eq!(got.extension(ext::DEAD_LETTER_TOPIC), Some("order.placed"));
        assert_eq!(got.topic(), "dlq-key");
    }
}
