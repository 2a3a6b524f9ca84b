//! Request smuggling guard for HTTP/1: follows the framing of the requests a client
//! sends, head by head, alongside the HTTP server, and records for each request
//! whether its head carried both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper accepts such a request (it drops the `Content-Length` and closes the
//! connection afterwards), which is safe for hyper itself but not what a proxy in
//! front of other HTTP implementations should pass on: Envoy refuses it with 400, and
//! so does the waypoint. hyper does not expose the raw head, so [`Framing`] reads the
//! same bytes hyper reads (through [`Guarded`]) and the request handler asks
//! [`Verdicts::next`] about each request in order (HTTP/1 answers requests in order).
//!
//! Framing follows only what decides where a request ends: the head, then a body of
//! `Content-Length` bytes, a chunked body, or none. After a request that can switch
//! protocols (`Upgrade`, `CONNECT`) or a head it cannot follow, it stops: hyper
//! rejects what it cannot parse itself, and after a switch no request follows.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the guard found in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`: refuse with 400.
    LengthAndChunked,
}

/// The verdicts of a connection's requests, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Verdict>>>);

impl Verdicts {
    /// The verdict of the next request the server handles. `Ok` when the guard
    /// stopped following (after a protocol switch, or a head hyper will reject).
    pub fn next(&self) -> Verdict {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(Verdict::Ok)
    }

    fn push(&self, verdict: Verdict) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(verdict);
    }
}

/// Longest head followed; hyper answers 431 to longer ones before the guard matters.
const MAX_HEAD: usize = 1 << 20;

#[derive(Debug)]
enum State {
    /// Reading a head; the bytes so far.
    Head(Vec<u8>),
    /// `n` body bytes left.
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Not following any more.
    Stopped,
}

#[derive(Debug)]
enum Chunk {
    /// Reading a chunk-size line; the bytes so far.
    Size(Vec<u8>),
    /// `n` data bytes left, then CRLF.
    Data(u64),
    /// The CRLF after a chunk's data; how many of its bytes were seen.
    DataEnd(u8),
    /// Trailer lines after the last chunk; the current line so far.
    Trailers(Vec<u8>),
}

/// Follows the framing of a stream of HTTP/1 requests (pure: fed bytes, no IO).
#[derive(Debug)]
pub struct Framing {
    state: State,
    verdicts: Verdicts,
}

impl Framing {
    pub fn new(verdicts: Verdicts) -> Self {
        Framing {
            state: State::Head(Vec::new()),
            verdicts,
        }
    }

    /// Takes the next bytes the client sent.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match &mut self.state {
                State::Stopped => return,
                State::Head(head) => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    if head.is_empty() {
                        let skip = data.iter().take_while(|b| **b == b'\r' || **b == b'\n');
                        data = &data[skip.count()..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let before = head.len();
                    head.extend_from_slice(data);
                    let search_from = before.saturating_sub(3);
                    match find(&head[search_from..], b"\r\n\r\n") {
                        Some(at) => {
                            let end = search_from + at + 4;
                            let used = end - before;
                            let head = std::mem::take(head);
                            self.state = self.head_done(&head[..end]);
                            &data[used..]
                        }
                        None => {
                            if head.len() > MAX_HEAD {
                                self.state = State::Stopped;
                            }
                            return;
                        }
                    }
                }
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    &data[n as usize..]
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size(line) => match data.iter().position(|b| *b == b'\n') {
                        Some(at) => {
                            line.extend_from_slice(&data[..at]);
                            let size = chunk_size(line);
                            *chunk = match size {
                                Some(0) => Chunk::Trailers(Vec::new()),
                                Some(n) => Chunk::Data(n),
                                None => {
                                    self.state = State::Stopped;
                                    return;
                                }
                            };
                            &data[at + 1..]
                        }
                        None => {
                            line.extend_from_slice(data);
                            if line.len() > 4096 {
                                self.state = State::Stopped;
                            }
                            return;
                        }
                    },
                    Chunk::Data(left) => {
                        let n = (*left).min(data.len() as u64);
                        *left -= n;
                        if *left == 0 {
                            *chunk = Chunk::DataEnd(0);
                        }
                        &data[n as usize..]
                    }
                    Chunk::DataEnd(seen) => {
                        // CRLF; a bare LF is tolerated as hyper does.
                        if *seen == 0 && data[0] == b'\r' {
                            *seen = 1;
                            &data[1..]
                        } else if data[0] == b'\n' {
                            *chunk = Chunk::Size(Vec::new());
                            &data[1..]
                        } else {
                            self.state = State::Stopped;
                            return;
                        }
                    }
                    Chunk::Trailers(line) => match data.iter().position(|b| *b == b'\n') {
                        Some(at) => {
                            line.extend_from_slice(&data[..at]);
                            let empty = line.iter().all(|b| *b == b'\r');
                            if empty {
                                self.state = State::Head(Vec::new());
                            } else {
                                line.clear();
                            }
                            &data[at + 1..]
                        }
                        None => {
                            line.extend_from_slice(data);
                            if line.len() > MAX_HEAD {
                                self.state = State::Stopped;
                            }
                            return;
                        }
                    },
                },
            };
        }
    }

    /// Decides a complete head (request line, headers, the empty line) and what
    /// follows it.
    fn head_done(&self, head: &[u8]) -> State {
        let Ok(text) = std::str::from_utf8(head) else {
            return State::Stopped;
        };
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let method = request_line.split(' ').next().unwrap_or("");
        let mut length: Option<u64> = None;
        let mut has_length = false;
        let mut chunked = false;
        let mut has_te = false;
        let mut upgrade = method.eq_ignore_ascii_case("CONNECT");
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                has_length = true;
                length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if has_length && has_te {
            self.verdicts.push(Verdict::LengthAndChunked);
            // hyper closes the connection after this request: nothing follows.
            return State::Stopped;
        }
        self.verdicts.push(Verdict::Ok);
        if upgrade {
            return State::Stopped;
        }
        match (has_te, chunked, has_length, length) {
            (true, true, _, _) => State::Chunked(Chunk::Size(Vec::new())),
            // hyper rejects a non-chunked Transfer-Encoding or a bad length.
            (true, false, _, _) | (false, _, true, None) => State::Stopped,
            (false, _, true, Some(0)) | (false, _, false, _) => State::Head(Vec::new()),
            (false, _, true, Some(n)) => State::Body(n),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The size on a chunk-size line (`1a;ext=x\r`), hex.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = std::str::from_utf8(line).ok()?;
    let size = line.trim_end_matches('\r').split(';').next()?.trim();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

/// A client stream whose reads are also fed to a [`Framing`].
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    framing: Framing,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, verdicts: Verdicts) -> Self {
        Guarded {
            inner,
            framing: Framing::new(verdicts),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.framing.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns the verdicts and whether
    /// framing still follows the stream at the end.
    fn run(stream: &[u8], step: usize) -> (Vec<Verdict>, bool) {
        let verdicts = Verdicts::default();
        let mut framing = Framing::new(verdicts.clone());
        for piece in stream.chunks(step) {
            framing.feed(piece);
        }
        let following = !matches!(framing.state, State::Stopped);
        let list = verdicts.0.lock().unwrap().iter().copied().collect();
        (list, following)
    }

    #[test]
    fn framing_table() {
        use Verdict::*;
        let cases: &[(&str, &[u8], &[Verdict], bool)] = &[
            ("one GET", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &[Ok], true),
            (
                "pipelined GETs with a leading empty line",
                b"\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
                &[Ok, Ok],
                true,
            ),
            (
                "a body that looks like a smuggling head is body",
                b"POST / HTTP/1.1\r\nContent-Length: 59\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                &[Ok, Ok],
                true,
            ),
            (
                "chunked with extensions and trailers, then another request",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nTrailer: v\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                &[Ok, Ok],
                true,
            ),
            (
                "CL then TE",
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                &[LengthAndChunked],
                false,
            ),
            (
                "TE then CL, any case",
                b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n",
                &[Ok, LengthAndChunked],
                false,
            ),
            (
                "an upgrade ends the following",
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
                &[Ok],
                false,
            ),
            (
                "a bad chunk size stops",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                &[Ok],
                false,
            ),
        ];
        for (name, stream, want, following) in cases {
            for step in [1, 3, 7, stream.len()] {
                let (got, still) = run(stream, step);
                assert_eq!(&got[..], *want, "{name} (step {step})");
                assert_eq!(still, *following, "{name} (step {step})");
            }
        }
    }

    #[test]
    fn verdicts_come_out_in_order_and_default_to_ok() {
        let v = Verdicts::default();
        v.push(Verdict::Ok);
        v.push(Verdict::LengthAndChunked);
        assert_eq!(v.next(), Verdict::Ok);
        assert_eq!(v.next(), Verdict::LengthAndChunked);
        assert_eq!(v.next(), Verdict::Ok);
    }
}
