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
    let (year, month, day) = utc.to_calendar_date();
    match u32::try_from(year) {
        // Every encoder writes the time of every event: written by hand,
        // as the general formatter would, in a fraction of its time.
        Ok(year) if year < 10_000 => {
            let (hour, minute, second, nanos) = utc.to_hms_nano();
            write_utc(out, year, u8::from(month), day, (hour, minute, second), nanos);
        }
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
    /// Writes the `N` lowest decimal digits of `n` into `at`.
    fn digits<const N: usize>(at: &mut [u8], mut n: u32) {
        for slot in at[..N].iter_mut().rev() {
            // A single decimal digit.
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    digits::<4>(&mut text[0..], year);
    digits::<2>(&mut text[5..], u32::from(month));
    digits::<2>(&mut text[8..], u32::from(day));
    digits::<2>(&mut text[11..], u32::from(hms.0));
    digits::<2>(&mut text[14..], u32::from(hms.1));
    digits::<2>(&mut text[17..], u32::from(hms.2));
    let (nanos, width) = fraction(nanos);
    if width == 0 {
        out.extend_from_slice(&text[..19]);
    } else {
        let width = width as usize;
        let mut n = nanos;
        for slot in text[20..20 + width].iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&text[..20 + width]);
    }
    out.push(b'Z');
}

/// Parses an RFC 3339 `time` attribute.
///
/// # Errors
///
/// [`ErrorKind::Decode`] if `value` is not an RFC 3339 timestamp.
pub fn parse_time(value: &str) -> Result<OffsetDateTime, Error> {
    if let Some(time) = parse_utc(value.as_bytes()) {
        return Ok(time);
    }
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|_| Error::new(ErrorKind::Decode, format!("`time` {value:?} is not RFC 3339")))
}

/// What every encoder writes, `YYYY-MM-DDTHH:MM:SS[.F]Z` with one to nine
/// digits of fraction and a second below 60, read by hand; `None` for
/// anything else, which the general parser then reads (or refuses), so
/// both agree on every input.
fn parse_utc(b: &[u8]) -> Option<OffsetDateTime> {
    fn number(digits: &[u8]) -> Option<u32> {
        digits.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    }
    let (b'Z', head) = b.split_last()? else {
        return None;
    };
    if head.len() < 19 || [head[4], head[7], head[10], head[13], head[16]] != *b"--T::" {
        return None;
    }
    let nanos = match &head[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let field = |at: usize, len: usize| number(&head[at..at + len]);
    let (second, minute, hour) = (field(17, 2)?, field(14, 2)?, field(11, 2)?);
    if second >= 60 {
        // A leap second: the general parser's rules apply.
        return None;
    }
    let month = time::Month::try_from(u8::try_from(field(5, 2)?).ok()?).ok()?;
    let year = i32::try_from(field(0, 4)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, u8::try_from(field(8, 2)?).ok()?).ok()?;
    let time = time::Time::from_hms_nano(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        u8::try_from(second).ok()?,
        nanos,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc())
}

/// The attributes whose values repeat from one event to the next, which
/// decoders share through [`intern`].
#[derive(Clone, Copy)]
pub(crate) enum Interned {
    Type,
    Source,
    ContentType,
}

thread_local! {
    /// The last value decoded on this thread for each [`Interned`] attribute.
    static LAST: std::cell::RefCell<[Option<std::sync::Arc<str>>; 3]> =
        const { std::cell::RefCell::new([None, None, None]) };
}

/// `value` as a shared string: the one decoded last on this thread for
/// `attr` when it is the same (a consumer's events mostly share their type,
/// source and content type), else a new one, kept for next time.
pub(crate) fn intern(attr: Interned, value: &str) -> std::sync::Arc<str> {
    LAST.try_with(|last| {
        let mut last = last.try_borrow_mut().ok()?;
        let slot = &mut last[attr as usize];
        match slot {
            Some(kept) if **kept == *value => Some(kept.clone()),
            _ => {
                let fresh = std::sync::Arc::<str>::from(value);
                *slot = Some(fresh.clone());
                Some(fresh)
            }
        }
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| std::sync::Arc::from(value))
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

    /// A UTC timestamp in the shape encoders write, with any digits: valid
    /// or not as a date.
    fn arb_utc_text() -> impl Strategy<Value = String> {
        (
            0u32..10_000,
            0u32..14,
            0u32..33,
            0u32..26,
            0u32..61,
            0u32..62,
            proptest::option::of("[0-9]{1,11}"),
        )
            .prop_map(|(y, mo, d, h, mi, s, fraction)| {
                let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{fraction}Z")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        /// The hand-written reading of the encoders' shape and the general
        /// RFC 3339 parser agree on every such text, valid date or not.
        #[test]
        fn utc_times_read_by_hand_as_the_general_parser_reads_them(text in arb_utc_text()) {
            let general = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).ok();
            prop_assert_eq!(super::parse_time(&text).ok(), general, "{}", text);
        }

        /// Any time from year 0 to 9999, at any offset, is written as the
        /// general formatter writes it in UTC, and reads back the same.
        #[test]
        fn times_are_written_as_the_general_formatter_writes_them(
            seconds in -62_167_219_200i64..253_402_300_799,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000, Just(999_999_999), Just(100_000_000)],
            offset in -86_399i32..86_399,
        ) {
            let utc = time::OffsetDateTime::from_unix_timestamp(seconds).unwrap().replace_nanosecond(nanos).unwrap();
            let at = utc.to_offset(time::UtcOffset::from_whole_seconds(offset).unwrap());
            let text = super::format_time(at);
            prop_assert_eq!(&text, &utc.format(&time::format_description::well_known::Rfc3339).unwrap());
            prop_assert_eq!(text.len(), super::time_len(at));
            prop_assert_eq!(super::parse_time(&text).unwrap(), utc);
        }

        /// Whatever the text, `parse_time` gives what the general parser
        /// gives.
        #[test]
        fn any_text_parses_as_the_general_parser_parses_it(text in "[0-9TZz:.+-]{0,40}") {
            let general = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).ok();
            prop_assert_eq!(super::parse_time(&text).ok(), general, "{}", text);
        }
    }

    #[test]
    fn times_at_the_edges_parse_as_the_general_parser_parses_them() {
        for text in [
            "2024-02-29T23:59:59.999999999Z",
            "2023-02-29T00:00:00Z",
            "2025-12-31T23:59:60Z",
            "2025-06-30T23:59:60.5Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2025-01-01T24:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-00-10T00:00:00Z",
            "2025-01-01T00:00:00.Z",
            "2025-01-01T00:00:00.1234567891Z",
            "2025-01-01t00:00:00z",
            "2025-01-01T00:00:00+02:00",
            "2025-01-01T00:00:00.5-00:30",
            "2025-01-01 00:00:00Z",
            "+2025-01-01T00:00:00Z",
            "2025-1-01T00:00:00Z",
            "Z",
            "",
        ] {
            let general =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok();
            assert_eq!(super::parse_time(text).ok(), general, "{text}");
        }
        let t = super::parse_time("2024-02-29T23:59:59.000000001Z").unwrap();
        assert_eq!(
            (t.year(), t.day(), t.nanosecond(), t.offset()),
            (2024, 29, 1, time::UtcOffset::UTC)
        );
    }

    /// Events decoded one after another on a thread share the strings of a
    /// repeated type, source and content type, and a changed value is
    /// decoded as itself, in both modes.
    #[test]
    fn repeated_attribute_values_are_shared_and_changed_ones_are_exact() {
        let json = |ty: &str, source: &str, ct: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"1","type":"{ty}","source":"{source}","datacontenttype":"{ct}","data":{{}}}}"#
            )
        };
        let a = structured::from_slice(json("a.b", "/s", "application/json").as_bytes()).unwrap();
        let b = structured::from_slice(json("a.b", "/s", "application/json").as_bytes()).unwrap();
        assert_eq!(a.ty().as_ptr(), b.ty().as_ptr());
        assert_eq!(a.source().as_ptr(), b.source().as_ptr());
        assert_eq!(
            a.datacontenttype().unwrap().as_ptr(),
            b.datacontenttype().unwrap().as_ptr()
        );
        let c = structured::from_slice(json("a.c", "/s", "text/json").as_bytes()).unwrap();
        assert_eq!(
            (c.ty(), c.source(), c.datacontenttype()),
            ("a.c", "/s", Some("text/json"))
        );
        assert_ne!(a.ty().as_ptr(), c.ty().as_ptr());
        let headers = |ty: &str| {
            vec![
                ("ce-specversion", "1.0".to_owned()),
                ("ce-id", "2".to_owned()),
                ("ce-type", ty.to_owned()),
                ("ce-source", "/s".to_owned()),
            ]
        };
        let d = Binding::NATS.decode(headers("a.c"), None).unwrap();
        let e = Binding::NATS.decode(headers("a.d"), None).unwrap();
        assert_eq!(d.ty().as_ptr(), c.ty().as_ptr());
        assert_eq!((d.ty(), e.ty(), e.source()), ("a.c", "a.d", "/s"));
        assert_eq!(d.source().as_ptr(), c.source().as_ptr());
    }
}
