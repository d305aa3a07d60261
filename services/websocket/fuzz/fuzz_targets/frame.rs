//! Any text frame a peer sends: classified without panicking, and what
//! decodes survives its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        watchtower_websocket::fuzzing::frame(text);
    }
});
