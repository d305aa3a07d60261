//! Any bytes through the structured (CloudEvents JSON) decoder: no panic;
//! both entry points agree, and agree with the general parser alone (the
//! same event, or an error of the same kind and message); what decodes
//! encodes and decodes back to the same event, in structured mode and
//! through every binary binding.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use watchtower::codec::{Binding, structured};

fuzz_target!(|input: &[u8]| {
    let copied = structured::from_slice(input);
    let shared = structured::from_bytes(&Bytes::copy_from_slice(input));
    match (&copied, &shared) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
        _ => panic!("from_slice and from_bytes disagree: {copied:?} / {shared:?}"),
    }
    match (&copied, &structured::from_slice_by_serde(input)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!((a.kind(), a.message()), (b.kind(), b.message())),
        (a, b) => panic!("read by hand {a:?}, by serde_json {b:?}"),
    }
    let Ok(event) = copied else { return };
    let json = structured::to_vec(&event).expect("a decoded event encodes");
    let back = structured::from_slice(&json).expect("an encoded event decodes");
    assert_eq!(back, event, "structured round trip");
    for binding in [Binding::NATS, Binding::HTTP, Binding::AMQP, Binding::REDIS] {
        let mut headers = Vec::new();
        binding.write_headers(&event, |k, v| headers.push((k.to_owned(), v.to_owned())));
        let back = binding
            .decode(headers, event.data().cloned())
            .expect("headers written from a decoded event decode");
        assert_eq!(back, event, "{binding:?} round trip");
    }
});
