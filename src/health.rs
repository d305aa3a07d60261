//! The health of a transport client, in one type every transport returns.
//!
//! Every client has a `health()` method (`MemoryBroker::health`,
//! `NatsClient::health`, `RedisClient::health`, ...) that answers with a
//! [`Health`]: the transport's `messaging.system` name, a [`Status`] and,
//! when it is not up, the reason. The health view of `watchtower-layers`
//! aggregates these beside the breakers and queues of the layers, and the
//! [`Transport`](crate::Transport) trait names the method for code that is
//! generic over transports.
//!
//! # Example
//!
//! ```
//! use watchtower::health::{Health, Status};
//!
//! let health = Health::down("nats", "connection refused");
//! assert_eq!(health.status(), Status::Down);
//! assert_eq!(health.system(), "nats");
//! assert_eq!(health.reason(), Some("connection refused"));
//! assert!(!health.is_up());
//! assert!(Health::up("memory").is_up());
//! ```

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;

/// How something is doing, from best to worst: statuses order, so the
/// worst of several is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Working as configured.
    Up,
    /// Working, but not as well as configured: reconnecting with calls
    /// waiting, a half-open breaker, an endpoint with recent failures.
    Degraded,
    /// Not working: disconnected, closed, a breaker open.
    Down,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Up => "up",
            Status::Degraded => "degraded",
            Status::Down => "down",
        })
    }
}

/// The health of one transport client: its `messaging.system` name, its
/// [`Status`] and, unless it is up, why.
///
/// The reason is written for operators and never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    system: &'static str,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<Cow<'static, str>>,
}

impl Health {
    /// `system` is up.
    pub fn up(system: &'static str) -> Health {
        Health {
            system,
            status: Status::Up,
            reason: None,
        }
    }

    /// `system` works, but not as configured, because of `reason`.
    pub fn degraded(system: &'static str, reason: impl Into<Cow<'static, str>>) -> Health {
        Health {
            system,
            status: Status::Degraded,
            reason: Some(reason.into()),
        }
    }

    /// `system` does not work, because of `reason`.
    pub fn down(system: &'static str, reason: impl Into<Cow<'static, str>>) -> Health {
        Health {
            system,
            status: Status::Down,
            reason: Some(reason.into()),
        }
    }

    /// The transport's `messaging.system` name (`"nats"`, `"redis"`, ...).
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// How it is doing.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Why it is not up; `None` when it is.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// Whether the status is [`Status::Up`].
    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.system, self.status)?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_order_from_best_to_worst() {
        assert!(Status::Up < Status::Degraded && Status::Degraded < Status::Down);
        assert_eq!(
            [Status::Up, Status::Down, Status::Degraded].into_iter().max(),
            Some(Status::Down)
        );
    }

    #[test]
    fn display_names_system_status_and_reason() {
        assert_eq!(Health::up("redis").to_string(), "redis is up");
        assert_eq!(
            Health::degraded("nats", "reconnecting").to_string(),
            "nats is degraded: reconnecting"
        );
    }

    #[test]
    fn serializes_without_a_reason_when_up() {
        let json = serde_json::to_string(&Health::up("memory")).unwrap_or_default();
        assert_eq!(json, r#"{"system":"memory","status":"up"}"#);
        let json = serde_json::to_string(&Health::down("rabbitmq", "closed")).unwrap_or_default();
        assert_eq!(json, r#"{"system":"rabbitmq","status":"down","reason":"closed"}"#);
    }
}
