//! Arbitrary headers and body through `Binding::REDIS`: no panic; what
//! decodes encodes and decodes back to the same event, in this binding and
//! in structured mode.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use watchtower::codec::{Binding, structured};

const BINDING: Binding = Binding::REDIS;

fuzz_target!(|input: (Vec<(String, Vec<u8>)>, Option<Vec<u8>>)| {
    let (headers, body) = input;
    // Most generated names miss the prefix; give half of them the prefix.
    let headers: Vec<(String, Vec<u8>)> = headers
        .into_iter()
        .enumerate()
        .map(|(i, (name, value))| {
            if i % 2 == 0 { (format!("{}{name}", BINDING.prefix()), value) } else { (name, value) }
        })
        .collect();
    let Ok(event) = BINDING.decode(headers, body.map(Bytes::from)) else { return };
    let mut written = Vec::new();
    BINDING.write_headers(&event, |k, v| written.push((k.to_owned(), v.to_owned())));
    let back = BINDING
        .decode(written, event.data().cloned())
        .expect("headers written from a decoded event decode");
    assert_eq!(back, event, "binary round trip");
    let json = structured::to_vec(&event).expect("a decoded event encodes");
    let back = structured::from_slice(&json).expect("an encoded event decodes");
    assert_eq!(back, event, "structured round trip");
});
