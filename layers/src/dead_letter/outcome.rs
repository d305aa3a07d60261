use std::fmt;

use watchtower::{Error, ErrorKind, Event};

/// What a [`DeadLetter`](super::DeadLetter) service answers: the inner
/// service's response, or word that the event was dead-lettered.
///
/// Both are `Ok`: the caller's event is safe either way. A caller that
/// wants "not delivered" as an error (a consumer handler that should nack,
/// an HTTP handler that should answer 503) uses
/// [`into_result`](Outcome::into_result).
#[derive(Debug)]
#[must_use = "an event may have been dead-lettered rather than delivered"]
pub enum Outcome<R> {
    /// The inner service succeeded.
    Delivered(R),
    /// The inner service failed for good; the event is in the dead-letter
    /// service.
    DeadLettered(DeadLettered),
}

/// An event that went to the dead-letter service, and why.
#[derive(Debug)]
pub struct DeadLettered {
    /// The event as dead-lettered, with its annotations
    /// (`deadletterreason`, `deadletterkind`, `deadlettertopic`,
    /// `deadlettertime`, `attempt`).
    pub event: Event,
    /// The final failure.
    pub error: Error,
}

impl<R> Outcome<R> {
    /// Whether the inner service succeeded.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Outcome::Delivered(_))
    }

    /// Whether the event was dead-lettered.
    pub fn is_dead_lettered(&self) -> bool {
        matches!(self, Outcome::DeadLettered(_))
    }

    /// The inner response, if delivered.
    pub fn delivered(self) -> Option<R> {
        match self {
            Outcome::Delivered(r) => Some(r),
            Outcome::DeadLettered(_) => None,
        }
    }

    /// The dead-letter record, if dead-lettered.
    pub fn dead_lettered(self) -> Option<DeadLettered> {
        match self {
            Outcome::Delivered(_) => None,
            Outcome::DeadLettered(d) => Some(d),
        }
    }

    /// The response, or an [`ErrorKind::DeadLettered`] error (not
    /// retryable) whose source is the final failure and which carries the
    /// dead-lettered event.
    ///
    /// # Errors
    ///
    /// When the event was dead-lettered.
    pub fn into_result(self) -> Result<R, Error> {
        match self {
            Outcome::Delivered(r) => Ok(r),
            Outcome::DeadLettered(DeadLettered { event, error }) => {
                Err(Error::new(ErrorKind::DeadLettered, error.to_string())
                    .with_source(error)
                    .with_event(event))
            }
        }
    }
}

/// The source of the error a caller gets when the dead-letter service
/// failed too: both failures, nothing dropped. The event itself is
/// attached to the outer error ([`Error::event`]).
#[derive(Debug)]
pub struct DeadLetterFailed {
    /// Why the event was not delivered.
    pub failure: Error,
    /// Why the dead-letter service did not take it.
    pub dead_letter_error: Error,
}

impl fmt::Display for DeadLetterFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; dead-lettering failed too: {}",
            self.failure, self.dead_letter_error
        )
    }
}

impl std::error::Error for DeadLetterFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.failure)
    }
}

impl DeadLetterFailed {
    /// Finds the two failures inside an error returned by a dead-letter
    /// layer, if that is what it is.
    pub fn find(err: &Error) -> Option<&DeadLetterFailed> {
        std::error::Error::source(err)?.downcast_ref::<DeadLetterFailed>()
    }

    pub(crate) fn into_error(self, event: Event) -> Error {
        let kind = self.failure.kind();
        let retryable = self.failure.is_retryable();
        Error::new(kind, self.to_string())
            .with_retryable(retryable)
            .with_source(self)
            .with_event(event)
    }
}
