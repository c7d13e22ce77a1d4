//! A line reader with a hard cap that never buffers an over-long line.
//!
//! `BufRead::read_line` grows its buffer until it sees a newline, so one
//! hostile line without a newline takes all memory. [`LineReader`] keeps
//! at most `max` bytes of the current line; past that it switches to
//! discarding until the next newline and then reports
//! [`Frame::TooLong`] with the length it skipped. Memory is bounded by
//! `max` plus a fixed read buffer, whatever arrives.
//!
//! State survives errors: a read that times out (`WouldBlock`,
//! `TimedOut`) leaves the partial line in place, so the caller can retry
//! on the same reader without losing or corrupting a line. That is what
//! makes a per-request timeout on the host client safe.

use std::io::{self, ErrorKind, Read};

const READ_BUF: usize = 64 * 1024;

/// One framed line.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A line, newline (and a `\r` before it) stripped.
    Line(&'a [u8]),
    /// A line longer than the cap; `len` bytes were read and dropped.
    TooLong { len: usize },
}

pub struct LineReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    line: Vec<u8>,
    /// `line` holds a line returned last time; clear it before reading on.
    returned: bool,
    /// Bytes of the current over-long line dropped so far (0 = not
    /// discarding).
    discarding: Option<usize>,
    max: usize,
    /// At end of stream, drop an unterminated line instead of returning it.
    drop_partial: bool,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            line: Vec::new(),
            returned: false,
            discarding: None,
            max,
            drop_partial: false,
        }
    }

    /// At end of stream, drop an unterminated line (and an over-long one
    /// in progress) instead of returning it: for a stream whose writer may
    /// vanish mid-line and come back as someone else (virtio-serial).
    pub fn drop_partial_at_eof(mut self, yes: bool) -> Self {
        self.drop_partial = yes;
        self
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes of a partial line held (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        if self.returned { 0 } else { self.line.len() }
    }

    /// Drop a partial line and anything buffered after it: a client that
    /// reconnects to a stream must not see a previous session's tail.
    pub fn reset(&mut self) {
        self.line.clear();
        self.returned = false;
        self.discarding = None;
        self.start = 0;
        self.end = 0;
    }

    /// The next line, or `None` at end of stream. A final line without a
    /// newline is returned as a line (unless [`Self::drop_partial_at_eof`]).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        if self.returned {
            self.line.clear();
            self.returned = false;
        }
        loop {
            if self.start == self.end {
                let n = loop {
                    match self.inner.read(&mut self.buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                if n == 0 {
                    if self.drop_partial {
                        self.reset();
                        return Ok(None);
                    }
                    if let Some(len) = self.discarding.take() {
                        return Ok(Some(Frame::TooLong { len }));
                    }
                    if self.line.is_empty() {
                        return Ok(None);
                    }
                    self.returned = true;
                    return Ok(Some(Frame::Line(strip_cr(&self.line))));
                }
                self.start = 0;
                self.end = n;
            }
            let chunk = &self.buf[self.start..self.end];
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let part = &chunk[..i];
                    self.start += i + 1;
                    if let Some(len) = self.discarding.take() {
                        return Ok(Some(Frame::TooLong {
                            len: len + part.len(),
                        }));
                    }
                    if self.line.len() + part.len() > self.max {
                        let len = self.line.len() + part.len();
                        self.line.clear();
                        return Ok(Some(Frame::TooLong { len }));
                    }
                    self.line.extend_from_slice(part);
                    self.returned = true;
                    return Ok(Some(Frame::Line(strip_cr(&self.line))));
                }
                None => {
                    let n = chunk.len();
                    self.start = self.end;
                    if let Some(len) = self.discarding.as_mut() {
                        *len += n;
                    } else if self.line.len() + n > self.max {
                        self.discarding = Some(self.line.len() + n);
                        self.line = Vec::new();
                    } else {
                        self.line.extend_from_slice(chunk);
                    }
                }
            }
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn frames(data: &[u8], step: usize, max: usize) -> Vec<Result<Vec<u8>, usize>> {
        let mut r = LineReader::new(Trickle { data, step }, max);
        let mut out = vec![];
        while let Some(f) = r.next_frame().unwrap() {
            out.push(match f {
                Frame::Line(l) => Ok(l.to_vec()),
                Frame::TooLong { len } => Err(len),
            });
            assert!(
                r.line.capacity() <= max.max(READ_BUF) * 2,
                "line buffer grew past the cap"
            );
        }
        out
    }

    /// The reference: split on newlines, cap each line.
    fn model(data: &[u8], max: usize) -> Vec<Result<Vec<u8>, usize>> {
        let mut parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        if parts.last().is_some_and(|p| p.is_empty()) {
            parts.pop();
        }
        parts
            .into_iter()
            .map(|p| {
                if p.len() > max {
                    Err(p.len())
                } else {
                    Ok(strip_cr(p).to_vec())
                }
            })
            .collect()
    }

    #[test]
    fn basics() {
        assert_eq!(
            frames(b"a\nbb\r\n\nccc", 2, 10),
            vec![
                Ok(b"a".to_vec()),
                Ok(b"bb".to_vec()),
                Ok(vec![]),
                Ok(b"ccc".to_vec())
            ]
        );
        assert_eq!(
            frames(b"12345\nab\n", 3, 4),
            vec![Err(5), Ok(b"ab".to_vec())]
        );
        assert_eq!(frames(b"123456789", 100, 4), vec![Err(9)]);
        let mut r = LineReader::new(&b"a\nhalf"[..], 10).drop_partial_at_eof(true);
        assert_eq!(r.next_frame().unwrap(), Some(Frame::Line(b"a")));
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn huge_line_is_not_buffered() {
        // 64 MiB without a newline through a 1 KiB cap: the reader's line
        // buffer never exceeds the cap.
        struct Endless(usize);
        impl Read for Endless {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Ok(0);
                }
                let n = out.len().min(self.0);
                out[..n].fill(b'x');
                self.0 -= n;
                if self.0 == 0 {
                    out[n - 1] = b'\n';
                }
                Ok(n)
            }
        }
        let mut r = LineReader::new(Endless(64 << 20), 1024);
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::TooLong {
                len: (64 << 20) - 1
            })
        );
        assert!(r.line.capacity() <= 2048);
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn timeout_keeps_partial_line() {
        struct Flaky {
            parts: Vec<io::Result<Vec<u8>>>,
        }
        impl Read for Flaky {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.parts.is_empty() {
                    return Ok(0);
                }
                let p = self.parts.remove(0)?;
                out[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
        }
        let mut r = LineReader::new(
            Flaky {
                parts: vec![
                    Ok(b"{\"a\":".to_vec()),
                    Err(io::Error::from(ErrorKind::WouldBlock)),
                    Ok(b"1}\n".to_vec()),
                ],
            },
            100,
        );
        assert_eq!(r.next_frame().unwrap_err().kind(), ErrorKind::WouldBlock);
        assert_eq!(r.pending(), 5);
        assert_eq!(r.next_frame().unwrap(), Some(Frame::Line(b"{\"a\":1}")));
    }

    proptest! {
        #[test]
        fn matches_model(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..600),
            step in 1usize..70,
            max in 0usize..40,
        ) {
            prop_assert_eq!(frames(&data, step, max), model(&data, max));
        }
    }
}
