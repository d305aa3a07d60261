//! Topics and patterns: [`TopicPattern`](crate::TopicPattern).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, ErrorKind};

/// The longest topic or pattern accepted, in bytes.
///
/// 255, the AMQP routing-key limit, so that every pattern fits every broker.
pub const MAX_TOPIC_LEN: usize = 255;

/// Checks a concrete topic (no wildcards).
///
/// # Errors
///
/// [`ErrorKind::InvalidTopic`] if the topic is empty, longer than
/// [`MAX_TOPIC_LEN`], has an empty token, or contains whitespace, a control
/// character, `#`, `*` or `>`.
pub fn validate_topic(topic: &str) -> Result<(), Error> {
    check_common(topic)?;
    if let Some(token) = topic.split('.').find(|t| t.contains(['*', '>'])) {
        return Err(invalid(topic, &format!("wildcard token {token:?} in a topic")));
    }
    Ok(())
}

fn check_common(text: &str) -> Result<(), Error> {
    if text.is_empty() {
        return Err(invalid(text, "empty"));
    }
    if text.len() > MAX_TOPIC_LEN {
        return Err(invalid(text, "longer than 255 bytes"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(text, "contains whitespace or a control character"));
    }
    if text.contains('#') {
        // `#` is AMQP's multi-token wildcard; as a literal it would change
        // meaning on RabbitMQ.
        return Err(invalid(text, "contains `#`"));
    }
    if text.split('.').any(str::is_empty) {
        return Err(invalid(text, "has an empty token"));
    }
    Ok(())
}

fn invalid(text: &str, why: &str) -> Error {
    let shown: String = text.chars().take(64).collect();
    Error::new(ErrorKind::InvalidTopic, format!("{shown:?} {why}"))
}

/// A validated topic pattern.
///
/// Topics and topic patterns: one syntax for every transport.
///
/// A topic is a dot-separated list of non-empty tokens (`user.created`).
/// A pattern may use `*` for exactly one token and `>` as its last token
/// for one or more remaining tokens, as NATS does:
///
/// | pattern | matches | does not match |
/// |---|---|---|
/// | `user.created` | `user.created` | `user.deleted` |
/// | `user.*` | `user.created` | `user`, `user.a.b` |
/// | `user.>` | `user.a`, `user.a.b` | `user` |
///
/// Transports convert patterns to their broker's syntax:
/// [`TopicPattern::to_amqp`] for RabbitMQ (`*` and `#`), the pattern itself
/// for NATS, and [`TopicPattern::matches`] where a broker has no wildcards.
///
/// ```
/// use watchtower::TopicPattern;
///
/// let pattern: TopicPattern = "user.>".parse()?;
/// assert!(pattern.matches("user.created"));
/// assert!(pattern.matches("user.profile.updated"));
/// assert!(!pattern.matches("order.created"));
/// assert_eq!(pattern.to_amqp(), "user.#");
/// assert!("user.>.x".parse::<TopicPattern>().is_err());
/// # Ok::<(), watchtower::Error>(())
/// ```
///
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    text: Arc<str>,
    wildcard: bool,
}

impl TopicPattern {
    /// Parses and validates a pattern.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] if the pattern is not a valid topic
    /// except for whole-token `*`, and a whole-token `>` in last place.
    pub fn new(text: &str) -> Result<TopicPattern, Error> {
        check_common(text)?;
        let mut tokens = text.split('.').peekable();
        let mut wildcard = false;
        while let Some(token) = tokens.next() {
            match token {
                "*" => wildcard = true,
                ">" if tokens.peek().is_none() => wildcard = true,
                ">" => return Err(invalid(text, "has `>` before its last token")),
                t if t.contains(['*', '>']) => {
                    return Err(invalid(text, "uses `*` or `>` inside a token"));
                }
                _ => {}
            }
        }
        Ok(TopicPattern {
            text: Arc::from(text),
            wildcard,
        })
    }

    /// Parses several patterns, failing on the first invalid one.
    ///
    /// # Errors
    ///
    /// As [`TopicPattern::new`], and [`ErrorKind::InvalidTopic`] if there are
    /// none.
    pub fn parse_all<I, S>(patterns: I) -> Result<Vec<TopicPattern>, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| TopicPattern::new(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if patterns.is_empty() {
            return Err(Error::new(ErrorKind::InvalidTopic, "no topic patterns given"));
        }
        Ok(patterns)
    }

    /// The pattern as written (also its NATS subject form).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether `topic` matches the pattern.
    pub fn matches(&self, topic: &str) -> bool {
        if !self.wildcard {
            return *self.text == *topic;
        }
        let mut topic_tokens = topic.split('.');
        for token in self.text.split('.') {
            match (token, topic_tokens.next()) {
                (">", Some(t)) => return !t.is_empty() && topic_tokens.all(|t| !t.is_empty()),
                ("*", Some(t)) if !t.is_empty() => {}
                (p, Some(t)) if p == t => {}
                _ => return false,
            }
        }
        topic_tokens.next().is_none()
    }

    /// The pattern in AMQP topic-exchange syntax: `*` stays, `>` becomes
    /// `#`.
    ///
    /// AMQP's `#` also matches zero tokens (`user.#` matches `user`), a
    /// superset of `>`; subscribers filter with [`matches`](Self::matches).
    pub fn to_amqp(&self) -> String {
        match self.text.strip_suffix('>') {
            Some(head) if self.wildcard && (head.is_empty() || head.ends_with('.')) => format!("{head}#"),
            _ => self.text.to_string(),
        }
    }

    /// The pattern as a Redis `SCAN MATCH` glob. Redis globs are looser
    /// (`*` crosses dots), so results must be filtered with
    /// [`matches`](Self::matches). Glob metacharacters in the pattern are
    /// escaped.
    pub fn to_glob(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + 4);
        let mut tokens = self.text.split('.').peekable();
        while let Some(token) = tokens.next() {
            match token {
                "*" | ">" => out.push('*'),
                t => {
                    for c in t.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
            }
            if tokens.peek().is_some() {
                out.push('.');
            }
        }
        out
    }
}

impl FromStr for TopicPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicPattern::new(s)
    }
}

impl TryFrom<&str> for TopicPattern {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TopicPattern::new(s)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    #[test]
    fn matching() {
        let cases = [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("*.b", "a.b", true),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b", true),
            ("*", "a.b", false),
            ("a.*.c", "a.x.c", true),
            ("a.*.c", "a.x.d", false),
            ("a.*", "a.", false),
            ("a.>", "a..b", false),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(p(pattern).matches(topic), expected, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn invalid_patterns_are_typed_errors() {
        for bad in [
            "",
            "a.#",
            "a..b",
            ".a",
            "a.",
            "a.>.b",
            "a*",
            "a.b>",
            "a b",
            "a\n",
            &"x".repeat(256),
        ] {
            let err = TopicPattern::new(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidTopic, "{bad:?}");
        }
        assert_eq!(validate_topic("a.*").unwrap_err().kind(), ErrorKind::InvalidTopic);
        assert!(validate_topic("user.created").is_ok());
        assert!(TopicPattern::parse_all(Vec::<&str>::new()).is_err());
    }

    #[test]
    fn broker_syntax() {
        assert_eq!(p("a.*.>").to_amqp(), "a.*.#");
        assert_eq!(p(">").to_amqp(), "#");
        assert_eq!(p("a.b").to_amqp(), "a.b");
        assert_eq!(p("a.*").to_glob(), "a.*");
        assert_eq!(p("a?.>").to_glob(), "a\\?.*");
    }
}
