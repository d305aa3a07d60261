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
//! # Limits
//!
//! Messages come from outside, so decoding costs time linear in the size of
//! the message (`n log n` in its number of extensions), and every decoder
//! refuses a message that exceeds its [`Limits`]: too many extensions, an
//! attribute or extension value too long, an extension name too long. The
//! plain functions ([`structured::from_slice`], [`structured::from_bytes`],
//! [`Binding::decode`]) apply [`Limits::default()`]; the `_with_limits`
//! variants take a transport's own. A refused message is an
//! [`ErrorKind::Decode`] error naming the limit, so a consumer treats it as
//! a poison message.
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

/// Caps on what a decoder accepts from one message, shared by every codec
/// and transport. See the [module docs](self#limits).
///
/// The defaults are far above what CloudEvents producers send (a dozen
/// extensions, values of a few hundred bytes) and low enough that a hostile
/// message costs microseconds to refuse.
///
/// ```
/// use watchtower::codec::{self, Limits};
/// use watchtower::ErrorKind;
///
/// let json = br#"{"specversion":"1.0","id":"1","type":"t","source":"/s","a":"1","b":"2"}"#;
/// let strict = Limits::default().max_extensions(1);
/// let err = codec::structured::from_slice_with_limits(json, strict).unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Decode);
/// assert!(err.message().contains("max_extensions"));
/// assert!(codec::structured::from_slice(json).is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    max_extensions: usize,
    max_value_len: usize,
    max_name_len: usize,
}

impl Limits {
    /// The default limits; see each setter.
    pub const fn new() -> Limits {
        Limits {
            max_extensions: 128,
            max_value_len: 64 * 1024,
            max_name_len: 64,
        }
    }

    /// At most `n` extension attributes in one message, repeated names
    /// counted each time they appear. Default 128: CloudEvents messages
    /// rarely carry more than a dozen and WatchTower itself adds at most
    /// eight (trace context, correlation id, attempt, the four dead-letter
    /// annotations), so a message that was fine stays fine after being
    /// dead-lettered.
    pub const fn max_extensions(mut self, n: usize) -> Limits {
        self.max_extensions = n;
        self
    }

    /// At most `bytes` in one attribute or extension value (`id`, `type`,
    /// `source`, `subject`, `dataschema`, `datacontenttype`, `time`, any
    /// extension; not the data, which the transport bounds). Default
    /// 64 KiB: URIs and trace state are a few hundred bytes, a
    /// `deadletterreason` carries a whole error message.
    pub const fn max_value_len(mut self, bytes: usize) -> Limits {
        self.max_value_len = bytes;
        self
    }

    /// At most `bytes` in one extension name. Default 64: the CloudEvents
    /// spec asks names to stay within 20 characters, and some producers do
    /// not.
    pub const fn max_name_len(mut self, bytes: usize) -> Limits {
        self.max_name_len = bytes;
        self
    }

    /// Refuses the `count`th extension if it is one too many.
    pub(crate) fn check_extension_count(&self, count: usize) -> Result<(), Error> {
        if count > self.max_extensions {
            return Err(Error::decode(format!(
                "more than {} extensions (Limits::max_extensions)",
                self.max_extensions
            )));
        }
        Ok(())
    }

    /// Refuses an extension name that is too long.
    pub(crate) fn check_name(&self, name: &str) -> Result<(), Error> {
        if name.len() > self.max_name_len {
            return Err(Error::decode(format!(
                "extension name of {} bytes is longer than {} (Limits::max_name_len)",
                name.len(),
                self.max_name_len
            )));
        }
        Ok(())
    }

    /// Refuses a value of attribute `attr` that is too long.
    pub(crate) fn check_value(&self, attr: &str, value: &str) -> Result<(), Error> {
        if value.len() > self.max_value_len {
            // Names are checked before values, so `attr` is short.
            return Err(Error::decode(format!(
                "value of {attr:?} is {} bytes, more than {} (Limits::max_value_len)",
                value.len(),
                self.max_value_len
            )));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new()
    }
}

/// Formats a `time` attribute as RFC 3339, in UTC.
///
/// Only a year outside 0–9999 cannot be written; [`Event::validate`]
/// refuses such events, and encoders validate first.
///
/// [`Event::validate`]: crate::Event::validate
pub fn format_time(time: OffsetDateTime) -> String {
    let mut out = Vec::with_capacity(30);
    write_time(&mut out, time);
    // ASCII digits and punctuation only.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes `time` as [`format_time`] formats it, at the end of `out`.
pub(crate) fn write_time(out: &mut Vec<u8>, time: OffsetDateTime) {
    let utc = time.to_offset(time::UtcOffset::UTC);
    match u32::try_from(utc.year()) {
        // Every encoder writes the time of every event: written by hand,
        // as the general formatter would, in a fraction of its time.
        Ok(year) if year < 10_000 => write_utc(
            out,
            year,
            u8::from(utc.month()),
            utc.day(),
            (utc.hour(), utc.minute(), utc.second()),
            utc.nanosecond(),
        ),
        _ => out.extend_from_slice(utc.format(&Rfc3339).unwrap_or_default().as_bytes()),
    }
}

/// The length of what [`write_time`] writes for `time`.
pub(crate) fn time_len(time: OffsetDateTime) -> usize {
    let utc = time.to_offset(time::UtcOffset::UTC);
    match u32::try_from(utc.year()) {
        // `YYYY-MM-DDTHH:MM:SS`, the fraction with its dot, `Z`.
        Ok(year) if year < 10_000 => {
            let (_, width) = fraction(utc.nanosecond());
            19 + if width == 0 { 0 } else { 1 + width as usize } + 1
        }
        _ => utc.format(&Rfc3339).map_or(0, |text| text.len()),
    }
}

/// Nanoseconds without their trailing zeros, and how many digits remain
/// (0 for none).
fn fraction(mut nanos: u32) -> (u32, u32) {
    if nanos == 0 {
        return (0, 0);
    }
    let mut width = 9;
    while nanos.is_multiple_of(10) {
        nanos /= 10;
        width -= 1;
    }
    (nanos, width)
}

/// A UTC time in RFC 3339: `Z`, the fraction without trailing zeros (none
/// when zero). `year` must be in 0..10_000, the other parts in their
/// calendar ranges.
fn write_utc(out: &mut Vec<u8>, year: u32, month: u8, day: u8, hms: (u8, u8, u8), nanos: u32) {
    fn push(out: &mut Vec<u8>, n: u32, width: u32) {
        let mut div = 10u32.pow(width - 1);
        while div > 0 {
            // A single decimal digit.
            out.push(b'0' + (n / div % 10) as u8);
            div /= 10;
        }
    }
    push(out, year, 4);
    out.push(b'-');
    push(out, u32::from(month), 2);
    out.push(b'-');
    push(out, u32::from(day), 2);
    out.push(b'T');
    push(out, u32::from(hms.0), 2);
    out.push(b':');
    push(out, u32::from(hms.1), 2);
    out.push(b':');
    push(out, u32::from(hms.2), 2);
    let (nanos, width) = fraction(nanos);
    if width != 0 {
        out.push(b'.');
        push(out, nanos, width);
    }
    out.push(b'Z');
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::{Binding, Limits, structured};
    use crate::event::tests::{comparisons, n_log_n_bound};
    use crate::{ErrorKind, Event};

    /// Extension occurrences in wire order: names `e<i>`, any order, some
    /// names repeated with another value.
    fn arb_occurrences() -> impl Strategy<Value = Vec<(String, String)>> {
        (0usize..3_000)
            .prop_flat_map(|n| {
                let order = Just((0..n).collect::<Vec<usize>>()).prop_shuffle();
                let repeats = proptest::collection::vec(0..n.max(1), 0..n / 8 + 1);
                (order, repeats, Just(n))
            })
            .prop_map(|(order, repeats, n)| {
                let mut occurrences: Vec<(String, String)> =
                    order.iter().map(|i| (format!("e{i}"), format!("v{i}"))).collect();
                if n > 0 {
                    for (k, i) in repeats.into_iter().enumerate() {
                        let at = (k * 7919) % (occurrences.len() + 1);
                        occurrences.insert(at, (format!("e{i}"), format!("w{k}")));
                    }
                }
                occurrences
            })
    }

    /// The event the occurrences describe: the last value of a name wins.
    fn expected(occurrences: &[(String, String)]) -> Event {
        let mut event = Event::empty("t").with_topic("t");
        event.set_time(None);
        event.set_id("1");
        event.set_source("/s");
        for (name, value) in occurrences {
            event.set_extension(name, value.as_str()).unwrap();
        }
        event
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn decoding_many_extensions_in_any_order_is_n_log_n_and_exact(occurrences in arb_occurrences()) {
            let count = occurrences.len();
            let expected = expected(&occurrences);
            let mut json = String::from(r#"{"specversion":"1.0","id":"1","type":"t","source":"/s""#);
            for (name, value) in &occurrences {
                json.push_str(&format!(r#","{name}":"{value}""#));
            }
            json.push('}');
            let bound = n_log_n_bound(count as u64);
            let raised = Limits::default().max_extensions(4_000);

            let mut decoded = None;
            let used = comparisons(|| decoded = Some(structured::from_slice_with_limits(json.as_bytes(), raised)));
            prop_assert!(used <= bound, "structured: {} comparisons for {} extensions", used, count);
            prop_assert_eq!(decoded.unwrap().unwrap(), expected.clone());
            match structured::from_bytes(&Bytes::from(json.clone())) {
                Ok(event) => {
                    prop_assert!(count <= 128);
                    prop_assert_eq!(event, expected.clone());
                }
                Err(e) => {
                    prop_assert!(count > 128, "{}", e);
                    prop_assert_eq!(e.kind(), ErrorKind::Decode);
                    prop_assert!(e.message().contains("max_extensions"), "{}", e);
                }
            }

            for binding in [Binding::NATS, Binding::HTTP, Binding::AMQP, Binding::REDIS] {
                let p = binding.prefix();
                let mut headers = vec![
                    (format!("{p}specversion"), "1.0".to_owned()),
                    (format!("{p}id"), "1".to_owned()),
                    (format!("{p}type"), "t".to_owned()),
                    (format!("{p}source"), "/s".to_owned()),
                ];
                headers.extend(occurrences.iter().map(|(k, v)| (format!("{p}{k}"), v.clone())));
                let mut decoded = None;
                let used = comparisons(|| decoded = Some(binding.decode_with_limits(headers.clone(), None, raised)));
                prop_assert!(used <= bound, "{}: {} comparisons for {} extensions", p, used, count);
                prop_assert_eq!(decoded.unwrap().unwrap(), expected.clone());
                match binding.decode(headers, None) {
                    Ok(event) => {
                        prop_assert!(count <= 128);
                        prop_assert_eq!(event, expected.clone());
                    }
                    Err(e) => {
                        prop_assert!(count > 128, "{}", e);
                        prop_assert_eq!(e.kind(), ErrorKind::Decode);
                    }
                }
            }
        }
    }
}
