//! Reading Redis replies (RESP2) off a buffer, for the publisher's own
//! connection.
//!
//! Only what a connection that sends `AUTH`, `SELECT` and `XADD` needs:
//! every RESP2 reply is recognised and its length found, so that each reply
//! is matched to its command; the parts a caller needs are borrowed from the
//! buffer. Anything else (a RESP3 type, a bad length, a missing line end)
//! is a malformed reply, and the connection cannot be trusted after it.

use std::ops::Range;

use watchtower::Error;

/// Longest status or error line taken before the reply counts as malformed.
const MAX_LINE: usize = 64 * 1024;

/// Largest bulk string taken (an entry id is about 20 bytes).
const MAX_BULK: usize = 16 * 1024 * 1024;

/// Largest array taken, and how deep arrays may nest.
const MAX_ARRAY: usize = 1024;
const MAX_DEPTH: usize = 4;

/// One reply, with the ranges of the buffer that hold its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `+OK`: the status text.
    Status(Range<usize>),
    /// `-ERR ...`: the error line.
    Error(Range<usize>),
    /// `:n`.
    Integer(i64),
    /// `$n`: the bytes.
    Bulk(Range<usize>),
    /// `$-1` or `*-1`.
    Null,
    /// `*n`: an array of `n` replies (their contents are skipped).
    Array(usize),
}

/// The reply that starts at `buf[start]` (its ranges index `buf`) and the
/// offset just after it, or `None` while the buffer does not hold all of
/// it yet.
///
/// # Errors
///
/// [`ErrorKind::Decode`](watchtower::ErrorKind::Decode) for bytes that are
/// not a RESP2 reply.
pub(crate) fn parse(buf: &[u8], start: usize) -> Result<Option<(Frame, usize)>, Error> {
    parse_at(buf, start, 0)
}

fn parse_at(buf: &[u8], start: usize, depth: usize) -> Result<Option<(Frame, usize)>, Error> {
    let Some(&kind) = buf.get(start) else {
        return Ok(None);
    };
    let Some(line) = line(buf, start + 1)? else {
        return Ok(None);
    };
    let next = line.end + 2;
    let frame = match kind {
        b'+' => Frame::Status(line),
        b'-' => Frame::Error(line),
        b':' => Frame::Integer(number(&buf[line])?),
        b'$' => {
            let Some(len) = length(&buf[line], MAX_BULK)? else {
                return Ok(Some((Frame::Null, next)));
            };
            let end = next + len;
            let Some(crlf) = buf.get(end..end + 2) else {
                return Ok(None);
            };
            if crlf != b"\r\n" {
                return Err(malformed("bulk string without its line end"));
            }
            return Ok(Some((Frame::Bulk(next..end), end + 2)));
        }
        b'*' => {
            let Some(len) = length(&buf[line], MAX_ARRAY)? else {
                return Ok(Some((Frame::Null, next)));
            };
            if depth >= MAX_DEPTH {
                return Err(malformed("arrays nested too deep"));
            }
            let mut end = next;
            for _ in 0..len {
                match parse_at(buf, end, depth + 1)? {
                    Some((_, after)) => end = after,
                    None => return Ok(None),
                }
            }
            return Ok(Some((Frame::Array(len), end)));
        }
        _ => return Err(malformed("unknown reply type")),
    };
    Ok(Some((frame, next)))
}

/// The line from `from` to the next CR LF, without them.
fn line(buf: &[u8], from: usize) -> Result<Option<Range<usize>>, Error> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.iter().position(|&b| b == b'\r') {
        Some(cr) => match rest.get(cr + 1) {
            Some(b'\n') => Ok(Some(from..from + cr)),
            Some(_) => Err(malformed("CR without LF")),
            None => Ok(None),
        },
        None if rest.len() > MAX_LINE => Err(malformed("line too long")),
        None => Ok(None),
    }
}

/// A bulk string's or array's length, at most `max`; `None` for `-1`
/// (null).
fn length(digits: &[u8], max: usize) -> Result<Option<usize>, Error> {
    match number(digits)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .map(Some)
            .ok_or_else(|| malformed("length out of range")),
    }
}

fn number(digits: &[u8]) -> Result<i64, Error> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("not a number"))
}

fn malformed(what: &str) -> Error {
    Error::decode(format!("malformed reply from Redis: {what}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use watchtower::ErrorKind;

    use super::*;

    fn whole(buf: &[u8]) -> (Frame, usize) {
        parse(buf, 0).expect("well formed").expect("complete")
    }

    #[test]
    fn every_reply_type_and_its_end() {
        let buf =
            b"$15\r\n1700000000000-0\r\n+OK\r\n-WRONGTYPE no\r\n:42\r\n$-1\r\n*2\r\n:1\r\n$1\r\na\r\n*-1\r\n";
        let mut at = 0;
        let mut frames = Vec::new();
        while at < buf.len() {
            let (frame, used) = whole(&buf[at..]);
            frames.push(frame);
            at += used;
        }
        assert_eq!(
            frames,
            [
                Frame::Bulk(5..20),
                Frame::Status(1..3),
                Frame::Error(1..13),
                Frame::Integer(42),
                Frame::Null,
                Frame::Array(2),
                Frame::Null,
            ]
        );
        assert_eq!(&buf[5..20], b"1700000000000-0");
    }

    #[test]
    fn an_incomplete_reply_waits_for_more() {
        let full = b"$15\r\n1700000000000-0\r\n";
        for end in 0..full.len() {
            assert_eq!(parse(&full[..end], 0).expect("no error"), None, "{end}");
        }
        let array = b"*2\r\n$1\r\na\r\n:7\r\n";
        for end in 0..array.len() {
            assert_eq!(parse(&array[..end], 0).expect("no error"), None, "{end}");
        }
    }

    #[test]
    fn malformed_replies_are_decode_errors() {
        for bad in [
            &b"?what\r\n"[..],
            b"$abc\r\n",
            b"$-2\r\n",
            b"$3\r\nabcde\r\n",
            b":1\rx",
            b"*99999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            let err = parse(bad, 0).expect_err("malformed");
            assert_eq!(err.kind(), ErrorKind::Decode, "{bad:?}");
        }
        let long = vec![b'+'; MAX_LINE + 2];
        assert_eq!(parse(&long, 0).expect_err("too long").kind(), ErrorKind::Decode);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes, 0) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn bulk_strings_round_trip(text in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = format!("${}\r\n", text.len()).into_bytes();
            buf.extend_from_slice(&text);
            buf.extend_from_slice(b"\r\n");
            let (frame, used) = parse(&buf, 0).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            let Frame::Bulk(range) = frame else { panic!("not bulk") };
            prop_assert_eq!(&buf[range], &text[..]);
        }
    }
}
