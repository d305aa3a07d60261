//! The CloudEvents JSON format (structured mode), both ways.
//!
//! Decoding reads the envelope encoders write (string attributes and
//! extensions without escapes, `data` any JSON value) by hand, and any
//! other JSON object with `serde_json`: both give the same event, or the
//! same error, for every input. Decoded events share their `type`,
//! `source` and `datacontenttype` strings with the event decoded before
//! them on the same thread when those are equal, as a consumer's events
//! mostly are.
//!
//! ```
//! use watchtower::{codec::structured, Event};
//!
//! let event = Event::binary("image.stored", "image/png", &b"\x89PNG"[..]);
//! let json = structured::to_vec(&event)?;
//! let text = std::str::from_utf8(&json).unwrap();
//! assert!(text.contains(r#""data_base64":"iVBORw==""#));
//! assert_eq!(structured::from_slice(&json)?, event);
//! # Ok::<(), watchtower::Error>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Interned, Limits, intern, parse_time, time_len, write_time};
use crate::error::{Error, ErrorKind};
use crate::event::{Event, Inner, extension_map, is_json_content_type, validate_extension_name};

/// Encodes `event` as CloudEvents JSON.
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] if the event breaks the CloudEvents rules.
pub fn to_vec(event: &Event) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    write(event, &mut out)?;
    Ok(out)
}

/// Appends `event`, as CloudEvents JSON, to `out`: for a publisher that
/// keeps one buffer for all its events instead of allocating one for each.
/// On error `out` is left as it was.
///
/// ```
/// use watchtower::{codec::structured, Event};
///
/// let mut buf = Vec::new();
/// for n in 0..3 {
///     buf.clear();
///     structured::write(&Event::new("order.placed", serde_json::json!({"n": n})), &mut buf)?;
///     assert_eq!(structured::from_slice(&buf)?.ty(), "order.placed");
/// }
/// # Ok::<(), watchtower::Error>(())
/// ```
///
/// # Errors
///
/// As [`to_vec`].
pub fn write(event: &Event, out: &mut Vec<u8>) -> Result<(), Error> {
    event.validate()?;
    // Whether the payload goes inline as `data`, decided once: it may take
    // a parse of the payload.
    let inline = event
        .data()
        .map(|data| event.is_json() && &data[..] != b"null" && (event.data_is_json() || is_exact_json(data)));
    out.reserve(encoded_len(event, inline));
    out.extend_from_slice(HEAD);
    write_str(out, event.id());
    out.extend_from_slice(TYPE);
    write_str(out, event.ty());
    out.extend_from_slice(SOURCE);
    write_str(out, event.source());
    if let Some(time) = event.time() {
        out.extend_from_slice(TIME);
        out.push(b'"');
        write_time(out, time);
        out.push(b'"');
    }
    for (name, value) in optional_attributes(event) {
        if let Some(value) = value {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            write_str(out, value);
        }
    }
    for (name, value) in event.extensions() {
        out.push(b',');
        write_str(out, name);
        out.push(b':');
        write_str(out, value);
    }
    if let (Some(data), Some(inline)) = (event.data(), inline) {
        if inline {
            out.extend_from_slice(DATA);
            out.extend_from_slice(data);
        } else {
            out.extend_from_slice(DATA_BASE64);
            let start = out.len();
            let len = base64::encoded_len(data.len(), true).unwrap_or(0);
            out.resize(start + len, 0);
            let written = BASE64.encode_slice(data, &mut out[start..]).unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
    }
    out.push(b'}');
    Ok(())
}

const HEAD: &[u8] = br#"{"specversion":"1.0","id":"#;
const TYPE: &[u8] = br#","type":"#;
const SOURCE: &[u8] = br#","source":"#;
const TIME: &[u8] = br#","time":"#;
const DATA: &[u8] = br#","data":"#;
const DATA_BASE64: &[u8] = br#","data_base64":""#;

fn optional_attributes(event: &Event) -> [(&'static str, Option<&str>); 3] {
    [
        ("subject", event.subject()),
        ("datacontenttype", event.datacontenttype()),
        ("dataschema", event.dataschema()),
    ]
}

/// Encodes `event` as CloudEvents JSON into [`Bytes`].
///
/// # Errors
///
/// As [`to_vec`].
pub fn to_bytes(event: &Event) -> Result<Bytes, Error> {
    to_vec(event).map(Bytes::from)
}

/// Decodes CloudEvents JSON, copying the payload out of `input`, within
/// the default [`Limits`].
///
/// # Errors
///
/// [`ErrorKind::Decode`] if `input` is not a valid CloudEvents 1.0 JSON
/// object (malformed JSON, missing or empty `id`/`source`/`type`, another
/// `specversion`, a bad `time`, bad `data_base64`, an invalid extension
/// name or value) or exceeds a limit.
pub fn from_slice(input: &[u8]) -> Result<Event, Error> {
    decode(input, None, Limits::new())
}

/// As [`from_slice`], within `limits`.
///
/// # Errors
///
/// As [`from_slice`].
pub fn from_slice_with_limits(input: &[u8], limits: Limits) -> Result<Event, Error> {
    decode(input, None, limits)
}

/// Decodes CloudEvents JSON within the default [`Limits`]; the payload
/// shares `input`'s memory when it is inline JSON.
///
/// # Errors
///
/// As [`from_slice`].
pub fn from_bytes(input: &Bytes) -> Result<Event, Error> {
    decode(input, Some(input), Limits::new())
}

/// As [`from_bytes`], within `limits`.
///
/// # Errors
///
/// As [`from_slice`].
pub fn from_bytes_with_limits(input: &Bytes, limits: Limits) -> Result<Event, Error> {
    decode(input, Some(input), limits)
}

fn decode(input: &[u8], shared: Option<&Bytes>, limits: Limits) -> Result<Event, Error> {
    match std::str::from_utf8(input)
        .ok()
        .and_then(|text| scan(text, limits))
    {
        Some(wire) => wire.into_event(shared),
        None => parse(input, shared, limits),
    }
}

/// [`from_slice`] through the general parser alone, for the fuzzer to
/// compare both readings.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn from_slice_by_serde(input: &[u8]) -> Result<Event, Error> {
    parse(input, None, Limits::new())
}

/// Decodes with `serde_json`, any valid JSON, naming what is wrong.
fn parse(input: &[u8], shared: Option<&Bytes>, limits: Limits) -> Result<Event, Error> {
    let mut de = serde_json::Deserializer::from_slice(input);
    let mut refused = None;
    let wire = de
        .deserialize_map(WireVisitor {
            limits,
            refused: &mut refused,
        })
        .and_then(|wire| de.end().map(|()| wire));
    let wire = match (wire, refused) {
        (Ok(wire), _) => wire,
        // A limit stopped the parse: say which, not where.
        (Err(_), Some(refused)) => return Err(refused),
        (Err(e), None) => {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("invalid CloudEvents JSON: {e}"),
            ));
        }
    };
    wire.into_event(shared)
}

/// Reads the envelope every encoder writes, by hand: an object whose keys
/// and string values have no escapes, attributes and extensions as
/// strings, `data` any JSON value (read by `serde_json`). `None` for
/// anything else, including input over a limit, which the general parser
/// then reads, or refuses with the error it names; where this returns a
/// `Wire`, the general parser returns the same.
fn scan(text: &str, limits: Limits) -> Option<Wire<'_>> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(b, at + 1);
    let mut wire = Wire::default();
    let mut extensions_seen = 0;
    if b.get(at) == Some(&b'}') {
        return (skip_ws(b, at + 1) == b.len()).then_some(wire);
    }
    loop {
        let (key, next) = plain_str(text, at)?;
        at = skip_ws(b, next);
        if b.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(b, at + 1);
        if key == "data" {
            let rest = &text[at..];
            let raw: &RawValue =
                de::Deserialize::deserialize(&mut serde_json::Deserializer::from_str(rest)).ok()?;
            let value = raw.get();
            at += value.as_ptr() as usize - rest.as_ptr() as usize + value.len();
            wire.data = (value != "null").then_some(raw);
        } else if let Some(slot) = wire.slot(key) {
            let (value, next) = plain_str(text, at)?;
            // `data_base64` is the payload, bounded by the transport.
            if key != "data_base64" {
                limits.check_value(key, value).ok()?;
            }
            *slot = Some(Cow::Borrowed(value));
            at = next;
        } else {
            extensions_seen += 1;
            limits.check_extension_count(extensions_seen).ok()?;
            limits.check_name(key).ok()?;
            let (value, next) = plain_str(text, at)?;
            limits.check_value(key, value).ok()?;
            wire.extensions.push((Cow::Borrowed(key), value.to_owned()));
            at = next;
        }
        at = skip_ws(b, at);
        match b.get(at) {
            Some(b',') => at = skip_ws(b, at + 1),
            Some(b'}') => return (skip_ws(b, at + 1) == b.len()).then_some(wire),
            _ => return None,
        }
    }
}

/// The index of the first byte at or after `at` that is not JSON
/// whitespace.
fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(at) {
        at += 1;
    }
    at
}

/// The JSON string starting at `at`, if it has no escapes and no control
/// characters, and the index after its closing quote.
fn plain_str(text: &str, at: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let end = start + plain_len(&b[start..]);
    // A quote ends it; an escape, a control character or the end of the
    // input is left to the general parser.
    (b.get(end) == Some(&b'"')).then(|| (&text[start..end], end + 1))
}

/// How many bytes at the start of `b` a JSON string holds as they are:
/// the index of the first quote, backslash or control character, or the
/// length of `b` when it has none.
fn plain_len(b: &[u8]) -> usize {
    // Eight bytes at a time: the first such byte is found in the word that
    // holds it; the last few bytes one by one.
    let mut chunks = b.chunks_exact(8);
    let mut from = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        match ends_string(u64::from_le_bytes(word)) {
            0 => from += 8,
            found => return from + (found.trailing_zeros() / 8) as usize,
        }
    }
    let rest = chunks.remainder();
    from + rest
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(rest.len())
}

/// The bytes of `word` (little-endian) that are a quote, a backslash or a
/// control character, as their high bits: exact for the lowest such byte
/// (a byte above one may be marked too), zero when there is none.
fn ends_string(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below `n` (`n` ≤ 128) sets its high bit here; a borrow can
    // mark bytes above the lowest match, never one below it.
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1) | below(word, 0x20)
}

#[derive(Default)]
struct Wire<'a> {
    specversion: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    ty: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    subject: Option<Cow<'a, str>>,
    datacontenttype: Option<Cow<'a, str>>,
    dataschema: Option<Cow<'a, str>>,
    data: Option<&'a RawValue>,
    data_base64: Option<Cow<'a, str>>,
    extensions: Vec<(Cow<'a, str>, String)>,
}

impl<'a> Wire<'a> {
    /// Where the value of the string attribute `key` goes; `None` for
    /// `data` and extensions.
    fn slot(&mut self, key: &str) -> Option<&mut Option<Cow<'a, str>>> {
        Some(match key {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "type" => &mut self.ty,
            "source" => &mut self.source,
            "time" => &mut self.time,
            "subject" => &mut self.subject,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "data_base64" => &mut self.data_base64,
            _ => return None,
        })
    }

    fn into_event(self, shared: Option<&Bytes>) -> Result<Event, Error> {
        match self.specversion.as_deref() {
            Some("1.0") => {}
            Some(other) => return Err(Error::decode(format!("unsupported specversion {other:?}"))),
            None => return Err(Error::decode("missing `specversion`")),
        }
        fn required<'v>(value: Option<&'v str>, name: &str) -> Result<&'v str, Error> {
            match value {
                Some(v) if !v.is_empty() => Ok(v),
                Some(_) => Err(Error::decode(format!("`{name}` must not be empty"))),
                None => Err(Error::decode(format!("missing `{name}`"))),
            }
        }
        let id = Arc::<str>::from(required(self.id.as_deref(), "id")?);
        let ty = intern(Interned::Type, required(self.ty.as_deref(), "type")?);
        let source = intern(Interned::Source, required(self.source.as_deref(), "source")?);
        let time = self.time.as_deref().map(parse_time).transpose()?;
        for (name, _) in &self.extensions {
            validate_extension_name(name).map_err(|e| Error::decode(e.message().to_owned()))?;
        }
        let content_type = match self.datacontenttype.as_deref() {
            Some("") => return Err(Error::decode("`datacontenttype` must not be empty")),
            Some(ct) => Some(intern(Interned::ContentType, ct)),
            None => None,
        };
        let (data, data_is_json) = match (self.data, self.data_base64) {
            (Some(_), Some(_)) => return Err(Error::decode("both `data` and `data_base64` are present")),
            (Some(raw), None) => {
                let json = is_json_content_type(content_type.as_deref());
                let text = raw.get();
                let bytes = if !json && text.starts_with('"') {
                    // A non-JSON payload given as a JSON string is the string's text.
                    let s: String = serde_json::from_str(text)
                        .map_err(|e| Error::decode(format!("invalid `data`: {e}")))?;
                    Bytes::from(s)
                } else {
                    match shared {
                        Some(input) => input.slice_ref(text.as_bytes()),
                        None => Bytes::copy_from_slice(text.as_bytes()),
                    }
                };
                (Some(bytes), json)
            }
            (None, Some(b64)) => {
                let bytes = BASE64
                    .decode(b64.as_bytes())
                    .map_err(|e| Error::decode(format!("invalid `data_base64`: {e}")))?;
                // Empty data of no stated type is no data, as binary mode
                // (an empty body without a content type) has it.
                let data = Some(bytes).filter(|b| !b.is_empty() || content_type.is_some());
                (data.map(Bytes::from), false)
            }
            (None, None) => (None, false),
        };
        let inner = Inner {
            id,
            ty,
            source,
            time,
            subject: self.subject.map(|s| Arc::<str>::from(&*s)),
            datacontenttype: content_type,
            dataschema: self.dataschema.map(|s| Arc::<str>::from(&*s)),
            data,
            data_is_json,
            extensions: extension_map(
                self.extensions
                    .into_iter()
                    .map(|(name, value)| (Arc::<str>::from(&*name), Arc::<str>::from(value))),
            ),
            topic: None,
        };
        Ok(Event::assemble(inner))
    }
}

struct WireVisitor<'r> {
    limits: Limits,
    /// The limit that stopped the parse, if one did.
    refused: &'r mut Option<Error>,
}

impl WireVisitor<'_> {
    fn check<E: de::Error>(&mut self, checked: Result<(), Error>) -> Result<(), E> {
        checked.map_err(|e| {
            let message = e.message().to_owned();
            *self.refused = Some(e);
            E::custom(message)
        })
    }
}

impl<'de> Visitor<'de> for WireVisitor<'_> {
    type Value = Wire<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvents JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Wire<'de>, A::Error> {
        let mut wire = Wire::default();
        let limits = self.limits;
        let mut extensions_seen = 0;
        while let Some(key) = map.next_key::<CowStr<'de>>()? {
            let key = key.0;
            if &*key == "data" {
                let raw: &'de RawValue = map.next_value()?;
                // The last one counts, as for every attribute; `null` is none.
                wire.data = (raw.get() != "null").then_some(raw);
                continue;
            }
            let Some(slot) = wire.slot(&key) else {
                // Checked before the value is read, so that a refused
                // message costs no more.
                extensions_seen += 1;
                self.check(limits.check_extension_count(extensions_seen))?;
                self.check(limits.check_name(&key))?;
                if let Some(value) = map.next_value::<ExtensionValue>()?.0 {
                    self.check(limits.check_value(&key, &value))?;
                    wire.extensions.push((key, value));
                }
                continue;
            };
            let value = map.next_value::<Option<CowStr<'de>>>()?.map(|s| s.0);
            // `data_base64` is the payload, which the transport bounds,
            // as `data` is: not an attribute value.
            if let Some(value) = value.as_ref().filter(|_| &*key != "data_base64") {
                self.check(limits.check_value(&key, value))?;
            }
            *slot = value;
        }
        Ok(wire)
    }
}

/// A string that borrows from the input when it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// An extension's value: strings, numbers and booleans are kept as text
/// (binary mode carries them that way); null means absent.
struct ExtensionValue(Option<String>);

impl<'de> de::Deserialize<'de> for ExtensionValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExtensionValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number, boolean or null extension value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ExtensionValue(Some(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(ExtensionValue(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ExtensionValue(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ExtensionValue(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(ExtensionValue(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ExtensionValue(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Err(de::Error::custom(
                    "extension values must be strings, numbers or booleans",
                ))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Err(de::Error::custom(
                    "extension values must be strings, numbers or booleans",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `data` is one JSON value with nothing around it, so that
/// writing it inline as `data` and reading it back gives the same bytes (a
/// decoder drops the whitespace around a member's value). The payload
/// `null` never goes inline either: `"data":null` means no data.
fn is_exact_json(data: &[u8]) -> bool {
    serde_json::from_slice::<&RawValue>(data).is_ok_and(|raw| raw.get().len() == data.len())
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Attribute values rarely hold anything JSON escapes: those are copied
    // as they are, as serde_json would write them.
    if plain_len(s.as_bytes()) == s.len() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The length of `event` in structured mode, exact when no string in it
/// needs escaping (the usual case): the buffer is allocated once, and
/// [`to_bytes`] hands it over without another allocation.
fn encoded_len(event: &Event, inline: Option<bool>) -> usize {
    let quoted = |s: &str| s.len() + 2;
    let mut len = HEAD.len() + quoted(event.id()) + TYPE.len() + quoted(event.ty());
    len += SOURCE.len() + quoted(event.source());
    if let Some(time) = event.time() {
        len += TIME.len() + 2 + time_len(time);
    }
    for (name, value) in optional_attributes(event) {
        if let Some(value) = value {
            // `,"name":` and the value.
            len += 4 + name.len() + quoted(value);
        }
    }
    for (name, value) in event.extensions() {
        len += 2 + quoted(name) + quoted(value);
    }
    if let (Some(data), Some(inline)) = (event.data(), inline) {
        len += if inline {
            DATA.len() + data.len()
        } else {
            DATA_BASE64.len() + base64::encoded_len(data.len(), true).unwrap_or(0) + 1
        };
    }
    len + 1
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::{Limits, decode, parse};

    /// A member's value: plain and escaped strings, other JSON values,
    /// nested ones, and some that are not JSON.
    fn arb_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z./:0-9-]{0,12}".prop_map(|s| format!("\"{s}\"")),
            Just("\"1.0\"".to_owned()),
            Just("\"2025-01-01T00:00:00.5Z\"".to_owned()),
            Just("\"application/json\"".to_owned()),
            Just("\"text/plain\"".to_owned()),
            Just("\"aGk=\"".to_owned()),
            Just("\"a\\\"b\\u0041\"".to_owned()),
            Just("\"tab\there\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("-12.5e3".to_owned()),
            Just("12x".to_owned()),
            Just("{\"a\":[1,{\"b\":\"}\"}],\"c\":null}".to_owned()),
            Just("[\"[\",\"\\\"]\"]".to_owned()),
            Just("{\"open\":".to_owned()),
            (120usize..130).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        ]
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("specversion"),
            Just("id"),
            Just("type"),
            Just("source"),
            Just("time"),
            Just("subject"),
            Just("datacontenttype"),
            Just("dataschema"),
            Just("data"),
            Just("data_base64"),
            Just("ext1"),
            Just("tenant"),
            Just("Bad-Name"),
            Just("\\u0069d"),
        ]
        .prop_map(|k| format!("\"{k}\""))
    }

    fn arb_ws() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just(""), Just(" "), Just("\n\t "), Just("\u{a0}")]
    }

    /// An object of members that mostly make an event, with whitespace,
    /// repeats, missing or stray punctuation and trailing text.
    fn arb_envelope() -> impl Strategy<Value = String> {
        let member = (arb_ws(), arb_key(), arb_ws(), arb_value(), arb_ws());
        let required = [
            ("\"specversion\"", "\"1.0\""),
            ("\"id\"", "\"e-1\""),
            ("\"type\"", "\"user.created\""),
            ("\"source\"", "\"/s\""),
        ];
        (
            proptest::collection::vec(member, 0..8),
            proptest::bool::weighted(0.8),
            prop_oneof![Just(""), Just(""), Just(" \n"), Just(","), Just("}"), Just("x")],
        )
            .prop_map(move |(members, with_required, tail)| {
                let mut parts: Vec<String> = if with_required {
                    required.iter().map(|(k, v)| format!("{k}:{v}")).collect()
                } else {
                    Vec::new()
                };
                parts.extend(
                    members
                        .into_iter()
                        .map(|(a, k, b, v, c)| format!("{a}{k}{b}:{v}{c}")),
                );
                format!("{{{}}}{tail}", parts.join(","))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Whatever the input, the hand-written reading gives exactly what
        /// the general parser gives: the same event, or the same error.
        #[test]
        fn reading_by_hand_agrees_with_the_general_parser(text in arb_envelope(), tight in any::<bool>()) {
            let limits = if tight { Limits::new().max_extensions(1).max_value_len(8) } else { Limits::new() };
            let input = Bytes::from(text.clone());
            let fast = decode(&input, Some(&input), limits);
            let general = parse(&input, Some(&input), limits);
            match (fast, general) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", text),
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.kind(), b.kind(), "{}", text);
                    prop_assert_eq!(a.message(), b.message(), "{}", text);
                }
                (a, b) => prop_assert!(false, "{}: by hand {:?}, general {:?}", text, a, b),
            }
        }
    }

    /// The eight-byte test finds exactly the first byte that may end a
    /// string, whatever the bytes around it (a second such byte above or
    /// below it, bytes that borrow), and nothing where there is none.
    #[test]
    fn the_first_byte_that_ends_a_string_is_found_exactly() {
        let ends = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
        let seconds = [
            (0, 0u8),
            (3, b'"'),
            (5, 0x00),
            (7, b'\\'),
            (6, 0x01),
            (2, 0x1f),
            (4, 0x23),
        ];
        for fill in [b'a', 0xff, 0x80, b' ', b'!', b'#', b'[', b']', 0x21, 0x01, 0x00] {
            for at in 0..8 {
                for c in 0..=255u8 {
                    for &(at2, c2) in &seconds {
                        let mut bytes = [fill; 8];
                        bytes[at2] = c2;
                        bytes[at] = c;
                        let found = super::ends_string(u64::from_le_bytes(bytes));
                        match bytes.iter().position(|&b| ends(b)) {
                            Some(first) => {
                                assert_eq!(found.trailing_zeros() / 8, first as u32, "{bytes:?}")
                            }
                            None => assert_eq!(found, 0, "{bytes:?}"),
                        }
                    }
                }
            }
        }
        assert_eq!(super::ends_string(u64::from_le_bytes(*b"user.cre")), 0);
    }

    proptest! {
        #[test]
        fn strings_of_any_bytes_are_cut_where_the_general_parser_cuts(body in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut text = b"\"".to_vec();
            text.extend(&body);
            text.push(b'"');
            let ends = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
            if let Ok(text) = std::str::from_utf8(&text) {
                let first = body.iter().position(|&c| ends(c));
                match super::plain_str(text, 0) {
                    Some((s, end)) => {
                        // Cut at the first byte that may end it, a quote.
                        prop_assert_eq!(first.unwrap_or(body.len()), s.len());
                        prop_assert_eq!(&text[1..end - 1], s);
                        prop_assert_eq!(text.as_bytes()[end - 1], b'"');
                        if end == text.len() {
                            let general: String = serde_json::from_str(text).unwrap();
                            prop_assert_eq!(general, s);
                        }
                    }
                    // Left to the general parser: an escape or a control
                    // character comes first.
                    None => prop_assert!(first.is_some_and(|i| body[i] != b'"')),
                }
            }
        }
    }

    /// Empty base64 data without a content type is no data, as binary
    /// mode has it (so both modes carry the event alike); with a content
    /// type it stays empty data of that type.
    #[test]
    fn empty_base64_data_is_no_data_unless_typed() {
        let untyped =
            super::from_slice(br#"{"specversion":"1.0","id":"1","type":"t","source":"/","data_base64":""}"#)
                .unwrap();
        assert_eq!(untyped.data(), None);
        let mut headers = Vec::new();
        crate::codec::Binding::NATS
            .write_headers(&untyped, |k, v| headers.push((k.to_owned(), v.to_owned())));
        assert_eq!(
            crate::codec::Binding::NATS
                .decode(headers, Some(Bytes::new()))
                .unwrap(),
            untyped
        );
        let typed = super::from_slice(
            br#"{"specversion":"1.0","id":"1","type":"t","source":"/","datacontenttype":"image/png","data_base64":""}"#,
        )
        .unwrap();
        assert_eq!(typed.data().map(|d| d.len()), Some(0));
        assert_eq!(typed.datacontenttype(), Some("image/png"));
    }

    /// `data` nested deeper than `serde_json`'s recursion limit (which
    /// does not apply to a raw value) is read alike both ways.
    #[test]
    fn deeply_nested_data_is_read_as_the_general_parser_reads_it() {
        for depth in [127, 128, 129, 1000, 100_000] {
            let text = format!(
                r#"{{"specversion":"1.0","id":"1","type":"t","source":"/s","data":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let input = Bytes::from(text);
            let fast = decode(&input, Some(&input), Limits::new()).map_err(|e| e.message().to_owned());
            let general = parse(&input, Some(&input), Limits::new()).map_err(|e| e.message().to_owned());
            assert_eq!(fast, general, "depth {depth}");
            assert!(fast.is_ok(), "depth {depth}");
        }
    }

    /// A repeated `data` reads as its last value by hand and by the general
    /// parser alike, a last `null` as no data.
    #[test]
    fn a_repeated_data_counts_as_its_last_value() {
        let base = r#"{"specversion":"1.0","id":"e-1","type":"user.created","source":"/s","#;
        for (tail, data) in [
            (r#""data":"","data":null}"#, None),
            (r#""data":null,"data":{"a":1}}"#, Some(&br#"{"a":1}"#[..])),
            (r#""data":1,"data":2}"#, Some(&b"2"[..])),
        ] {
            let text = format!("{base}{tail}");
            let by_hand = super::from_slice(text.as_bytes()).unwrap();
            let by_serde = super::parse(text.as_bytes(), None, Limits::new()).unwrap();
            assert_eq!(by_hand, by_serde, "{text}");
            assert_eq!(by_hand.data().map(|d| &d[..]), data, "{text}");
        }
    }

    /// The envelope encoders write is read by hand, not by the general
    /// parser: the same event, with the payload sharing the input.
    #[test]
    fn what_encoders_write_is_read_by_hand() {
        let event = crate::Event::new(
            "user.created",
            serde_json::json!({"user_id": 7, "tags": ["a", "b"]}),
        )
        .with_extension("tenant", "acme")
        .unwrap();
        let bytes = Bytes::from(super::to_vec(&event).unwrap());
        let text = std::str::from_utf8(&bytes).unwrap();
        let wire = super::scan(text, Limits::new()).expect("read by hand");
        assert_eq!(wire.into_event(Some(&bytes)).unwrap(), event);
        let decoded = super::from_bytes(&bytes).unwrap();
        let data = decoded.data().unwrap();
        assert!(bytes.as_ptr_range().contains(&data.as_ptr()));
    }
}
