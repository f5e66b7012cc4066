//! One TCP connection: its role, its receive buffer and its outgoing frame queue.

use bytes::{Buf, Bytes, BytesMut};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;
use transport::envelope::{self, HEADER_LEN};
use transport::PeerId;

/// Payloads at least this long are copied once into their own buffer and written as
/// their own iovec; shorter ones are copied into the queue's shared tail chunk.
const BIG: usize = 8 * 1024;
/// Most iovecs handed to one `writev`.
const MAX_IOV: usize = 64;

/// Which way a connection was made, hence what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// We dialed `PeerId`: our messages and requests go out, answers come back.
    Outgoing(PeerId),
    /// A peer dialed us (`None` until its HELLO is accepted): its messages and requests
    /// come in, our answers go out.
    Incoming(Option<PeerId>),
}

/// Outgoing bytes as a list of chunks, written with vectored I/O.
///
/// Small frames are appended to `tail`, one growing buffer shared by many frames (its
/// space is reclaimed once the chunks split off it are written and dropped); a large
/// payload gets its own chunk after its header. So a burst of frames goes out in one
/// `writev` with no per-frame allocation for small ones.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    queued: usize,
}

impl OutQueue {
    /// Bytes queued and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Queues one frame whose payload is `meta` followed by `body`.
    pub(crate) fn push_frame(&mut self, kind: u8, meta: &[u8], body: &[u8]) {
        let h = envelope::header(kind, &[meta, body]);
        self.tail.extend_from_slice(&h);
        self.tail.extend_from_slice(meta);
        if body.len() >= BIG {
            self.seal();
            self.chunks.push_back(Bytes::copy_from_slice(body));
        } else {
            self.tail.extend_from_slice(body);
        }
        self.queued += HEADER_LEN + meta.len() + body.len();
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("advance within queued bytes");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Writes as much as the socket takes. `Ok(true)`: all written.
    pub(crate) fn flush(&mut self, w: &mut impl Write) -> io::Result<bool> {
        self.seal();
        loop {
            if self.chunks.is_empty() {
                return Ok(true);
            }
            let (res, asked) = {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut n = 0;
                let mut asked = 0;
                for c in self.chunks.iter().take(MAX_IOV) {
                    iov[n] = IoSlice::new(c);
                    asked += c.len();
                    n += 1;
                }
                (w.write_vectored(&iov[..n]), asked)
            };
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.advance(k);
                    if k < asked {
                        // The socket buffer is full: wait for the next writable edge.
                        return Ok(self.chunks.is_empty());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a read pass found.
pub(crate) enum ReadOutcome {
    /// Read `n` bytes into the buffer; the socket may hold more (`more`).
    Data { n: usize, more: bool },
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed its side.
    Eof,
    /// The TLS layer failed (handshake or record): why.
    Tls(String),
}

/// Hands plaintext to a TLS connection; `WouldBlock` when its buffer is full.
struct PlainSink<'a>(&'a mut rustls::Connection);

impl Write for PlainSink<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(b)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.0.writer().write_vectored(bufs)? {
            0 if bufs.iter().any(|b| !b.is_empty()) => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) addr: SocketAddr,
    pub(crate) role: Role,
    /// The TCP connect completed (always true for accepted connections).
    pub(crate) connected: bool,
    /// The handshake completed.
    pub(crate) established: bool,
    /// Close if not established by then.
    pub(crate) deadline: Option<Instant>,
    /// Received bytes not yet decoded.
    pub(crate) rbuf: BytesMut,
    pub(crate) out: OutQueue,
    /// Listed in the transport's dirty list (has output to flush).
    pub(crate) dirty: bool,
    /// The challenge-response in progress (with a cluster secret).
    pub(crate) auth: Option<Box<AuthState>>,
    /// The TLS session (with [`crate::TcpConfig::tls`]): frames go through it.
    pub(crate) tls: Option<Box<rustls::Connection>>,
}

/// Handshake state of a connection authenticating with the cluster secret.
#[derive(Clone, Debug)]
pub(crate) struct AuthState {
    /// Incoming: the node the HELLO claimed (not yet proven). Outgoing: the peer dialed.
    pub(crate) peer: PeerId,
    /// The digest the dialer sent in HELLO.
    pub(crate) digest: u64,
    /// The acceptor's nonce (outgoing: `None` until the CHALLENGE arrived).
    pub(crate) acceptor_nonce: Option<[u8; 32]>,
    /// The dialer's nonce.
    pub(crate) dialer_nonce: [u8; 32],
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, addr: SocketAddr, role: Role, connected: bool, deadline: Instant) -> Self {
        Conn {
            stream,
            addr,
            role,
            connected,
            auth: None,
            tls: None,
            established: false,
            deadline: Some(deadline),
            rbuf: BytesMut::new(),
            out: OutQueue::default(),
            dirty: false,
        }
    }

    /// Whether there is anything to write: queued frames, or TLS records.
    pub(crate) fn has_output(&self) -> bool {
        self.out.queued() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much as the socket takes (through TLS when set). `Ok(true)`: all
    /// written.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.out.flush(&mut self.stream);
        };
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            // Frames wait in the queue (counted for backpressure) until the handshake
            // is done; the read side marks the connection dirty when it is.
            if self.out.queued() == 0 || tls.is_handshaking() {
                return Ok(self.out.queued() == 0);
            }
            let before = self.out.queued();
            self.out.flush(&mut PlainSink(tls))?;
            if self.out.queued() == before && !tls.wants_write() {
                return Ok(false);
            }
        }
    }

    /// One `read` into `scratch`, appended to the receive buffer.
    pub(crate) fn read_once(&mut self, scratch: &mut [u8]) -> io::Result<ReadOutcome> {
        if self.tls.is_some() {
            return self.read_tls_once(scratch);
        }
        loop {
            match self.stream.read(scratch) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    return Ok(ReadOutcome::Data { n, more: n == scratch.len() });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Conn {
    /// [`Conn::read_once`] through TLS: one socket read into the session, then all the
    /// plaintext it yields. Edge-triggered readiness: `more` whenever the socket gave
    /// bytes, so the caller reads on until `WouldBlock`.
    fn read_tls_once(&mut self, scratch: &mut [u8]) -> io::Result<ReadOutcome> {
        let tls = self.tls.as_deref_mut().expect("a TLS connection");
        let mut got_raw = 0;
        let mut eof = false;
        loop {
            match tls.read_tls(&mut self.stream) {
                Ok(0) => eof = true,
                Ok(n) => got_raw = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            break;
        }
        if let Err(e) = tls.process_new_packets() {
            let what = if tls.is_handshaking() { "TLS handshake failed" } else { "TLS error" };
            // Best effort: tell the peer (an alert is queued).
            let _ = tls.write_tls(&mut self.stream);
            return Ok(ReadOutcome::Tls(format!("{what}: {e}")));
        }
        let mut plain = 0;
        loop {
            match tls.reader().read(scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    plain += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    eof = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if got_raw > 0 || plain > 0 {
            Ok(ReadOutcome::Data { n: got_raw.max(plain), more: true })
        } else if eof {
            Ok(ReadOutcome::Eof)
        } else {
            Ok(ReadOutcome::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::envelope::Decoder;

    /// A writer taking at most `cap` bytes per call, then WouldBlock every other call.
    struct Slow {
        out: Vec<u8>,
        cap: usize,
        block: bool,
    }
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.block = !self.block;
            if self.block {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.cap);
            self.out.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queue_survives_partial_writes() {
        let mut q = OutQueue::default();
        let big = vec![7u8; 20_000];
        let mut expected = Vec::new();
        for i in 0..50u8 {
            let body: &[u8] = if i % 7 == 0 { &big } else { &[i; 100][..] };
            q.push_frame(16, &[i, i], body);
            envelope::encode(16, &[&[i, i][..], body].concat(), &mut expected);
        }
        assert_eq!(q.queued(), expected.len());
        let mut w = Slow { out: Vec::new(), cap: 333, block: false };
        let mut rounds = 0;
        while !q.flush(&mut w).unwrap() {
            rounds += 1;
            assert!(rounds < 100_000);
        }
        assert_eq!(q.queued(), 0);
        assert_eq!(w.out, expected);
        let mut b = BytesMut::from(&w.out[..]);
        let d = Decoder::new(1 << 20);
        let mut n = 0;
        loop {
            match d.decode(&mut b) {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(e) => panic!("frame {n} of the written stream does not decode: {e}"),
            }
        }
        assert_eq!(n, 50);
    }
}
