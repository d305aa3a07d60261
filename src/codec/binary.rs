use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;

use super::{Interned, Limits, format_time, intern, parse_time};
use crate::error::Error;
use crate::event::{Event, Inner, extension_map, validate_extension_name};

/// How one protocol carries CloudEvents attributes in binary mode.
///
/// Attributes become headers named `prefix + attribute` (`ce-id`,
/// `cloudEvents_type`, plain `source` for Redis fields); the payload is the
/// message body. Where the protocol has a content-type header or property,
/// `datacontenttype` goes there instead. Header names are matched without
/// regard to case on decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    prefix: &'static str,
    /// Also accepted on decode (AMQP's older `cloudEvents:`).
    alt_prefix: Option<&'static str>,
    content_type: Option<&'static str>,
    percent_encode: bool,
}

impl Binding {
    /// NATS: `ce-<attr>` headers, `ce-datacontenttype` included; a
    /// `content-type` header is also read on decode.
    pub const NATS: Binding = Binding {
        prefix: "ce-",
        alt_prefix: None,
        content_type: None,
        percent_encode: false,
    };

    /// HTTP: `ce-<attr>` headers with percent-encoded values, the data's
    /// type in the ordinary `content-type` header (not encoded).
    pub const HTTP: Binding = Binding {
        prefix: "ce-",
        alt_prefix: None,
        content_type: Some("content-type"),
        percent_encode: true,
    };

    /// AMQP: `cloudEvents_<attr>` application properties, the data's type
    /// in the `content-type` message property (reported to the callback
    /// under the name `content-type`). The older `cloudEvents:` prefix is
    /// accepted on decode.
    pub const AMQP: Binding = Binding {
        prefix: "cloudEvents_",
        alt_prefix: Some("cloudEvents:"),
        content_type: Some("content-type"),
        percent_encode: false,
    };

    /// Redis Streams: one field per attribute under its plain name; the
    /// payload goes in the `data` field, which the transport writes.
    pub const REDIS: Binding = Binding {
        prefix: "",
        alt_prefix: None,
        content_type: None,
        percent_encode: false,
    };

    /// The header name prefix.
    pub const fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// Calls `f(name, value)` for each header that carries `event`'s
    /// attributes, `specversion` first.
    pub fn write_headers(&self, event: &Event, mut f: impl FnMut(&str, &str)) {
        let mut name = String::with_capacity(self.prefix.len() + 24);
        let mut emit = |attr: &str, value: &str| {
            name.clear();
            name.push_str(self.prefix);
            name.push_str(attr);
            f(&name, &self.encode_value(value));
        };
        emit("specversion", event.specversion());
        emit("id", event.id());
        emit("type", event.ty());
        emit("source", event.source());
        if let Some(time) = event.time() {
            emit("time", &format_time(time));
        }
        if let Some(subject) = event.subject() {
            emit("subject", subject);
        }
        if let Some(schema) = event.dataschema() {
            emit("dataschema", schema);
        }
        for (ext, value) in event.extensions() {
            emit(ext, value);
        }
        if let Some(ct) = event.datacontenttype() {
            match self.content_type {
                Some(header) => f(header, ct),
                None => emit("datacontenttype", ct),
            }
        }
    }

    /// Builds an event from binary-mode headers and a body, within the
    /// default [`Limits`].
    ///
    /// Headers without the prefix (other than the content-type header) are
    /// ignored; header values must be UTF-8. Of an attribute given twice,
    /// the last value wins.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) if `specversion` is
    /// missing or not `1.0`, `id`, `source` or `type` is missing or empty,
    /// `time` is not RFC 3339, a value is not UTF-8 (or badly
    /// percent-encoded), an extension name is invalid, or the headers
    /// exceed a limit.
    pub fn decode<I, N, V>(&self, headers: I, body: Option<Bytes>) -> Result<Event, Error>
    where
        I: IntoIterator<Item = (N, V)>,
        N: AsRef<str>,
        V: AsRef<[u8]>,
    {
        self.decode_with_limits(headers, body, Limits::new())
    }

    /// As [`decode`](Binding::decode), within `limits`.
    ///
    /// # Errors
    ///
    /// As [`decode`](Binding::decode).
    pub fn decode_with_limits<I, N, V>(
        &self,
        headers: I,
        body: Option<Bytes>,
        limits: Limits,
    ) -> Result<Event, Error>
    where
        I: IntoIterator<Item = (N, V)>,
        N: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut attrs = Attrs {
            limits,
            ..Attrs::default()
        };
        for (name, value) in headers {
            let name = name.as_ref();
            let is_content_type = self
                .content_type
                .map_or(name.eq_ignore_ascii_case("content-type"), |h| {
                    name.eq_ignore_ascii_case(h)
                });
            let attr = if is_content_type {
                Cow::Borrowed("datacontenttype")
            } else {
                let stripped = strip_prefix_ignore_case(name, self.prefix)
                    .or_else(|| self.alt_prefix.and_then(|p| strip_prefix_ignore_case(name, p)));
                match stripped {
                    // Names are usually lowercase already: no copy then.
                    Some(attr) if attr.bytes().any(|b| b.is_ascii_uppercase()) => {
                        Cow::Owned(attr.to_ascii_lowercase())
                    }
                    Some(attr) => Cow::Borrowed(attr),
                    None => continue,
                }
            };
            let value = std::str::from_utf8(value.as_ref())
                .map_err(|_| Error::decode(format!("header {name:?} is not UTF-8")))?;
            // Checked before percent-decoding, which only shortens it. An
            // over-long name is refused by `set`; not echoed here in full.
            let shown = if attr.len() <= 64 {
                &*attr
            } else {
                "an over-long attribute"
            };
            attrs.limits.check_value(shown, value)?;
            let value = if is_content_type {
                Cow::Borrowed(value)
            } else {
                self.decode_value(value)?
            };
            attrs.set(attr, value)?;
        }
        attrs.into_event(body)
    }

    fn encode_value<'a>(&self, value: &'a str) -> Cow<'a, str> {
        if !self.percent_encode
            || value
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%')
        {
            return Cow::Borrowed(value);
        }
        let mut out = String::with_capacity(value.len() + 8);
        for b in value.bytes() {
            if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        Cow::Owned(out)
    }

    fn decode_value<'a>(&self, value: &'a str) -> Result<Cow<'a, str>, Error> {
        if !self.percent_encode || !value.contains('%') {
            return Ok(Cow::Borrowed(value));
        }
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| Error::decode("bad percent-encoding in header value"))?;
                out.push(hex);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out)
            .map(Cow::Owned)
            .map_err(|_| Error::decode("percent-decoded header value is not UTF-8"))
    }
}

fn strip_prefix_ignore_case<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let head = name.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) && name.len() > prefix.len() {
        name.get(prefix.len()..)
    } else {
        None
    }
}

#[derive(Default)]
struct Attrs {
    limits: Limits,
    /// `specversion` was present (and `1.0`: anything else is refused at
    /// once).
    specversion: bool,
    id: Option<Arc<str>>,
    ty: Option<Arc<str>>,
    source: Option<Arc<str>>,
    time: Option<OffsetDateTime>,
    subject: Option<Arc<str>>,
    datacontenttype: Option<Arc<str>>,
    dataschema: Option<Arc<str>>,
    extensions: Vec<(Arc<str>, Arc<str>)>,
}

impl Attrs {
    fn set(&mut self, attr: Cow<'_, str>, value: Cow<'_, str>) -> Result<(), Error> {
        match &*attr {
            "specversion" if value == "1.0" => self.specversion = true,
            "specversion" => return Err(Error::decode(format!("unsupported specversion {value:?}"))),
            "id" => self.id = Some(value.into()),
            "type" => self.ty = Some(intern(Interned::Type, &value)),
            "source" => self.source = Some(intern(Interned::Source, &value)),
            "time" => self.time = Some(parse_time(&value)?),
            "subject" => self.subject = Some(value.into()),
            "datacontenttype" => self.datacontenttype = Some(intern(Interned::ContentType, &value)),
            "dataschema" => self.dataschema = Some(value.into()),
            "data" | "data_base64" => {
                return Err(Error::decode(format!("`{attr}` is not allowed as a header")));
            }
            _ => {
                self.limits.check_extension_count(self.extensions.len() + 1)?;
                self.limits.check_name(&attr)?;
                self.extensions.push((attr.into(), value.into()));
            }
        }
        Ok(())
    }

    fn into_event(self, body: Option<Bytes>) -> Result<Event, Error> {
        if !self.specversion {
            return Err(Error::decode("missing `specversion`"));
        }
        let required = |value: Option<Arc<str>>, name: &str| match value {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(Error::decode(format!("`{name}` must not be empty"))),
            None => Err(Error::decode(format!("missing `{name}`"))),
        };
        let id = required(self.id, "id")?;
        let ty = required(self.ty, "type")?;
        let source = required(self.source, "source")?;
        for (name, _) in &self.extensions {
            validate_extension_name(name).map_err(|e| Error::decode(e.message().to_owned()))?;
        }
        if self.datacontenttype.as_deref() == Some("") {
            return Err(Error::decode("`datacontenttype` must not be empty"));
        }
        // An empty body without a content type is an event without data.
        let data = body.filter(|b| !b.is_empty() || self.datacontenttype.is_some());
        let inner = Inner {
            id,
            ty,
            source,
            time: self.time,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            data,
            data_is_json: false,
            extensions: extension_map(self.extensions),
            topic: None,
        };
        Ok(Event::assemble(inner))
    }
}
