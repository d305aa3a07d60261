//! The body of the binary-binding fuzz targets: arbitrary headers and body
//! through one binding.

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use watchtower::codec::{Binding, structured};

/// The required attributes are usually present, so that most inputs reach
/// the round trip; the rest is arbitrary.
#[derive(Debug, Arbitrary)]
pub struct Input {
    specversion: bool,
    required: [Option<String>; 3],
    headers: Vec<(bool, String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

/// Decodes `input` through `binding`; what decodes must encode and decode
/// back to the same event, in this binding and in structured mode.
pub fn run(binding: Binding, input: Input) {
    let p = binding.prefix();
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
    let Ok(event) = binding.decode(headers, input.body.map(Bytes::from)) else {
        return;
    };
    let mut written = Vec::new();
    binding.write_headers(&event, |k, v| written.push((k.to_owned(), v.to_owned())));
    let back = binding
        .decode(written, event.data().cloned())
        .expect("headers written from a decoded event decode");
    assert_eq!(back, event, "binary round trip");
    let json = structured::to_vec(&event).expect("a decoded event encodes");
    let back = structured::from_slice(&json).expect("an encoded event decodes");
    assert_eq!(back, event, "structured round trip");
}
