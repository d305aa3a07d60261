//! Which subject an event is published to: [`SubjectTemplate`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use watchtower::validate_topic;
use watchtower::{Error, Event};

/// A subject with `{topic}`, `{type}` and `{source}` placeholders, for
/// [`NatsPublisher::subject_template`](crate::NatsPublisher::subject_template)
/// and [`JetStreamPublisher::subject_template`](crate::JetStreamPublisher::subject_template).
///
/// By default an event goes to its [`topic`](watchtower::Event::topic): the
/// topic set on it, else its type. A [`SubjectTemplate`] rewrites that, for
/// example to put every event under a prefix that a JetStream stream
/// captures:
///
/// ```
/// use watchtower::Event;
/// use watchtower_nats::SubjectTemplate;
///
/// let template = SubjectTemplate::new("events.{topic}")?;
/// let event = Event::new("user.created", serde_json::json!({}));
/// assert_eq!(template.render(&event)?, "events.user.created");
/// assert!(SubjectTemplate::new("events.{nope}").is_err());
/// # Ok::<(), watchtower::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Type,
    Source,
}

impl SubjectTemplate {
    /// Parses a template.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) for an unknown
    /// or unclosed placeholder, or an empty template.
    pub fn new(text: &str) -> Result<SubjectTemplate, Error> {
        if text.is_empty() {
            return Err(Error::config("subject template is empty"));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| Error::config(format!("unclosed placeholder in subject template {text:?}")))?;
            parts.push(match &rest[open + 1..open + close] {
                "topic" => Part::Topic,
                "type" => Part::Type,
                "source" => Part::Source,
                other => {
                    return Err(Error::config(format!(
                        "unknown placeholder {{{other}}} in subject template {text:?} \
                         (use {{topic}}, {{type}} or {{source}})"
                    )));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(SubjectTemplate {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template that sends every event to its topic.
    pub fn topic() -> SubjectTemplate {
        SubjectTemplate {
            text: "{topic}".to_owned(),
            parts: vec![Part::Topic],
        }
    }

    /// The template's text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The subject for `event`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`](watchtower::ErrorKind::InvalidTopic) if
    /// the result is not a valid subject (empty token, whitespace,
    /// wildcard).
    pub fn render<'a>(&self, event: &'a Event) -> Result<Cow<'a, str>, Error> {
        let subject = self.render_unchecked(event);
        validate_topic(&subject)?;
        Ok(subject)
    }

    fn render_unchecked<'a>(&self, event: &'a Event) -> Cow<'a, str> {
        match self.parts.as_slice() {
            [Part::Topic] => Cow::Borrowed(event.topic()),
            [Part::Type] => Cow::Borrowed(event.ty()),
            parts => {
                let mut out = String::with_capacity(64);
                for part in parts {
                    out.push_str(match part {
                        Part::Literal(s) => s,
                        Part::Topic => event.topic(),
                        Part::Type => event.ty(),
                        Part::Source => event.source(),
                    });
                }
                Cow::Owned(out)
            }
        }
    }
}

/// The last subject a publisher rendered, kept so that a run of events to
/// one subject (the usual case) validates and allocates it once.
#[derive(Clone, Default)]
pub(crate) struct SubjectCache {
    last: Option<(Arc<str>, async_nats::Subject)>,
}

impl SubjectCache {
    /// The subject for `event` under `template`, as the receipt's topic and
    /// as the wire subject.
    pub(crate) fn get(
        &mut self,
        template: &SubjectTemplate,
        event: &Event,
    ) -> Result<(Arc<str>, async_nats::Subject), Error> {
        let rendered = template.render_unchecked(event);
        if let Some((text, subject)) = &self.last
            && **text == *rendered
        {
            return Ok((text.clone(), subject.clone()));
        }
        validate_topic(&rendered)?;
        let text: Arc<str> = Arc::from(&*rendered);
        let subject = async_nats::Subject::from(&*rendered);
        self.last = Some((text.clone(), subject.clone()));
        Ok((text, subject))
    }
}

impl Default for SubjectTemplate {
    fn default() -> Self {
        SubjectTemplate::topic()
    }
}

impl fmt::Debug for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SubjectTemplate").field(&self.text).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_render_and_results_are_validated() {
        let event = Event::builder("user.created").source("billing").build().unwrap();
        let t = SubjectTemplate::new("app.{source}.{type}.v1").unwrap();
        assert_eq!(t.render(&event).unwrap(), "app.billing.user.created.v1");
        assert_eq!(
            SubjectTemplate::new("{type}").unwrap().render(&event).unwrap(),
            "user.created"
        );
        let spaced = Event::builder("user.created")
            .source("has space")
            .build()
            .unwrap();
        let err = t.render(&spaced).unwrap_err();
        assert_eq!(err.kind(), watchtower::ErrorKind::InvalidTopic);
        let routed = event.clone().with_topic("audit.all");
        assert_eq!(SubjectTemplate::topic().render(&routed).unwrap(), "audit.all");
    }
}
