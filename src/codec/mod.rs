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
    let utc = time.to_offset(time::UtcOffset::UTC);
    match u32::try_from(utc.year()) {
        // Every encoder writes the time of every event: written by hand,
        // as the general formatter would, in a fraction of its time.
        Ok(year) if year < 10_000 => format_utc(
            year,
            u8::from(utc.month()),
            utc.day(),
            (utc.hour(), utc.minute(), utc.second()),
            utc.nanosecond(),
        ),
        _ => utc.format(&Rfc3339).unwrap_or_default(),
    }
}

/// A UTC time in RFC 3339: `Z`, the fraction without trailing zeros (none
/// when zero). `year` must be in 0..10_000, the other parts in their
/// calendar ranges.
fn format_utc(year: u32, month: u8, day: u8, hms: (u8, u8, u8), nanos: u32) -> String {
    fn push(out: &mut String, n: u32, width: u32) {
        let mut div = 10u32.pow(width - 1);
        while div > 0 {
            // A single decimal digit.
            out.push(char::from(b'0' + (n / div % 10) as u8));
            div /= 10;
        }
    }
    let mut out = String::with_capacity(30);
    push(&mut out, year, 4);
    out.push('-');
    push(&mut out, u32::from(month), 2);
    out.push('-');
    push(&mut out, u32::from(day), 2);
    out.push('T');
    push(&mut out, u32::from(hms.0), 2);
    out.push(':');
    push(&mut out, u32::from(hms.1), 2);
    out.push(':');
    push(&mut out, u32::from(hms.2), 2);
    if nanos != 0 {
        let mut nanos = nanos;
        let mut width = 9;
        while nanos.is_multiple_of(10) {
            nanos /= 10;
            width -= 1;
        }
        out.push('.');
        push(&mut out, nanos, width);
    }
    out.push('Z');
    out
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
