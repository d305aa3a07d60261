//! Reading Redis replies (RESP2) off a buffer, for the publisher's own
//! connection.
//!
//! Only what a connection that sends `AUTH`, `SELECT` and `XADD` needs:
//! every RESP2 reply is recognised and its length found, so that each reply
//! is matched to its command; the parts a caller needs are borrowed from the
//! buffer. Anything else (a RESP3 type, a bad length, a missing line end)
//! is a malformed reply, and the connection cannot be trusted after it.
//!
//! Replies come from the network, so the reader bounds what one reply may
//! cost. A whole reply, nested arrays included, is at most [`MAX_REPLY`]
//! bytes and [`MAX_ELEMENTS`] elements, with arrays nested at most
//! [`MAX_DEPTH`] deep; a length beyond these fails as soon as its header is
//! read, without waiting for the bytes it announces. The reader also
//! resumes where it stopped: bytes arriving a few at a time are each
//! examined a bounded number of times, so the work for one reply is linear
//! in its size however it is cut up.

use std::fmt;
use std::ops::Range;

use watchtower::Error;

/// Largest whole reply, in bytes: the publisher's read buffer
/// (64 KiB) holds any reply whole. The longest reply the publisher expects
/// is an error line; an entry id is about 20 bytes.
pub const MAX_REPLY: usize = 64 * 1024;

/// Most elements in one reply, counting every nested one and the reply
/// itself.
pub const MAX_ELEMENTS: usize = 1024;

/// How deep arrays may nest.
pub const MAX_DEPTH: usize = 4;

/// Longest integer or length line (`i64::MIN` has 20 characters).
const MAX_NUMBER: usize = 20;

/// One reply, with the ranges of the buffer that hold its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
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

impl Frame {
    fn shifted(self, by: usize) -> Frame {
        let shift = |r: Range<usize>| r.start + by..r.end + by;
        match self {
            Frame::Status(r) => Frame::Status(shift(r)),
            Frame::Error(r) => Frame::Error(shift(r)),
            Frame::Bulk(r) => Frame::Bulk(shift(r)),
            other => other,
        }
    }
}

/// Why bytes are not a RESP2 reply the reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// A type byte that is not one of `+ - : $ *`.
    UnknownType,
    /// An integer or length that is not a number.
    NotANumber,
    /// A length below -1.
    NegativeLength,
    /// A CR not followed by LF, or a bulk string not followed by CR LF.
    MissingLineEnd,
    /// Arrays nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// More than [`MAX_ELEMENTS`] elements in one reply.
    TooManyElements,
    /// A reply longer than [`MAX_REPLY`] bytes.
    TooLarge,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::UnknownType => "unknown reply type",
            Malformed::NotANumber => "not a number",
            Malformed::NegativeLength => "length out of range",
            Malformed::MissingLineEnd => "missing line end",
            Malformed::TooDeep => "arrays nested too deep",
            Malformed::TooManyElements => "too many elements",
            Malformed::TooLarge => "reply too large",
        })
    }
}

impl std::error::Error for Malformed {}

impl From<Malformed> for Error {
    fn from(m: Malformed) -> Error {
        Error::decode(format!("malformed reply from Redis: {m}"))
    }
}

/// Where the reader is inside the current element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Looking for the end of the header line that starts at `next`.
    Header,
    /// Waiting for a bulk string's `len` bytes at `data` and its CR LF.
    Bulk { data: usize, len: usize },
}

/// Reads one reply after another, resuming where it stopped when a reply
/// is not all there yet.
///
/// Offsets inside a reply are kept from its start, so the buffer may be
/// compacted between calls as long as the reply's start moves with it.
#[derive(Debug, Clone)]
pub struct Reader {
    /// Where the current element starts, from the reply's start.
    next: usize,
    /// How far the search for the current header's line end got.
    scanned: usize,
    step: Step,
    /// Elements still to come in each open array, outermost first.
    open: [usize; MAX_DEPTH],
    depth: usize,
    elements: usize,
    /// The reply's own frame (ranges from its start), once known.
    top: Option<Frame>,
    examined: u64,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader::new()
    }
}

impl Reader {
    /// A reader at the start of a reply.
    pub fn new() -> Reader {
        Reader {
            next: 0,
            scanned: 0,
            step: Step::Header,
            open: [0; MAX_DEPTH],
            depth: 0,
            elements: 0,
            top: None,
            examined: 0,
        }
    }

    /// Bytes examined since the reader was made: the work done, which
    /// stays linear in the bytes given however they are cut up.
    pub fn examined(&self) -> u64 {
        self.examined
    }

    /// The reply that starts at `buf[start]` (its ranges index `buf`) and
    /// the offset just after it, or `None` while the buffer does not hold
    /// all of it yet. Call again with the same `start` (or the same reply
    /// moved) and more bytes after it; after a whole reply, the next call
    /// reads the next one.
    ///
    /// # Errors
    ///
    /// [`Malformed`] for bytes that are not a RESP2 reply or a reply
    /// beyond the limits. The reader is then left where it failed: the
    /// connection cannot be trusted any more.
    pub fn parse(&mut self, buf: &[u8], start: usize) -> Result<Option<(Frame, usize)>, Malformed> {
        let rest = buf.get(start..).unwrap_or_default();
        loop {
            if !self.element(rest)? {
                if rest.len() > MAX_REPLY {
                    return Err(Malformed::TooLarge);
                }
                return Ok(None);
            }
            if self.closed() {
                let end = self.next;
                let top = self.top.take().unwrap_or(Frame::Null);
                *self = Reader {
                    examined: self.examined,
                    ..Reader::new()
                };
                if end > MAX_REPLY {
                    return Err(Malformed::TooLarge);
                }
                return Ok(Some((top.shifted(start), start + end)));
            }
        }
    }

    /// Reads the element at `next` as far as `rest` allows; `true` once it
    /// is whole (its header, for an array).
    fn element(&mut self, rest: &[u8]) -> Result<bool, Malformed> {
        if let Step::Bulk { data, len } = self.step {
            let end = data + len;
            let Some(crlf) = rest.get(end..end + 2) else {
                return Ok(false);
            };
            self.examined += 2;
            if crlf != b"\r\n" {
                return Err(Malformed::MissingLineEnd);
            }
            self.step = Step::Header;
            self.next = end + 2;
            self.done(Frame::Bulk(data..end));
            return Ok(true);
        }
        let at = self.next;
        let Some(&kind) = rest.get(at) else {
            return Ok(false);
        };
        let from = self.scanned.max(at + 1);
        let tail = rest.get(from..).unwrap_or_default();
        let Some(cr) = tail.iter().position(|&b| b == b'\r') else {
            self.examined += tail.len() as u64;
            self.scanned = from + tail.len();
            return Ok(false);
        };
        self.examined += cr as u64 + 1;
        let cr = from + cr;
        match rest.get(cr + 1) {
            Some(b'\n') => {}
            Some(_) => return Err(Malformed::MissingLineEnd),
            None => {
                self.scanned = cr;
                return Ok(false);
            }
        }
        self.scanned = 0;
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(Malformed::TooManyElements);
        }
        let line = at + 1..cr;
        let after = cr + 2;
        self.next = after;
        match kind {
            b'+' => self.done(Frame::Status(line)),
            b'-' => self.done(Frame::Error(line)),
            b':' => {
                let n = self.number(&rest[line])?;
                self.done(Frame::Integer(n));
            }
            b'$' => match self.length(&rest[line], MAX_REPLY, Malformed::TooLarge)? {
                None => self.done(Frame::Null),
                Some(len) => {
                    if after + len + 2 > MAX_REPLY {
                        return Err(Malformed::TooLarge);
                    }
                    self.step = Step::Bulk { data: after, len };
                    return self.element(rest);
                }
            },
            b'*' => match self.length(
                &rest[line],
                MAX_ELEMENTS - self.elements,
                Malformed::TooManyElements,
            )? {
                None => self.done(Frame::Null),
                Some(0) => self.done(Frame::Array(0)),
                Some(len) => {
                    if self.depth >= MAX_DEPTH {
                        return Err(Malformed::TooDeep);
                    }
                    if self.top.is_none() {
                        self.top = Some(Frame::Array(len));
                    }
                    self.open[self.depth] = len;
                    self.depth += 1;
                }
            },
            _ => return Err(Malformed::UnknownType),
        }
        Ok(true)
    }

    /// A whole element: the reply's own frame if it is the first; one
    /// fewer to come in the arrays it closes.
    fn done(&mut self, frame: Frame) {
        if self.top.is_none() {
            self.top = Some(frame);
        }
        while self.depth > 0 {
            let left = &mut self.open[self.depth - 1];
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.depth -= 1;
        }
    }

    /// Whether the reply is whole: its frame is known and no array is open.
    fn closed(&self) -> bool {
        self.top.is_some() && self.depth == 0 && self.step == Step::Header
    }

    /// A bulk string's or array's length, at most `max` (a longer one is
    /// `too_long`); `None` for `-1` (null).
    fn length(&mut self, digits: &[u8], max: usize, too_long: Malformed) -> Result<Option<usize>, Malformed> {
        match self.number(digits)? {
            -1 => Ok(None),
            n if n < -1 => Err(Malformed::NegativeLength),
            n => match usize::try_from(n) {
                Ok(n) if n <= max => Ok(Some(n)),
                _ => Err(too_long),
            },
        }
    }

    fn number(&mut self, digits: &[u8]) -> Result<i64, Malformed> {
        if digits.len() > MAX_NUMBER {
            return Err(Malformed::NotANumber);
        }
        self.examined += digits.len() as u64;
        std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(Malformed::NotANumber)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use watchtower::ErrorKind;

    use super::*;

    fn parse(buf: &[u8], start: usize) -> Result<Option<(Frame, usize)>, Malformed> {
        Reader::new().parse(buf, start)
    }

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
            let err = Error::from(parse(bad, 0).expect_err("malformed"));
            assert_eq!(err.kind(), ErrorKind::Decode, "{bad:?}");
        }
        let long = vec![b'+'; MAX_REPLY + 2];
        assert_eq!(parse(&long, 0), Err(Malformed::TooLarge));
    }

    #[test]
    fn limits_on_a_whole_reply_hold_before_its_bytes_arrive() {
        let cases: [(&[u8], Malformed); 8] = [
            (b"$9223372036854775807\r\n", Malformed::TooLarge),
            (b"*9223372036854775807\r\n", Malformed::TooManyElements),
            (b"$-9223372036854775808\r\n", Malformed::NegativeLength),
            (b"$99999999999999999999999\r\n", Malformed::NotANumber),
            (b"*1024\r\n", Malformed::TooManyElements),
            (b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n", Malformed::TooDeep),
            (b"$65536\r\n", Malformed::TooLarge),
            (b"!3\r\nabc\r\n", Malformed::UnknownType),
        ];
        for (bytes, why) in cases {
            assert_eq!(parse(bytes, 0), Err(why), "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn nested_arrays_count_every_element_of_the_reply() {
        // 10 arrays of 200 integers: each array is short, the reply is not.
        let mut buf = b"*10\r\n".to_vec();
        for _ in 0..10 {
            buf.extend_from_slice(b"*200\r\n");
            for _ in 0..200 {
                buf.extend_from_slice(b":1\r\n");
            }
        }
        assert_eq!(parse(&buf, 0), Err(Malformed::TooManyElements));
        // Within the count, nesting is fine and the end is found.
        let mut buf = b"*4\r\n*2\r\n:1\r\n*0\r\n$-1\r\n*1\r\n+OK\r\n:9\r\n".to_vec();
        let len = buf.len();
        buf.extend_from_slice(b"+NEXT\r\n");
        assert_eq!(parse(&buf, 0), Ok(Some((Frame::Array(4), len))));
    }

    #[test]
    fn a_reply_given_one_byte_at_a_time_is_read_in_linear_work() {
        // A long error line and a long bulk string, the worst for a reader
        // that starts over on every read.
        let mut reply = b"-".to_vec();
        reply.extend(std::iter::repeat_n(b'e', 60_000));
        reply.extend_from_slice(b"\r\n$3000\r\n");
        reply.extend(std::iter::repeat_n(b'x', 3000));
        reply.extend_from_slice(b"\r\n");
        let mut reader = Reader::new();
        let mut start = 0;
        let mut frames = Vec::new();
        let mut calls = 0;
        for end in 1..=reply.len() {
            calls += 1;
            if let Some((frame, next)) = reader.parse(&reply[..end], start).unwrap() {
                frames.push(frame);
                start = next;
            }
        }
        assert_eq!(calls, reply.len());
        assert_eq!(frames, [Frame::Error(1..60_001), Frame::Bulk(60_010..63_010)]);
        assert_eq!(start, reply.len());
        // Each byte examined about once: nowhere near the 10^9 of starting over.
        assert!(
            reader.examined() <= 2 * reply.len() as u64,
            "{} bytes examined for {}",
            reader.examined(),
            reply.len()
        );
    }

    #[test]
    fn a_reply_moved_to_the_buffer_front_between_reads_still_parses() {
        let reply = b"*2\r\n$5\r\nhello\r\n:42\r\n";
        let mut buf = b"junk".to_vec();
        buf.extend_from_slice(&reply[..9]);
        let mut reader = Reader::new();
        assert_eq!(reader.parse(&buf, 4), Ok(None));
        // The connection compacts its buffer: the reply now starts at 0.
        let mut moved = reply[..9].to_vec();
        moved.extend_from_slice(&reply[9..]);
        assert_eq!(reader.parse(&moved, 0), Ok(Some((Frame::Array(2), reply.len()))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes, 0) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn cut_anywhere_the_same_replies_come_out(
            bytes in proptest::collection::vec(prop_oneof![
                Just(b"+OK\r\n".to_vec()),
                Just(b"-ERR x\r\n".to_vec()),
                Just(b":7\r\n".to_vec()),
                Just(b"$3\r\nabc\r\n".to_vec()),
                Just(b"$-1\r\n".to_vec()),
                Just(b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n".to_vec()),
            ], 1..20),
            cuts in proptest::collection::vec(1usize..40, 1..50),
        ) {
            let buf: Vec<u8> = bytes.concat();
            let mut at_once = Vec::new();
            let mut reader = Reader::new();
            let mut start = 0;
            while let Some((frame, next)) = reader.parse(&buf, start).unwrap() {
                at_once.push(frame);
                start = next;
            }
            prop_assert_eq!(at_once.len(), bytes.len());
            let mut pieces = Vec::new();
            let mut reader = Reader::new();
            let (mut start, mut end) = (0, 0);
            for cut in cuts.iter().cycle() {
                end = (end + cut).min(buf.len());
                while let Some((frame, next)) = reader.parse(&buf[..end], start).unwrap() {
                    pieces.push(frame);
                    start = next;
                }
                if end == buf.len() {
                    break;
                }
            }
            prop_assert_eq!(pieces, at_once);
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
