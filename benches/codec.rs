//! Decoding hostile input: a 1 MiB structured event carrying 100,000
//! extension names, in ascending and in descending order, through the
//! structured codec and NATS binary headers. With the default
//! [`Limits`](watchtower::codec::Limits) the decoders refuse it after the
//! 129th extension; with the limit raised to let all of it through, the
//! decode is still `n log n`. A plain event is there as the yardstick.
//!
//! ```text
//! cargo bench --bench codec
//! ```

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use watchtower::Event;
use watchtower::codec::{Binding, Limits, structured};

const EXTENSIONS: usize = 100_000;

fn names(descending: bool) -> Vec<String> {
    let mut names: Vec<String> = (0..EXTENSIONS).map(|i| format!("a{i:06}")).collect();
    if descending {
        names.reverse();
    }
    names
}

fn structured_with(names: &[String]) -> Vec<u8> {
    let mut json = String::from(r#"{"specversion":"1.0","id":"1","type":"t","source":"/s""#);
    for name in names {
        json.push_str(&format!(r#","{name}":"v""#));
    }
    json.push('}');
    json.into_bytes()
}

fn headers_with(names: &[String]) -> Vec<(String, String)> {
    let mut headers = vec![
        ("ce-specversion".to_owned(), "1.0".to_owned()),
        ("ce-id".to_owned(), "1".to_owned()),
        ("ce-type".to_owned(), "t".to_owned()),
        ("ce-source".to_owned(), "/s".to_owned()),
    ];
    headers.extend(names.iter().map(|name| (format!("ce-{name}"), "v".to_owned())));
    headers
}

fn hostile(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_100k_extensions");
    group.sample_size(10);
    let all = Limits::default().max_extensions(EXTENSIONS);
    for (order, descending) in [("ascending", false), ("descending", true)] {
        let names = names(descending);
        let json = structured_with(&names);
        assert!(json.len() >= 1 << 20);
        let headers = headers_with(&names);
        group.bench_function(BenchmarkId::new("structured_refused", order), |b| {
            b.iter(|| structured::from_slice(black_box(&json)).unwrap_err())
        });
        group.bench_function(BenchmarkId::new("nats_headers_refused", order), |b| {
            b.iter(|| {
                Binding::NATS
                    .decode(black_box(headers.iter().map(|(k, v)| (k, v))), None)
                    .unwrap_err()
            })
        });
        group.bench_function(BenchmarkId::new("structured_all_decoded", order), |b| {
            b.iter(|| structured::from_slice_with_limits(black_box(&json), all).unwrap())
        });
        group.bench_function(BenchmarkId::new("nats_headers_all_decoded", order), |b| {
            b.iter(|| {
                Binding::NATS
                    .decode_with_limits(black_box(headers.iter().map(|(k, v)| (k, v))), None, all)
                    .unwrap()
            })
        });
    }
    group.finish();

    let plain = structured::to_vec(
        &Event::builder("user.created")
            .extension(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .json(&serde_json::json!({"user_id": 123}))
            .and_then(|b| b.build())
            .unwrap(),
    )
    .unwrap();
    c.bench_function("decode_plain_event", |b| {
        b.iter(|| structured::from_slice(black_box(&plain)).unwrap())
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    hostile(&mut c);
    c.final_summary();
}
