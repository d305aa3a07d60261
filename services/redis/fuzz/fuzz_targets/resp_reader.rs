//! The publisher's RESP reader on arbitrary bytes, given whole and cut
//! into pieces: it never panics, its ranges stay inside the buffer, the
//! cuts do not change what it reads, and its work stays linear.

#![no_main]

use libfuzzer_sys::fuzz_target;
use watchtower_redis::fuzzing::{Frame, MAX_REPLY, Reader};

/// Every reply in `buf`, fed `step` bytes more at a time (all at once for
/// 0), and the reader's work.
fn read(buf: &[u8], step: usize) -> (Vec<Frame>, Option<String>, u64) {
    let mut reader = Reader::new();
    let mut frames = Vec::new();
    let mut start = 0;
    let mut end = if step == 0 { buf.len() } else { 0 };
    loop {
        end = (end + step).min(buf.len());
        loop {
            match reader.parse(&buf[..end], start) {
                Ok(Some((frame, next))) => {
                    assert!(next > start && next <= end, "reply end {next} outside {start}..={end}");
                    if let Frame::Status(r) | Frame::Error(r) | Frame::Bulk(r) = &frame {
                        assert!(start <= r.start && r.start <= r.end && r.end <= next);
                    }
                    assert!(next - start <= MAX_REPLY);
                    frames.push(frame);
                    start = next;
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string()), reader.examined()),
            }
        }
        if end == buf.len() {
            return (frames, None, reader.examined());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, buf)) = data.split_first() else {
        return;
    };
    let whole = read(buf, 0);
    let cut = read(buf, usize::from(step % 16) + 1);
    // A reply cut short is still waiting; one that fails does so wherever
    // the bytes were cut, unless a too-large one was noticed earlier.
    assert_eq!(whole.0, cut.0);
    if whole.1.as_deref() != Some("reply too large") && cut.1.as_deref() != Some("reply too large") {
        assert_eq!(whole.1, cut.1);
    }
    // Linear work: each byte examined a bounded number of times.
    let bound = 3 * buf.len() as u64 + 64;
    assert!(whole.2 <= bound && cut.2 <= bound, "{} / {} for {} bytes", whole.2, cut.2, buf.len());
});
