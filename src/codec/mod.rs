//! CloudEvents encodings: the JSON format (structured mode) and the
//! attribute ↔ header mapping that transports share for binary mode.
//!
//! * [`structured`] writes and reads `application/cloudevents+json`: `data`
//!   inline for JSON content types, `data_base64` otherwise; a missing
//!   `datacontenttype` means JSON.
//! * [`Binding`] maps attributes to headers for binary mode: NATS and HTTP
//!   use `ce-` headers, AMQP `cloudEvents_` headers with the `content-type`
//!   property, Redis Streams one field per attribute.
//!
//! Decoding never panics: any byte string or header map either yields a
//! valid [`Event`](crate::Event) or an [`ErrorKind::Decode`] error.
//!
//! # Example
//!
//! ```
//! use watchtower::{codec, Event};
//!
//! let event = Event::new("user.created", serde_json::json!({"user_id": 123}));
//! let json = codec::structured::to_vec(&event)?;
//! assert_eq!(codec::structured::from_slice(&json)?, event);
//!
//! let mut headers = Vec::new();
//! codec::Binding::NATS.write_headers(&event, |name, value| {
//!     headers.push((name.to_owned(), value.to_owned()))
//! });
//! assert!(headers.contains(&("ce-type".to_owned(), "user.created".to_owned())));
//! let back = codec::Binding::NATS.decode(headers, event.data().cloned())?;
//! assert_eq!(back, event);
//! # Ok::<(), watchtower::Error>(())
//! ```

pub mod structured;

mod binary;

pub use binary::Binding;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, ErrorKind};

/// The media type of a structured-mode CloudEvents JSON message.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Formats a `time` attribute as RFC 3339, in UTC.
///
/// Only a year outside 0–9999 cannot be written; [`Event::validate`]
/// refuses such events, and encoders validate first.
///
/// [`Event::validate`]: crate::Event::validate
pub fn format_time(time: OffsetDateTime) -> String {
    time.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Parses an RFC 3339 `time` attribute.
///
/// # Errors
///
/// [`ErrorKind::Decode`] if `value` is not an RFC 3339 timestamp.
pub fn parse_time(value: &str) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|_| Error::new(ErrorKind::Decode, format!("`time` {value:?} is not RFC 3339")))
}

/// Whether a content type says the message is in structured mode.
pub fn is_structured(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .eq_ignore_ascii_case(CLOUDEVENTS_JSON)
}
