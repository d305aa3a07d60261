//! Arbitrary headers and body through `Binding::HTTP`: no panic; what
//! decodes encodes and decodes back to the same event, in this binding and
//! in structured mode.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use watchtower::codec::{Binding, structured};

const BINDING: Binding = Binding::HTTP;

/// The required attributes are usually present, so that most inputs reach
/// the round trip; the rest is arbitrary.
#[derive(Debug, Arbitrary)]
struct Input {
    specversion: bool,
    required: [Option<String>; 3],
    headers: Vec<(bool, String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let p = BINDING.prefix();
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    if input.specversion {
        headers.push((format!("{p}specversion"), b"1.0".to_vec()));
    }
    for (attr, value) in ["id", "type", "source"].iter().zip(input.required) {
        headers.push((
            format!("{p}{attr}"),
            value.unwrap_or_else(|| "x".into()).into_bytes(),
        ));
    }
    headers.extend(input.headers.into_iter().map(|(prefixed, name, value)| {
        if prefixed {
            (format!("{p}{name}"), value)
        } else {
            (name, value)
        }
    }));
    let Ok(event) = BINDING.decode(headers, input.body.map(Bytes::from)) else {
        return;
    };
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
