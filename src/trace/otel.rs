//! W3C Trace Context in the CloudEvents distributed-tracing extension,
//! between `tracing` spans (through `tracing-opentelemetry`) and events.

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::event::{Event, ext};

/// The longest `tracestate` carried: the W3C limit is 32 entries of at
/// most 256 bytes each, but 512 bytes is what the specification asks a
/// vendor to propagate at least; anything longer is dropped whole rather
/// than cut.
const MAX_TRACESTATE: usize = 512;

/// Writes `span`'s OpenTelemetry context into `event`, when the span has
/// one (it is recorded by an OpenTelemetry layer); whether it had.
pub(super) fn inject(span: &Span, event: &mut Event) -> bool {
    let cx = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    if !sc.is_valid() {
        return false;
    }
    event.insert_extension(ext::TRACEPARENT, traceparent(sc).into());
    let state = sc.trace_state().header();
    if state.is_empty() {
        event.remove_extension(ext::TRACESTATE);
    } else {
        event.insert_extension(ext::TRACESTATE, state.into());
    }
    true
}

/// Makes the context that `event` carries the parent of `span`; whether
/// it did (it carries one, and an OpenTelemetry layer records the span).
pub(super) fn set_parent(span: &Span, event: &Event) -> bool {
    event
        .traceparent()
        .and_then(|tp| parse(tp, event.extension(ext::TRACESTATE)))
        .is_some_and(|sc| {
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc))
                .is_ok()
        })
}

/// `00-<trace id>-<span id>-<flags>`.
pub(crate) fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Reads a `traceparent` (and its `tracestate`), as W3C Trace Context
/// level 1 defines them; `None` for anything else, which is then not a
/// parent (a malformed header from a foreign producer starts a new trace).
pub(crate) fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    // Version ff is invalid; a later version may append fields, version
    // 00 may not.
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate
        .filter(|s| s.len() <= MAX_TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        state,
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_back_the_same_traceparent() {
        let sc = parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert!(sc.is_remote());
        assert!(sc.is_sampled());
        assert_eq!(traceparent(&sc), TP);
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn refuses_what_w3c_refuses() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad, None).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", None).is_some());
    }

    #[test]
    fn an_oversized_or_malformed_tracestate_is_dropped_not_the_parent() {
        let long = "a=".to_owned() + &"b".repeat(100_000);
        let sc = parse(TP, Some(&long)).unwrap();
        assert_eq!(sc.trace_state().header(), "");
        let sc = parse(TP, Some("not a tracestate,,=")).unwrap();
        assert_eq!(sc.trace_state().header(), "");
    }
}
