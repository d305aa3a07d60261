//! `Retry-After` parsing: arbitrary bytes give a duration or `None`, never
//! a panic, and a duration that saturates rather than wraps.

#![no_main]

use libfuzzer_sys::fuzz_target;
use watchtower_webhook::parse_retry_after_bytes;

fuzz_target!(|data: &[u8]| {
    if let Some(after) = parse_retry_after_bytes(data) {
        // Whatever came back can be capped and added to a clock.
        let capped = after.min(std::time::Duration::from_secs(3600));
        let _ = std::time::Instant::now() + capped;
    }
    // Dates are read against the clock, which moves between two calls.
    let digits = data.iter().any(u8::is_ascii_digit) && !data.iter().any(u8::is_ascii_alphabetic);
    if let (true, Ok(value)) = (digits, http::HeaderValue::from_bytes(data)) {
        assert_eq!(
            watchtower_webhook::parse_retry_after(&value),
            parse_retry_after_bytes(data)
        );
    }
});
