//! The event: [`Event`](crate::Event), CloudEvents 1.0.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::error::{Error, ErrorKind};

/// The CloudEvents spec version WatchTower speaks.
pub const SPEC_VERSION: &str = "1.0";

/// The `source` of events that do not set one.
///
/// A relative URI-reference, as the spec allows; set a real one with
/// [`Event::set_source`] or [`EventBuilder::source`].
pub(crate) const DEFAULT_SOURCE: &str = "/watchtower";

/// The content type of JSON payloads.
pub const APPLICATION_JSON: &str = "application/json";

/// Extension names WatchTower itself reads and writes.
pub mod ext {
    /// W3C trace context `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context `tracestate`.
    pub const TRACESTATE: &str = "tracestate";
    /// A correlation id carried across events.
    pub const CORRELATION_ID: &str = "correlationid";
    /// How many times delivery of this event was attempted.
    pub const ATTEMPT: &str = "attempt";
    /// Why the event was dead-lettered (the error's message).
    pub const DEAD_LETTER_REASON: &str = "deadletterreason";
    /// The [`ErrorKind`](crate::ErrorKind) of the final failure.
    pub const DEAD_LETTER_KIND: &str = "deadletterkind";
    /// The topic the event was bound for when it was dead-lettered.
    pub const DEAD_LETTER_TOPIC: &str = "deadlettertopic";
    /// When the event was dead-lettered (RFC 3339).
    pub const DEAD_LETTER_TIME: &str = "deadlettertime";
    /// The earliest time the event may be delivered (RFC 3339); see
    /// [`delay`](crate::delay).
    pub const DELIVER_AT: &str = "deliverat";
    /// The topic a request's reply goes to; see
    /// [`request`](crate::request).
    pub const REPLY_TO: &str = "replyto";
    /// An error reply's [`ErrorKind`](crate::ErrorKind)
    /// ([`as_str`](crate::ErrorKind::as_str)).
    pub const ERROR_KIND: &str = "errorkind";
    /// An error reply's message.
    pub const ERROR_MESSAGE: &str = "errormessage";
    /// Whether retrying can help after an error reply (`true` or `false`).
    pub const ERROR_RETRYABLE: &str = "errorretryable";
}

/// The event: CloudEvents 1.0 in memory.
///
/// An [`Event`] holds the CloudEvents context attributes and its payload as
/// encoded bytes. Cloning one is a single reference-count increment, so the
/// retry and dead-letter layers clone freely; changing a clone copies the
/// attributes (themselves reference-counted strings), never the payload.
///
/// # Example
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use watchtower::Event;
///
/// let event = Event::new("user.created", serde_json::json!({"user_id": 123}));
/// assert_eq!(event.ty(), "user.created");
/// assert_eq!(event.topic(), "user.created");
/// assert_eq!(event.datacontenttype(), Some("application/json"));
///
/// #[derive(Serialize, Deserialize, PartialEq, Debug)]
/// struct UserCreated { user_id: u64 }
/// let typed = Event::builder("user.created")
///     .source("/accounts")
///     .subject("123")
///     .extension("tenant", "acme")
///     .json(&UserCreated { user_id: 123 })?
///     .build()?;
/// assert_eq!(typed.json::<UserCreated>()?, UserCreated { user_id: 123 });
/// assert_eq!(typed.extension("tenant"), Some("acme"));
/// # Ok::<(), watchtower::Error>(())
/// ```
///
/// A CloudEvents 1.0 event.
///
/// Attributes follow the spec's names: [`id`](Event::id),
/// [`ty`](Event::ty) (`type`), [`source`](Event::source),
/// [`time`](Event::time), [`subject`](Event::subject),
/// [`datacontenttype`](Event::datacontenttype),
/// [`dataschema`](Event::dataschema), string [extensions](Event::extension)
/// and the payload ([`data`](Event::data)) as bytes.
///
/// Besides the CloudEvents attributes an event may carry a
/// [topic](Event::topic) override: where publishers send it. It is not part
/// of the wire format; by default the topic is the type.
#[derive(Clone)]
pub struct Event {
    inner: Arc<Inner>,
}

/// An event's attributes and data, behind the event's one `Arc`.
#[derive(Clone)]
pub(crate) struct Inner {
    pub(crate) id: Arc<str>,
    pub(crate) ty: Arc<str>,
    pub(crate) source: Arc<str>,
    pub(crate) time: Option<OffsetDateTime>,
    pub(crate) subject: Option<Arc<str>>,
    pub(crate) datacontenttype: Option<Arc<str>>,
    pub(crate) dataschema: Option<Arc<str>>,
    pub(crate) data: Option<Bytes>,
    /// Set when `data` is known to be well-formed JSON (built from serde,
    /// or decoded from a structured `data` member), so that encoding does
    /// not check it again.
    pub(crate) data_is_json: bool,
    /// Ordered by name, so encoding is deterministic; a tree rather than a
    /// sorted `Vec`, so that setting many extensions in any order costs
    /// `n log n`, not `n²`.
    pub(crate) extensions: BTreeMap<ExtName, Arc<str>>,
    pub(crate) topic: Option<Arc<str>>,
}

/// Extensions whose names are known to be valid, as an event keeps them:
/// of repeated names the last wins; `n log n` in their number whatever
/// their order.
pub(crate) fn extension_map<I>(extensions: I) -> BTreeMap<ExtName, Arc<str>>
where
    I: IntoIterator<Item = (Arc<str>, Arc<str>)>,
{
    let mut map = BTreeMap::new();
    map.extend(extensions.into_iter().map(|(k, v)| (ExtName(k), v)));
    map
}

thread_local! {
    /// The default source and the JSON content type, shared by the events
    /// made on this thread instead of allocated for each.
    static SHARED: (Arc<str>, Arc<str>) = (Arc::from(DEFAULT_SOURCE), Arc::from(APPLICATION_JSON));
}

/// The default `source`, shared.
fn default_source() -> Arc<str> {
    SHARED
        .try_with(|(source, _)| source.clone())
        .unwrap_or_else(|_| Arc::from(DEFAULT_SOURCE))
}

/// `application/json`, shared.
fn application_json() -> Arc<str> {
    SHARED
        .try_with(|(_, json)| json.clone())
        .unwrap_or_else(|_| Arc::from(APPLICATION_JSON))
}

fn new_id() -> Arc<str> {
    let mut buf = uuid::Uuid::encode_buffer();
    Arc::from(&*uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf))
}

impl Event {
    /// A JSON event of type `ty`: new UUID v7 id, source `/watchtower` (a relative URI-reference, as the spec allows), the
    /// current time, `datacontenttype` `application/json`.
    pub fn new(ty: impl Into<Arc<str>>, data: serde_json::Value) -> Event {
        // Serialising a `Value` cannot fail: its map keys are strings.
        let data = serde_json::to_vec(&data).unwrap_or_else(|_| b"null".to_vec());
        Event::from_parts(ty.into(), Some(application_json()), Some(data.into()), true)
    }

    /// A JSON event whose data is any serialisable value.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] if `data` cannot be serialised as JSON.
    pub fn try_json<T: Serialize + ?Sized>(ty: impl Into<Arc<str>>, data: &T) -> Result<Event, Error> {
        let data = serde_json::to_vec(data).map_err(|e| Error::from_source(ErrorKind::Encode, e))?;
        Ok(Event::from_parts(
            ty.into(),
            Some(application_json()),
            Some(data.into()),
            true,
        ))
    }

    /// An event whose data is `data` as given, with its content type.
    pub fn binary(
        ty: impl Into<Arc<str>>,
        content_type: impl Into<Arc<str>>,
        data: impl Into<Bytes>,
    ) -> Event {
        Event::from_parts(ty.into(), Some(content_type.into()), Some(data.into()), false)
    }

    /// An event without data.
    pub fn empty(ty: impl Into<Arc<str>>) -> Event {
        Event::from_parts(ty.into(), None, None, false)
    }

    /// A builder, for events with more attributes set.
    pub fn builder(ty: impl Into<Arc<str>>) -> EventBuilder {
        EventBuilder {
            event: Event::empty(ty),
            error: None,
        }
    }

    fn from_parts(
        ty: Arc<str>,
        datacontenttype: Option<Arc<str>>,
        data: Option<Bytes>,
        data_is_json: bool,
    ) -> Event {
        Event::assemble(Inner {
            id: new_id(),
            ty,
            source: default_source(),
            time: Some(OffsetDateTime::now_utc()),
            subject: None,
            datacontenttype,
            dataschema: None,
            data,
            data_is_json,
            extensions: BTreeMap::new(),
            topic: None,
        })
    }

    /// An event made of its attributes, in one allocation: constructors
    /// and codecs build every part first (extension names already
    /// validated, see [`extension_map`]).
    pub(crate) fn assemble(inner: Inner) -> Event {
        Event {
            inner: Arc::new(inner),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::make_mut(&mut self.inner)
    }

    /// The `id` attribute.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The `type` attribute.
    pub fn ty(&self) -> &str {
        &self.inner.ty
    }

    /// The `source` attribute.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The `specversion` attribute, always `"1.0"`.
    pub fn specversion(&self) -> &'static str {
        SPEC_VERSION
    }

    /// The `time` attribute.
    pub fn time(&self) -> Option<OffsetDateTime> {
        self.inner.time
    }

    /// The `subject` attribute.
    pub fn subject(&self) -> Option<&str> {
        self.inner.subject.as_deref()
    }

    /// The `datacontenttype` attribute.
    pub fn datacontenttype(&self) -> Option<&str> {
        self.inner.datacontenttype.as_deref()
    }

    /// The `dataschema` attribute.
    pub fn dataschema(&self) -> Option<&str> {
        self.inner.dataschema.as_deref()
    }

    /// The payload as encoded bytes, if the event has data.
    pub fn data(&self) -> Option<&Bytes> {
        self.inner.data.as_ref()
    }

    /// Whether the payload is JSON: the content type is absent (the
    /// CloudEvents default), `application/json`, `text/json` or `*/*+json`.
    pub fn is_json(&self) -> bool {
        is_json_content_type(self.datacontenttype())
    }

    /// Decodes the JSON payload into `T`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] if the event has no data, the content type is
    /// not JSON, or the payload does not deserialise into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        if !self.is_json() {
            return Err(Error::decode(format!(
                "data is {}, not JSON",
                self.datacontenttype().unwrap_or_default()
            )));
        }
        let data = self.data().ok_or_else(|| Error::decode("event has no data"))?;
        serde_json::from_slice(data).map_err(|e| Error::from_source(ErrorKind::Decode, e))
    }

    /// The extension `name`, if set.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.inner.extensions.get(name).map(|v| &**v)
    }

    /// All extensions, sorted by name.
    pub fn extensions(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.inner.extensions.iter().map(|(k, v)| (&*k.0, &**v))
    }

    /// Where publishers send the event: the topic set with
    /// [`set_topic`](Event::set_topic), else the type.
    pub fn topic(&self) -> &str {
        self.inner.topic.as_deref().unwrap_or(&self.inner.ty)
    }

    /// The id, shared rather than copied.
    pub(crate) fn id_shared(&self) -> Arc<str> {
        self.inner.id.clone()
    }

    /// The [topic](Event::topic), shared rather than copied: for
    /// transports that keep it beyond the event (a receipt, a cached
    /// subject).
    pub fn shared_topic(&self) -> Arc<str> {
        self.inner.topic.clone().unwrap_or_else(|| self.inner.ty.clone())
    }

    /// The `traceparent` extension (W3C trace context), if present.
    pub fn traceparent(&self) -> Option<&str> {
        self.extension(ext::TRACEPARENT)
    }

    /// Sets the `id` attribute.
    pub fn set_id(&mut self, id: impl Into<Arc<str>>) {
        self.inner_mut().id = id.into();
    }

    /// Sets the `type` attribute.
    pub fn set_ty(&mut self, ty: impl Into<Arc<str>>) {
        self.inner_mut().ty = ty.into();
    }

    /// Sets the `source` attribute.
    pub fn set_source(&mut self, source: impl Into<Arc<str>>) {
        self.inner_mut().source = source.into();
    }

    /// Sets or clears the `time` attribute, kept in UTC (the canonical
    /// RFC 3339 `Z` form on the wire).
    pub fn set_time(&mut self, time: Option<OffsetDateTime>) {
        self.inner_mut().time = time.map(|t| t.to_offset(time::UtcOffset::UTC));
    }

    /// Sets or clears the `subject` attribute.
    pub fn set_subject(&mut self, subject: Option<impl Into<Arc<str>>>) {
        self.inner_mut().subject = subject.map(Into::into);
    }

    /// Sets or clears the `dataschema` attribute.
    pub fn set_dataschema(&mut self, dataschema: Option<impl Into<Arc<str>>>) {
        self.inner_mut().dataschema = dataschema.map(Into::into);
    }

    /// Replaces the payload and its content type.
    pub fn set_data(&mut self, content_type: Option<impl Into<Arc<str>>>, data: Option<Bytes>) {
        let inner = self.inner_mut();
        inner.datacontenttype = content_type.map(Into::into);
        inner.data = data;
        inner.data_is_json = false;
    }

    /// Routes the event to `topic` instead of its type.
    pub fn set_topic(&mut self, topic: impl Into<Arc<str>>) {
        self.inner_mut().topic = Some(topic.into());
    }

    /// Builder-style [`set_topic`](Event::set_topic).
    pub fn with_topic(mut self, topic: impl Into<Arc<str>>) -> Event {
        self.set_topic(topic);
        self
    }

    /// Sets the extension `name` to `value`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`] if `name` is not a valid extension name:
    /// one or more of `a-z` and `0-9`, and not a context attribute name or
    /// `data`.
    pub fn set_extension(&mut self, name: &str, value: impl Into<Arc<str>>) -> Result<(), Error> {
        validate_extension_name(name)?;
        self.insert_extension(name, value.into());
        Ok(())
    }

    /// Sets an extension whose name is known to be valid (WatchTower's own,
    /// or checked by the caller). A name given as `&str` is copied only if
    /// the extension is new; one already shared is kept as it is.
    pub(crate) fn insert_extension<N>(&mut self, name: N, value: Arc<str>)
    where
        N: AsRef<str> + Into<Arc<str>>,
    {
        let exts = &mut self.inner_mut().extensions;
        match exts.get_mut(name.as_ref()) {
            Some(slot) => *slot = value,
            None => {
                exts.insert(ExtName(name.into()), value);
            }
        }
    }

    /// Builder-style [`set_extension`](Event::set_extension).
    ///
    /// # Errors
    ///
    /// As [`set_extension`](Event::set_extension).
    pub fn with_extension(mut self, name: &str, value: impl Into<Arc<str>>) -> Result<Event, Error> {
        self.set_extension(name, value)?;
        Ok(self)
    }

    /// Removes the extension `name`, returning its value.
    pub fn remove_extension(&mut self, name: &str) -> Option<Arc<str>> {
        if !self.inner.extensions.contains_key(name) {
            return None;
        }
        self.inner_mut().extensions.remove(name)
    }

    /// Checks the event against the CloudEvents rules: non-empty `id`,
    /// `source` and `type`, valid extension names.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`] naming the first broken rule.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, value) in [("id", self.id()), ("source", self.source()), ("type", self.ty())] {
            if value.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidEvent,
                    format!("`{name}` must not be empty"),
                ));
            }
        }
        if self.time().is_some_and(|t| !(0..=9999).contains(&t.year())) {
            return Err(Error::new(
                ErrorKind::InvalidEvent,
                "`time` must fall in the years 0 to 9999 (RFC 3339)",
            ));
        }
        if self.datacontenttype().is_some_and(str::is_empty) {
            return Err(Error::new(
                ErrorKind::InvalidEvent,
                "`datacontenttype` must not be empty",
            ));
        }
        Ok(())
    }

    pub(crate) fn data_is_json(&self) -> bool {
        self.inner.data_is_json
    }

    pub(crate) fn set_data_raw(
        &mut self,
        content_type: Option<Arc<str>>,
        data: Option<Bytes>,
        is_json: bool,
    ) {
        let inner = self.inner_mut();
        inner.datacontenttype = content_type;
        inner.data = data;
        inner.data_is_json = is_json;
    }
}

/// Whether a content type denotes JSON data (absent counts as JSON, as the
/// CloudEvents JSON format says).
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return true };
    let media = ct.split(';').next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case("application/json")
        || media.eq_ignore_ascii_case("text/json")
        || (media.len() > 5 && media.as_bytes()[media.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// The CloudEvents context attribute names; an extension may not reuse one.
pub(crate) const CONTEXT_ATTRIBUTES: [&str; 9] = [
    "specversion",
    "id",
    "type",
    "source",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
];

/// Checks an extension name: `[a-z0-9]+`, not a context attribute, not
/// `data` or `data_base64`.
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] saying what is wrong with the name.
pub fn validate_extension_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidEvent,
            "extension name must not be empty",
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(Error::new(
            ErrorKind::InvalidEvent,
            format!("extension name {name:?} may contain only a-z and 0-9"),
        ));
    }
    if CONTEXT_ATTRIBUTES.contains(&name) {
        return Err(Error::new(
            ErrorKind::InvalidEvent,
            format!("extension name {name:?} is reserved"),
        ));
    }
    Ok(())
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Event");
        d.field("id", &self.id())
            .field("type", &self.ty())
            .field("source", &self.source());
        if let Some(time) = self.time() {
            d.field("time", &format_args!("{time}"));
        }
        if let Some(subject) = self.subject() {
            d.field("subject", &subject);
        }
        if let Some(ct) = self.datacontenttype() {
            d.field("datacontenttype", &ct);
        }
        if let Some(schema) = self.dataschema() {
            d.field("dataschema", &schema);
        }
        if !self.inner.extensions.is_empty() {
            d.field("extensions", &DebugMap(&self.inner.extensions));
        }
        if let Some(topic) = &self.inner.topic {
            d.field("topic", topic);
        }
        match self.data() {
            Some(data) if self.is_json() => match std::str::from_utf8(data) {
                Ok(text) if text.len() <= 256 => d.field("data", &format_args!("{text}")),
                _ => d.field("data", &format_args!("<{} bytes>", data.len())),
            },
            Some(data) => d.field("data", &format_args!("<{} bytes>", data.len())),
            None => &mut d,
        };
        d.finish()
    }
}

struct DebugMap<'a>(&'a BTreeMap<ExtName, Arc<str>>);

impl fmt::Debug for DebugMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (&k.0, v)))
            .finish()
    }
}

/// An extension name as a map key. Its own type so that the unit tests can
/// count the comparisons the map makes (the work of building an event).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ExtName(Arc<str>);

impl Ord for ExtName {
    fn cmp(&self, other: &ExtName) -> Ordering {
        #[cfg(test)]
        tests::count_comparison();
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for ExtName {
    fn partial_cmp(&self, other: &ExtName) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Borrow<str> for ExtName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Two events are equal when every CloudEvents attribute, every extension
/// and the payload bytes are equal. The topic override is not compared.
impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        let (a, b) = (&*self.inner, &*other.inner);
        Arc::ptr_eq(&self.inner, &other.inner)
            || (a.id == b.id
                && a.ty == b.ty
                && a.source == b.source
                && a.time == b.time
                && a.subject == b.subject
                && a.datacontenttype == b.datacontenttype
                && a.dataschema == b.dataschema
                && a.data == b.data
                && a.extensions == b.extensions)
    }
}

impl Eq for Event {}

/// Builds an [`Event`] attribute by attribute; [`build`](EventBuilder::build)
/// validates it.
#[derive(Debug)]
pub struct EventBuilder {
    event: Event,
    error: Option<Error>,
}

impl EventBuilder {
    /// Sets the `id` (default: a new UUID v7).
    pub fn id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.event.set_id(id);
        self
    }

    /// Sets the `source` (default: `/watchtower`, a relative URI-reference, as the spec allows).
    pub fn source(mut self, source: impl Into<Arc<str>>) -> Self {
        self.event.set_source(source);
        self
    }

    /// Sets the `time` (default: now).
    pub fn time(mut self, time: OffsetDateTime) -> Self {
        self.event.set_time(Some(time));
        self
    }

    /// Leaves the `time` attribute out.
    pub fn no_time(mut self) -> Self {
        self.event.set_time(None);
        self
    }

    /// Sets the `subject`.
    pub fn subject(mut self, subject: impl Into<Arc<str>>) -> Self {
        self.event.set_subject(Some(subject));
        self
    }

    /// Sets the `dataschema`.
    pub fn dataschema(mut self, dataschema: impl Into<Arc<str>>) -> Self {
        self.event.set_dataschema(Some(dataschema));
        self
    }

    /// Sets an extension; an invalid name fails [`build`](EventBuilder::build).
    pub fn extension(mut self, name: &str, value: impl Into<Arc<str>>) -> Self {
        if let Err(e) = self.event.set_extension(name, value) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// Routes the event to `topic` instead of its type.
    pub fn topic(mut self, topic: impl Into<Arc<str>>) -> Self {
        self.event.set_topic(topic);
        self
    }

    /// Sets the data: `data` serialised as JSON.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] if `data` cannot be serialised.
    pub fn json<T: Serialize + ?Sized>(mut self, data: &T) -> Result<Self, Error> {
        let data = serde_json::to_vec(data).map_err(|e| Error::from_source(ErrorKind::Encode, e))?;
        self.event
            .set_data_raw(Some(application_json()), Some(data.into()), true);
        Ok(self)
    }

    /// Sets the data: bytes of the given content type.
    pub fn data(mut self, content_type: impl Into<Arc<str>>, data: impl Into<Bytes>) -> Self {
        self.event.set_data(Some(content_type), Some(data.into()));
        self
    }

    /// Validates and returns the event.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`] for the first broken rule, see
    /// [`Event::validate`].
    pub fn build(self) -> Result<Event, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.event.validate()?;
        Ok(self.event)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static COMPARISONS: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn count_comparison() {
        COMPARISONS.with(|c| c.set(c.get() + 1));
    }

    /// Comparisons of extension names made by `f` on this thread.
    pub(crate) fn comparisons(f: impl FnOnce()) -> u64 {
        let before = COMPARISONS.with(Cell::get);
        f();
        COMPARISONS.with(Cell::get) - before
    }

    /// A bound of `n log n` comparisons for `n` extensions (a B-tree node
    /// holds up to 11 keys, searched in order).
    pub(crate) fn n_log_n_bound(n: u64) -> u64 {
        12 * n * (u64::from(n.max(2).ilog2()) + 1)
    }

    #[test]
    fn setting_many_extensions_by_hand_is_n_log_n_in_any_order() {
        let n = 20_000u32;
        let names: Vec<String> = (0..n).map(|i| format!("x{i:06}")).collect();
        for order in ["ascending", "descending", "interleaved"] {
            let mut ordered: Vec<&String> = names.iter().collect();
            match order {
                "descending" => ordered.reverse(),
                "interleaved" => ordered.sort_by_key(|name| name.bytes().rev().collect::<Vec<u8>>()),
                _ => {}
            }
            let mut event = Event::empty("t");
            let used = comparisons(|| {
                for name in &ordered {
                    event.set_extension(name, "v").unwrap();
                }
            });
            assert!(
                used <= n_log_n_bound(u64::from(n)),
                "{order}: {used} comparisons for {n} extensions"
            );
            assert_eq!(event.extensions().len(), n as usize);
            let sorted: Vec<&str> = event.extensions().map(|(k, _)| k).collect();
            assert!(sorted.windows(2).all(|w| w[0] < w[1]), "{order}");
        }
    }

    #[test]
    fn new_sets_defaults() {
        let e = Event::new("user.created", serde_json::json!({"user_id": 123}));
        assert_eq!(e.id().len(), 36);
        assert_eq!(
            uuid::Uuid::parse_str(e.id()).map(|u| u.get_version_num()).ok(),
            Some(7)
        );
        assert_eq!(e.source(), DEFAULT_SOURCE);
        assert!(e.time().is_some());
        assert_eq!(e.data().map(|d| &d[..]), Some(&br#"{"user_id":123}"#[..]));
        assert!(e.validate().is_ok());
    }

    /// The default source and the JSON content type are shared by the
    /// events made on a thread, not allocated for each; changing one
    /// event's leaves the others as they were.
    #[test]
    fn default_source_and_json_content_type_are_shared() {
        let a = Event::new("a", serde_json::json!(1));
        let b = Event::try_json("b", &2).unwrap();
        let mut c = Event::builder("c").json(&3).unwrap().build().unwrap();
        assert!(Arc::ptr_eq(&a.inner.source, &b.inner.source));
        assert!(Arc::ptr_eq(&a.inner.source, &c.inner.source));
        for other in [&b, &c] {
            let (x, y) = (&a.inner.datacontenttype, &other.inner.datacontenttype);
            assert!(matches!((x, y), (Some(x), Some(y)) if Arc::ptr_eq(x, y)));
        }
        c.set_source("/elsewhere");
        assert_eq!(
            (a.source(), b.source(), c.source()),
            (DEFAULT_SOURCE, DEFAULT_SOURCE, "/elsewhere")
        );
        assert_eq!(a.datacontenttype(), Some(APPLICATION_JSON));
    }

    #[test]
    fn ids_are_time_ordered_and_unique() {
        let ids: Vec<String> = (0..1000).map(|_| Event::empty("t").id().to_owned()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 1000);
        assert_eq!(sorted, ids);
    }

    #[test]
    fn clone_shares_payload_and_copy_on_write_keeps_original() {
        let a = Event::new("t", serde_json::json!({"k": "v"}));
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        b.set_extension("attempt", "2").unwrap();
        assert_eq!(a.extension("attempt"), None);
        assert_eq!(b.extension("attempt"), Some("2"));
        assert_eq!(a.data().unwrap().as_ptr(), b.data().unwrap().as_ptr());
    }

    #[test]
    fn extension_names_are_validated() {
        let mut e = Event::empty("t");
        for bad in ["", "Tenant", "ten-ant", "ten_ant", "data", "id", "time", "é"] {
            let err = e.set_extension(bad, "x").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidEvent, "{bad}");
        }
        e.set_extension("tenant42", "x").unwrap();
        e.set_extension("abc", "1").unwrap();
        e.set_extension("abc", "2").unwrap();
        let names: Vec<_> = e.extensions().collect();
        assert_eq!(names, vec![("abc", "2"), ("tenant42", "x")]);
        assert_eq!(e.remove_extension("abc").as_deref(), Some("2"));
        assert_eq!(e.extension("abc"), None);
    }

    #[test]
    fn builder_validates_required_attributes() {
        assert_eq!(
            Event::builder("").build().unwrap_err().kind(),
            ErrorKind::InvalidEvent
        );
        assert_eq!(
            Event::builder("t").source("").build().unwrap_err().kind(),
            ErrorKind::InvalidEvent
        );
        assert_eq!(
            Event::builder("t").id("").build().unwrap_err().kind(),
            ErrorKind::InvalidEvent
        );
        let err = Event::builder("t").extension("Bad", "x").build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEvent);
    }

    #[test]
    fn json_round_trips_typed_data() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Order {
            id: u32,
            items: Vec<String>,
        }
        let order = Order {
            id: 7,
            items: vec!["a".into()],
        };
        let e = Event::try_json("order.placed", &order).unwrap();
        assert_eq!(e.json::<Order>().unwrap(), order);
        let err = Event::binary("t", "application/octet-stream", &b"\x00"[..])
            .json::<Order>()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert_eq!(e.json::<u32>().unwrap_err().kind(), ErrorKind::Decode);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type(None));
        assert!(is_json_content_type(Some("application/json; charset=utf-8")));
        assert!(is_json_content_type(Some("application/cloudevents+json")));
        assert!(is_json_content_type(Some("TEXT/JSON")));
        assert!(!is_json_content_type(Some("application/octet-stream")));
        assert!(!is_json_content_type(Some("+json")));
    }

    #[test]
    fn topic_defaults_to_type() {
        let e = Event::empty("user.created");
        assert_eq!(e.topic(), "user.created");
        assert_eq!(e.with_topic("audit").topic(), "audit");
    }
}
