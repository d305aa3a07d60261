//! The stream entry formats: in binary mode one field per CloudEvents
//! attribute under its plain name (`specversion`, `id`, `type`, `source`,
//! `time`, ..., extensions by name) plus `data` for the payload; in
//! structured mode `content-type: application/cloudevents+json` and the
//! CloudEvents JSON document in `data`.
//!
//! Also the parsing of stream replies, which never panics on what the
//! server sends.

use std::sync::Arc;

use bytes::Bytes;
use redis::{Cmd, Value};
use watchtower::codec::{Binding, CLOUDEVENTS_JSON, is_structured, structured};
use watchtower::{Error, Event, Poison, RawMessage};

/// The field that carries the payload (binary mode) or the whole event
/// (structured mode).
pub const DATA_FIELD: &str = "data";

/// The field that marks a structured-mode entry: its value is
/// `application/cloudevents+json`. Binary-mode entries never have it (the
/// payload's media type is the `datacontenttype` field there).
pub const CONTENT_TYPE_FIELD: &str = "content-type";

/// How an event is laid out in a stream entry (the CloudEvents content
/// modes). Subscribers read both, whichever a publisher chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// Two fields: [`CONTENT_TYPE_FIELD`] `application/cloudevents+json`,
    /// and [`DATA_FIELD`] holding the CloudEvents JSON document, the
    /// payload spliced in as it is when it is JSON (`data_base64`
    /// otherwise).
    #[default]
    Structured,
    /// One field per attribute under its plain name, then [`DATA_FIELD`]
    /// holding the payload's bytes as they are.
    Binary,
}

/// Appends `event`'s fields to an `XADD` command, laid out as `mode` says.
///
/// The event must have been validated: only an invalid event cannot be
/// encoded in structured mode, and such an event is written in binary
/// mode rather than dropped.
pub(crate) fn write_fields(cmd: &mut Cmd, event: &Event, mode: ContentMode) {
    if mode == ContentMode::Structured
        && let Ok(json) = structured::to_vec(event)
    {
        write_structured(cmd, json);
        return;
    }
    Binding::REDIS.write_headers(event, |name, value| {
        cmd.arg(name).arg(value);
    });
    if let Some(data) = event.data() {
        cmd.arg(DATA_FIELD).arg(&data[..]);
    }
}

/// Appends a structured-mode entry's fields holding `document`.
pub(crate) fn write_structured(cmd: &mut Cmd, document: Vec<u8>) {
    cmd.arg(CONTENT_TYPE_FIELD)
        .arg(CLOUDEVENTS_JSON)
        .arg(DATA_FIELD)
        .arg(document);
}

/// The event of a structured-mode entry; `None` for a binary-mode entry or
/// one that does not decode.
pub(crate) fn structured_event(fields: &[(Bytes, Bytes)]) -> Option<Event> {
    let marked = fields.iter().any(|(n, v)| {
        &n[..] == CONTENT_TYPE_FIELD.as_bytes() && std::str::from_utf8(v).is_ok_and(is_structured)
    });
    if !marked {
        return None;
    }
    let (_, document) = fields.iter().find(|(n, _)| &n[..] == DATA_FIELD.as_bytes())?;
    structured::from_bytes(document).ok()
}

/// The longest `time` attribute: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const TIME_MAX: usize = 30;

/// An upper bound of the arguments and bytes [`write_fields`] adds in
/// binary mode, so that a command can be allocated once; in structured
/// mode an estimate (escaping and `data_base64` can make the document
/// longer).
pub(crate) fn fields_size(event: &Event, mode: ContentMode) -> (usize, usize) {
    let (args, bytes) = binary_fields_size(event);
    match mode {
        ContentMode::Binary => (args, bytes),
        // The attributes' JSON punctuation (`"name":"value",` is five
        // bytes more per attribute than the names and values), the marker.
        ContentMode::Structured => (
            4,
            bytes + 5 * args / 2 + CONTENT_TYPE_FIELD.len() + CLOUDEVENTS_JSON.len() + 16,
        ),
    }
}

fn binary_fields_size(event: &Event) -> (usize, usize) {
    // Always there: specversion, id, type, source and (at most) time,
    // names and values.
    let mut args = 10;
    let mut bytes = "specversion1.0idtypesourcetime".len() + TIME_MAX + event.id().len();
    bytes += event.ty().len() + event.source().len();
    if let Some(subject) = event.subject() {
        args += 2;
        bytes += "subject".len() + subject.len();
    }
    if let Some(schema) = event.dataschema() {
        args += 2;
        bytes += "dataschema".len() + schema.len();
    }
    for (name, value) in event.extensions() {
        args += 2;
        bytes += name.len() + value.len();
    }
    if let Some(ct) = event.datacontenttype() {
        args += 2;
        bytes += "datacontenttype".len() + ct.len();
    }
    if let Some(data) = event.data() {
        args += 2;
        bytes += DATA_FIELD.len() + data.len();
    }
    (args, bytes)
}

/// One stream entry as read: its id and fields in wire order. `fields` is
/// `None` for an entry that was deleted while pending.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Shared as it is by the delivery's acknowledgement, its hold and
    /// its release: one allocation per entry.
    pub(crate) id: Arc<str>,
    pub(crate) fields: Option<Vec<(Bytes, Bytes)>>,
}

/// Decodes an entry's fields into an event, in whichever content mode it
/// was written, or explains why it is poison.
pub(crate) fn decode(topic: &str, fields: Vec<(Bytes, Bytes)>) -> Result<Event, Poison> {
    let mut body = None;
    let mut content_type = None;
    let mut bad_name = None;
    for (name, value) in &fields {
        match &name[..] {
            n if n == DATA_FIELD.as_bytes() => body = Some(value.clone()),
            n if n == CONTENT_TYPE_FIELD.as_bytes() => content_type = Some(value),
            n if std::str::from_utf8(n).is_err() => {
                bad_name = Some(Error::decode("a field name is not UTF-8"));
            }
            _ => {}
        }
    }
    let result = match (bad_name, content_type) {
        (Some(err), _) => Err(err),
        (None, Some(content_type)) => match std::str::from_utf8(content_type) {
            Ok(ct) if is_structured(ct) => match &body {
                Some(json) => structured::from_bytes(json),
                None => Err(Error::decode("a structured-mode entry has no `data` field")),
            },
            _ => Err(Error::decode(format!(
                "the `content-type` field is not {CLOUDEVENTS_JSON}"
            ))),
        },
        (None, None) => Binding::REDIS.decode(
            fields
                .iter()
                .filter(|(n, _)| &n[..] != DATA_FIELD.as_bytes())
                // Every name is UTF-8 here.
                .map(|(n, v)| (std::str::from_utf8(n).unwrap_or_default(), v)),
            body.clone(),
        ),
    };
    result.map_err(|error| {
        let raw = RawMessage {
            topic: topic.into(),
            headers: fields
                .iter()
                .filter(|(n, _)| &n[..] != DATA_FIELD.as_bytes())
                .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.clone()))
                .collect(),
            body: body.unwrap_or_default(),
        };
        Poison::new(raw, error)
    })
}

fn into_bytes(value: Value) -> Option<Bytes> {
    match value {
        // Taking the buffers over avoids a copy per field.
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        Value::VerbatimString { text, .. } => Some(Bytes::from(text)),
        Value::Okay => Some(Bytes::from_static(b"OK")),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

fn into_string(value: Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// The text of a string reply, shared.
pub(crate) fn shared_string(value: &Value) -> Option<std::sync::Arc<str>> {
    match value {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(Into::into),
        Value::SimpleString(s) => Some(s.as_str().into()),
        Value::VerbatimString { text, .. } => Some(text.as_str().into()),
        _ => None,
    }
}

/// The text of a string reply.
pub(crate) fn string_of(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn malformed(what: &str) -> Error {
    Error::decode(format!("unexpected reply shape for {what}"))
}

fn into_items(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Attribute { data, .. } => into_items(*data),
        _ => None,
    }
}

/// Pairs of (key, value) from an array of alternating items or a map.
fn into_pairs(value: Value) -> Option<Vec<(Value, Value)>> {
    match value {
        Value::Array(items) | Value::Set(items) => {
            if items.len() % 2 != 0 {
                return None;
            }
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((k, v));
            }
            Some(out)
        }
        Value::Map(items) => Some(items),
        Value::Attribute { data, .. } => into_pairs(*data),
        _ => None,
    }
}

/// Parses a list of entries (`[[id, [field, value, ...]], ...]`), taking
/// the reply's buffers over: one vector of fields per entry, no copy of a
/// field.
pub(crate) fn parse_entries(value: Value) -> Result<Vec<Entry>, Error> {
    let list = match value {
        Value::Nil => return Ok(Vec::new()),
        v => into_items(v).ok_or_else(|| malformed("stream entries"))?,
    };
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        let mut parts = into_items(entry)
            .ok_or_else(|| malformed("a stream entry"))?
            .into_iter();
        let id = parts
            .next()
            .as_ref()
            .and_then(shared_string)
            .ok_or_else(|| malformed("a stream entry id"))?;
        let fields = match parts.next() {
            None | Some(Value::Nil) => None,
            Some(fields) => Some(fields_of(fields).ok_or_else(|| malformed("stream entry fields"))?),
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

/// An entry's fields, from an array of alternating names and values (RESP2)
/// or a map (RESP3).
fn fields_of(value: Value) -> Option<Vec<(Bytes, Bytes)>> {
    match value {
        Value::Array(items) | Value::Set(items) => {
            if items.len() % 2 != 0 {
                return None;
            }
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(name), Some(value)) = (items.next(), items.next()) {
                out.push((into_bytes(name)?, into_bytes(value)?));
            }
            Some(out)
        }
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(name, value)| Some((into_bytes(name)?, into_bytes(value)?)))
            .collect(),
        Value::Attribute { data, .. } => fields_of(*data),
        _ => None,
    }
}

/// Parses an `XREAD`/`XREADGROUP` reply: entries per stream key. `Nil`
/// (the block time passed) is no entries.
pub(crate) fn parse_read(value: Value) -> Result<Vec<(String, Vec<Entry>)>, Error> {
    let streams: Vec<(Value, Value)> = match value {
        Value::Nil => return Ok(Vec::new()),
        v @ Value::Map(_) => into_pairs(v).ok_or_else(|| malformed("XREADGROUP"))?,
        v => into_items(v)
            .ok_or_else(|| malformed("XREADGROUP"))?
            .into_iter()
            .map(|s| match into_items(s) {
                Some(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    match (pair.next(), pair.next()) {
                        (Some(key), Some(entries)) => Ok((key, entries)),
                        _ => Err(malformed("XREADGROUP stream")),
                    }
                }
                _ => Err(malformed("XREADGROUP stream")),
            })
            .collect::<Result<_, _>>()?,
    };
    streams
        .into_iter()
        .map(|(key, entries)| {
            let key = into_string(key).ok_or_else(|| malformed("XREADGROUP stream key"))?;
            Ok((key, parse_entries(entries)?))
        })
        .collect()
}

/// Parses an `XAUTOCLAIM ... JUSTID` reply: the next cursor and the ids of
/// the claimed entries.
pub(crate) fn parse_autoclaim_ids(value: Value) -> Result<(String, Vec<String>, Vec<String>), Error> {
    let mut parts = into_items(value)
        .ok_or_else(|| malformed("XAUTOCLAIM"))?
        .into_iter();
    let cursor = parts
        .next()
        .and_then(into_string)
        .ok_or_else(|| malformed("XAUTOCLAIM cursor"))?;
    let ids = |part: Option<Value>| match part {
        None | Some(Value::Nil) => Ok(Vec::new()),
        Some(ids) => into_items(ids)
            .ok_or_else(|| malformed("XAUTOCLAIM ids"))?
            .into_iter()
            .map(|id| into_string(id).ok_or_else(|| malformed("an XAUTOCLAIM id")))
            .collect::<Result<Vec<_>, _>>(),
    };
    let claimed = ids(parts.next())?;
    // Redis 7: the pending entries no longer in the stream, which it has
    // taken off the pending list.
    let deleted = ids(parts.next())?;
    Ok((cursor, claimed, deleted))
}

/// A reply of field names and values (`XINFO`), as RESP2 pairs or a
/// RESP3 map, looked up by name.
pub(crate) fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| string_of(&pair[0]).as_deref() == Some(name))
            .and_then(|pair| pair.get(1)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| string_of(k).as_deref() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// A stream entry id as `(milliseconds, sequence)`, for comparing.
pub(crate) fn entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Parses the extended `XPENDING` reply into (id, delivery count) pairs.
pub(crate) fn parse_pending(value: Value) -> Result<Vec<(String, u32)>, Error> {
    let list = into_items(value).ok_or_else(|| malformed("XPENDING"))?;
    list.into_iter()
        .map(|row| match into_items(row).as_deref() {
            Some([id, _consumer, _idle, Value::Int(count)]) => Ok((
                string_of(id).ok_or_else(|| malformed("XPENDING id"))?,
                u32::try_from(*count).unwrap_or(u32::MAX),
            )),
            _ => Err(malformed("XPENDING row")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchtower::ErrorKind;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn fields_of(event: &Event) -> Vec<(Bytes, Bytes)> {
        fields_in(event, ContentMode::Binary)
    }

    fn fields_in(event: &Event, mode: ContentMode) -> Vec<(Bytes, Bytes)> {
        let mut cmd = redis::cmd("XADD");
        write_fields(&mut cmd, event, mode);
        let args: Vec<Bytes> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => Bytes::copy_from_slice(b),
                _ => Bytes::new(),
            })
            .collect();
        args[1..]
            .chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    }

    #[test]
    fn fields_round_trip() {
        let event = Event::builder("user.created")
            .subject("u1")
            .extension("correlationid", "c-1")
            .json(&serde_json::json!({"user_id": 7}))
            .unwrap()
            .build()
            .unwrap();
        let fields = fields_of(&event);
        let names: Vec<&[u8]> = fields.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(names[0], b"specversion");
        assert!(names.contains(&&b"type"[..]) && names.contains(&&b"data"[..]));
        assert!(names.contains(&&b"correlationid"[..]));
        let back = decode("user.created", fields).unwrap();
        assert_eq!(back, event);
        let binary = Event::binary("blob", "application/octet-stream", &b"\x00\xff"[..]);
        assert_eq!(decode("blob", fields_of(&binary)).unwrap(), binary);
        let empty = Event::empty("nothing");
        assert_eq!(decode("nothing", fields_of(&empty)).unwrap(), empty);
    }

    /// The fields as the core's binding names them, then `data`.
    fn binding_fields(event: &Event) -> Vec<(Bytes, Bytes)> {
        let mut fields = Vec::new();
        Binding::REDIS.write_headers(event, |n, v| {
            fields.push((
                Bytes::copy_from_slice(n.as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            ));
        });
        if let Some(data) = event.data() {
            fields.push((Bytes::from_static(DATA_FIELD.as_bytes()), data.clone()));
        }
        fields
    }

    #[test]
    fn fields_match_the_binding_and_fit_the_size() {
        let time = |s: &str| watchtower::codec::parse_time(s).unwrap();
        let full = Event::builder("order.placed")
            .source("/shop")
            .subject("o-1")
            .dataschema("https://example.com/schema")
            .extension("correlationid", "c-1")
            .extension("tenant", "t \"x\" %")
            .time(time("2026-03-04T05:06:07.123456789+02:00"))
            .json(&serde_json::json!({"n": 1}))
            .unwrap()
            .build()
            .unwrap();
        let whole_second = Event::builder("a")
            .time(time("2026-01-01T00:00:00Z"))
            .build()
            .unwrap();
        let trailing_zeros = Event::builder("a")
            .time(time("2026-01-01T00:00:00.120Z"))
            .build()
            .unwrap();
        let no_time = Event::builder("a").no_time().build().unwrap();
        for event in [
            full,
            whole_second,
            trailing_zeros,
            no_time,
            Event::empty("e"),
            Event::binary("b", "application/octet-stream", &b"\x00\xff"[..]),
        ] {
            assert_eq!(fields_of(&event), binding_fields(&event), "{event:?}");
            let mut cmd = redis::cmd("XADD");
            write_fields(&mut cmd, &event, ContentMode::Binary);
            let (args, bytes) = fields_size(&event, ContentMode::Binary);
            let written: Vec<usize> = cmd
                .args_iter()
                .skip(1)
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.len(),
                    _ => 0,
                })
                .collect();
            assert!(written.len() <= args, "{event:?}");
            assert!(written.iter().sum::<usize>() <= bytes, "{event:?}");
        }
    }

    #[test]
    fn structured_fields_round_trip_with_the_payload_spliced_in() {
        let event = Event::builder("user.created")
            .subject("u1")
            .extension("correlationid", "c-1")
            .json(&serde_json::json!({"user_id": 7}))
            .unwrap()
            .build()
            .unwrap();
        let fields = fields_in(&event, ContentMode::Structured);
        assert_eq!(fields.len(), 2);
        assert_eq!(&fields[0].0[..], b"content-type");
        assert_eq!(&fields[0].1[..], b"application/cloudevents+json");
        assert_eq!(&fields[1].0[..], b"data");
        let json = std::str::from_utf8(&fields[1].1).unwrap();
        assert!(json.contains(r#""data":{"user_id":7}"#), "{json}");
        assert_eq!(decode("user.created", fields).unwrap(), event);
        let binary = Event::binary("blob", "application/octet-stream", &b"\x00\xff"[..]);
        let fields = fields_in(&binary, ContentMode::Structured);
        assert!(std::str::from_utf8(&fields[1].1).unwrap().contains("data_base64"));
        assert_eq!(decode("blob", fields).unwrap(), binary);
        let empty = Event::empty("nothing");
        assert_eq!(
            decode("nothing", fields_in(&empty, ContentMode::Structured)).unwrap(),
            empty
        );
    }

    #[test]
    fn bad_structured_entries_are_poison() {
        let ct = |v: &'static [u8]| (Bytes::from_static(b"content-type"), Bytes::from_static(v));
        let data = |v: &'static [u8]| (Bytes::from_static(b"data"), Bytes::from_static(v));
        for (fields, body) in [
            // Not JSON.
            (
                vec![ct(b"application/cloudevents+json"), data(b"{nope")],
                &b"{nope"[..],
            ),
            // JSON, not an event.
            (vec![ct(b"application/cloudevents+json"), data(b"{}")], b"{}"),
            // No document.
            (vec![ct(b"application/cloudevents+json")], b""),
            // Another content type.
            (vec![ct(b"text/plain"), data(b"hi")], b"hi"),
            (vec![ct(b"\xff"), data(b"hi")], b"hi"),
        ] {
            let poison = decode("t", fields.clone()).unwrap_err();
            assert_eq!(poison.error.kind(), ErrorKind::Decode, "{fields:?}");
            assert_eq!(&poison.raw.body[..], body);
            assert_eq!(poison.raw.headers[0].0, "content-type");
        }
    }

    #[test]
    fn garbage_is_poison_with_raw_bytes() {
        let fields = vec![
            (Bytes::from_static(b"foo"), Bytes::from_static(b"bar")),
            (Bytes::from_static(b"data"), Bytes::from_static(b"\xff\x00")),
        ];
        let poison = decode("t", fields).unwrap_err();
        assert_eq!(poison.error.kind(), ErrorKind::Decode);
        assert_eq!(&poison.raw.body[..], b"\xff\x00");
        assert_eq!(poison.raw.headers.len(), 1);
        let bad_name = vec![(Bytes::from_static(b"\xff"), Bytes::from_static(b"x"))];
        assert_eq!(decode("t", bad_name).unwrap_err().error.kind(), ErrorKind::Decode);
    }

    #[test]
    fn replies_parse_and_bad_shapes_are_errors() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("a"), bulk("b")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let read = parse_read(reply).unwrap();
        assert_eq!(read[0].0, "s");
        assert_eq!(&*read[0].1[0].id, "1-0");
        assert!(read[0].1[1].fields.is_none());
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        for bad in [
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                bulk("s"),
                Value::Array(vec![Value::Int(3)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk("s"),
                Value::Array(vec![Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("a")]),
                ])]),
            ])]),
        ] {
            assert_eq!(
                parse_read(bad.clone()).unwrap_err().kind(),
                ErrorKind::Decode,
                "{bad:?}"
            );
        }
        let claim = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![bulk("1-0"), bulk("2-0")]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let (cursor, ids, _) = parse_autoclaim_ids(claim).unwrap();
        assert_eq!(
            (cursor.as_str(), ids),
            ("5-0", vec!["1-0".to_owned(), "2-0".to_owned()])
        );
        let bad_claim = Value::Array(vec![bulk("0-0"), Value::Array(vec![Value::Int(1)])]);
        assert_eq!(
            parse_autoclaim_ids(bad_claim).unwrap_err().kind(),
            ErrorKind::Decode
        );
        let pending = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            bulk("c"),
            Value::Int(10),
            Value::Int(3),
        ])]);
        assert_eq!(parse_pending(pending).unwrap(), vec![("1-0".to_owned(), 3)]);
        assert!(parse_pending(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
