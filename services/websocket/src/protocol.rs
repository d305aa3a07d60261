//! The wire protocol: CloudEvents JSON text frames plus a few control
//! messages (see the [crate docs](crate#wire-protocol)).

use serde::{Deserialize, Serialize};
use watchtower::codec::structured;
use watchtower::{Error, ErrorKind, Event};

/// The extension that carries an event's topic when it differs from its
/// type, so that routing survives the trip; removed again on receipt.
pub(crate) const TOPIC_EXTENSION: &str = "wttopic";

/// A control message. Serialised as a JSON object whose `wt` member names
/// the message; it never has a `specversion` member, which every event has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "wt", rename_all = "lowercase")]
pub(crate) enum Control {
    /// Client to hub: deliver events whose topic matches one of `patterns`;
    /// `id` names the subscription (the same id again replaces it).
    Subscribe { id: String, patterns: Vec<String> },
    /// Client to hub: drop the subscription `id`.
    Unsubscribe { id: String },
    /// Client to hub: settings for this connection.
    Options {
        #[serde(default)]
        acks: bool,
    },
    /// Hub to client: the subscription `id` is in place.
    Subscribed { id: String },
    /// Hub to client: the subscription `id` is gone.
    Unsubscribed { id: String },
    /// Hub to client, when acknowledgements are on: the event with this id
    /// was handled.
    Ack { id: String },
    /// Hub to client, when acknowledgements are on: the event with this id
    /// was not handled.
    Nack {
        id: String,
        #[serde(default)]
        message: String,
    },
    /// Either way: something went wrong. `re` names the subscription or
    /// event concerned, `count` how many events (for `dropped`).
    Error {
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        re: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    },
}

/// Error codes of [`Control::Error`].
pub(crate) mod code {
    pub(crate) const MALFORMED: &str = "malformed";
    pub(crate) const BINARY: &str = "binary";
    pub(crate) const TOO_LARGE: &str = "too_large";
    pub(crate) const INVALID_PATTERN: &str = "invalid_pattern";
    pub(crate) const UNSUPPORTED: &str = "unsupported";
    pub(crate) const DROPPED: &str = "dropped";
    pub(crate) const HANDLER: &str = "handler";
    pub(crate) const LIMIT: &str = "limit";
    pub(crate) const RATE_LIMITED: &str = "rate_limited";
    pub(crate) const FORBIDDEN: &str = "forbidden";
}

impl Control {
    pub(crate) fn error(code: &str, message: impl Into<String>) -> Control {
        Control::Error {
            code: code.to_owned(),
            message: message.into(),
            re: None,
            count: None,
        }
    }

    pub(crate) fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail; an empty object
        // would still be a harmless frame.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// What a text frame holds.
#[derive(Debug)]
pub(crate) enum Frame {
    Event(Event),
    Control(Control),
    Invalid(Error),
}

/// Classifies a text frame: an event if it decodes as CloudEvents JSON, a
/// control message if it is an object with `wt` and no `specversion`,
/// otherwise invalid.
pub(crate) fn classify(text: &str) -> Frame {
    let event_error = match structured::from_slice(text.as_bytes()) {
        Ok(event) => return Frame::Event(restore_topic(event)),
        Err(e) => e,
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Frame::Invalid(Error::from_source(ErrorKind::Decode, e)),
    };
    match value.as_object() {
        Some(o) if o.contains_key("specversion") => Frame::Invalid(event_error),
        Some(o) if o.contains_key("wt") => match serde_json::from_value(value) {
            Ok(control) => Frame::Control(control),
            Err(e) => Frame::Invalid(Error::new(
                ErrorKind::Decode,
                format!("not a known control message: {e}"),
            )),
        },
        _ => Frame::Invalid(Error::decode(
            "neither a CloudEvent (no specversion) nor a control message (no wt)",
        )),
    }
}

/// Encodes `event` for a text frame.
pub(crate) fn encode(event: &Event) -> Result<String, Error> {
    watchtower::delay::refuse(event, crate::SYSTEM)?;
    let bytes = if event.topic() != event.ty() {
        let mut routed = event.clone();
        routed.set_extension(TOPIC_EXTENSION, event.topic())?;
        structured::to_vec(&routed)?
    } else {
        structured::to_vec(event)?
    };
    String::from_utf8(bytes).map_err(|e| Error::from_source(ErrorKind::Encode, e))
}

fn restore_topic(mut event: Event) -> Event {
    if let Some(topic) = event.remove_extension(TOPIC_EXTENSION) {
        event.set_topic(topic);
    }
    event
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_never_look_like_events() {
        let messages = [
            Control::Subscribe {
                id: "1".into(),
                patterns: vec!["a.*".into()],
            },
            Control::Unsubscribe { id: "1".into() },
            Control::Options { acks: true },
            Control::Subscribed { id: "1".into() },
            Control::Unsubscribed { id: "1".into() },
            Control::Ack { id: "e".into() },
            Control::Nack {
                id: "e".into(),
                message: "no".into(),
            },
            Control::error(code::MALFORMED, "bad"),
        ];
        for m in messages {
            let text = m.to_text();
            assert!(!text.contains("specversion"), "{text}");
            match classify(&text) {
                Frame::Control(c) => assert_eq!(c, m),
                other => panic!("{text} classified as {other:?}"),
            }
        }
        assert_eq!(
            Control::Subscribe {
                id: "7".into(),
                patterns: vec!["user.>".into()]
            }
            .to_text(),
            r#"{"wt":"subscribe","id":"7","patterns":["user.>"]}"#
        );
    }

    #[test]
    fn events_keep_their_topic_and_bad_frames_are_invalid() {
        let event = Event::new("user.created", serde_json::json!({"a": 1})).with_topic("tenant.user");
        let text = encode(&event).unwrap();
        match classify(&text) {
            Frame::Event(e) => {
                assert_eq!(e, event);
                assert_eq!(e.topic(), "tenant.user");
                assert_eq!(e.extension(TOPIC_EXTENSION), None);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "not json",
            "[1,2]",
            r#"{"hello":1}"#,
            r#"{"wt":"nonsense"}"#,
            r#"{"specversion":"1.0","wt":"subscribe","id":"1","patterns":[]}"#,
        ] {
            assert!(matches!(classify(bad), Frame::Invalid(_)), "{bad}");
        }
    }
}
