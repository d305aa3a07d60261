//! The hub's pattern index against a linear scan: lines before an empty
//! line are patterns (invalid ones skipped), lines after it topics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchtower::TopicPattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (patterns, topics) = text.split_once("\n\n").unwrap_or((text, ""));
    let patterns: Vec<TopicPattern> = patterns
        .lines()
        .take(64)
        .filter_map(|p| TopicPattern::new(p).ok())
        .collect();
    let topics: Vec<&str> = topics.lines().take(64).collect();
    watchtower_websocket::fuzzing::index(&patterns, &topics);
});
