//! One non-blocking, buffered connection over a stream socket: the
//! parent's end of a worker's socket, and the MPI bridge's end of the
//! sockets it relays. Bytes that the socket does not take now wait in the
//! out buffer (with the fds that ride on given bytes) until it is
//! writable, so a reader never waits behind a write; bytes read wait in
//! the in buffer (with the fds that came with them) until whole frames are
//! there.

use crate::sys;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Above this capacity an emptied buffer is given back to the allocator (a
/// large result once must not pin its memory for the worker's life).
const KEEP_CAPACITY: usize = 8 << 20;

/// What [`Conn::flush`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything is out.
    All,
    /// The socket is full: bytes wait for it to be writable.
    Pending,
    /// The peer is gone; what was pending is dropped.
    Gone,
}

/// What [`Conn::fill`] read.
#[derive(Debug)]
pub(crate) enum Filled {
    /// Some bytes (and maybe fds) arrived.
    Some,
    /// Nothing now (`EAGAIN`).
    Nothing,
    /// End-of-file, or the peer reset the stream (it died with bytes of
    /// ours unread).
    Eof,
    /// The read failed otherwise (out of memory for the bytes, fds lost):
    /// the stream can no longer be trusted.
    Failed(io::Error),
}

/// A stream socket in non-blocking mode with its two buffers.
pub(crate) struct Conn {
    fd: OwnedFd,
    out: Vec<u8>,
    out_pos: usize,
    /// fds to send with the byte at each offset of `out`.
    out_fds: VecDeque<(usize, RawFd)>,
    /// Bytes read and not yet consumed.
    pub(crate) inbuf: Vec<u8>,
    /// fds received, in order.
    pub(crate) in_fds: VecDeque<OwnedFd>,
    /// The socket stays in blocking mode (another process reads it so):
    /// each write asks not to block instead.
    nowait: bool,
}

impl Conn {
    /// Wraps a socket (made non-blocking here) with `out` already queued.
    pub(crate) fn new(fd: OwnedFd, out: Vec<u8>) -> Conn {
        let _ = sys::set_nonblocking(&fd);
        Conn::with(fd, out, false)
    }

    fn with(fd: OwnedFd, out: Vec<u8>, nowait: bool) -> Conn {
        Conn {
            fd,
            out,
            out_pos: 0,
            out_fds: VecDeque::new(),
            inbuf: Vec::new(),
            in_fds: VecDeque::new(),
            nowait,
        }
    }

    /// Wraps a socket that another process shares in blocking mode (a
    /// worker that reads it): its mode is left alone, and writes ask not to
    /// block. Only for writing, without fds: reads would block.
    #[cfg(feature = "mpi")]
    pub(crate) fn shared(fd: OwnedFd) -> Conn {
        Conn::with(fd, Vec::new(), true)
    }

    /// The socket, once nothing more is to be written.
    #[cfg(feature = "mpi")]
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// One `send` of `bytes`, in the way this socket wants.
    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        if self.nowait {
            sys::send_nowait(self.fd.as_raw_fd(), bytes)
        } else {
            sys::send(self.fd.as_raw_fd(), bytes)
        }
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The buffer to append outgoing frames to.
    pub(crate) fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Sends `fd` with the byte at offset `at` of the out buffer (see
    /// `wire::fd_offset`). The fd must stay open until it is sent.
    pub(crate) fn attach_fd(&mut self, at: usize, fd: RawFd) {
        self.out_fds.push_back((at, fd));
    }

    /// Whether bytes wait to be sent.
    pub(crate) fn has_pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// How many bytes wait to be sent.
    #[cfg(feature = "mpi")]
    pub(crate) fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// [`flush`](Self::flush), and whether any byte went (a loop that
    /// counts a full socket as work would spin).
    #[cfg(feature = "mpi")]
    pub(crate) fn flush_some(&mut self) -> (Flushed, bool) {
        let before = self.pending();
        let f = self.flush();
        (f, self.pending() < before)
    }

    /// Drops what waits to be sent (its fds may belong to jobs that are
    /// being dropped).
    pub(crate) fn clear_out(&mut self) {
        self.out.clear();
        self.out_fds.clear();
        self.out_pos = 0;
    }

    /// Shuts the write side: the peer reads end-of-file after the last
    /// byte sent.
    pub(crate) fn shutdown_write(&self) {
        sys::shutdown_write(&self.fd);
    }

    /// Writes what the socket takes of the pending bytes.
    pub(crate) fn flush(&mut self) -> Flushed {
        while self.out_pos < self.out.len() {
            match self.send_some() {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Pending,
                Err(_) => {
                    self.clear_out();
                    return Flushed::Gone;
                }
            }
        }
        self.clear_out();
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
        Flushed::All
    }

    /// One `send`: up to the next byte that carries fds, or that byte with
    /// every fd on it (at most `MAX_FDS_PER_MSG`: `wire::fd_offset`) and
    /// the bytes up to the next such byte.
    fn send_some(&mut self) -> io::Result<usize> {
        let sock = self.fd.as_raw_fd();
        match self.out_fds.front() {
            Some(&(at, _)) if at == self.out_pos => {
                let mut group = [0 as RawFd; sys::MAX_FDS_PER_MSG];
                let mut k = 0;
                for &(o, fd) in self.out_fds.iter() {
                    if o != at || k == group.len() {
                        break;
                    }
                    group[k] = fd;
                    k += 1;
                }
                let end = self.out_fds.get(k).map_or(self.out.len(), |x| x.0);
                let r = sys::send_fds(sock, &self.out[self.out_pos..end], &group[..k]);
                if matches!(r, Ok(n) if n > 0) {
                    self.out_fds.drain(..k);
                }
                r
            }
            Some(&(at, _)) => self.send(&self.out[self.out_pos..at]),
            None => self.send(&self.out[self.out_pos..]),
        }
    }

    /// Sends what the socket takes of `bytes` after what waits, and queues
    /// the rest (bytes are copied only when the socket cannot take them).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Flushed {
        let mut from = 0;
        if !self.has_pending() {
            while from < bytes.len() {
                match self.send(&bytes[from..]) {
                    Ok(n) => from += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The peer is gone: nobody reads these bytes.
                    Err(_) => return Flushed::Gone,
                }
            }
        }
        self.out.extend_from_slice(&bytes[from..]);
        self.flush()
    }

    /// Reads up to `want` bytes (and the fds that come with them) onto the
    /// in buffer.
    pub(crate) fn fill(&mut self, want: usize) -> Filled {
        match sys::recv_append(self.fd.as_raw_fd(), &mut self.inbuf, want, &mut self.in_fds) {
            Ok(0) => Filled::Eof,
            Ok(_) => Filled::Some,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Filled::Nothing,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                Filled::Eof
            }
            Err(e) => Filled::Failed(e),
        }
    }

    /// Drops the first `n` bytes of the in buffer (consumed frames).
    pub(crate) fn consume(&mut self, n: usize) {
        self.inbuf.drain(..n);
        if self.inbuf.is_empty() && self.inbuf.capacity() > KEEP_CAPACITY {
            self.inbuf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = sys::stream_pair().expect("socketpair");
        (Conn::new(a, Vec::new()), Conn::new(b, Vec::new()))
    }

    #[test]
    fn bytes_and_fds_arrive_in_order() {
        let (mut a, mut b) = pair();
        let (x, _y) = sys::stream_pair().expect("socketpair");
        a.out().extend_from_slice(b"hello");
        a.attach_fd(2, x.as_raw_fd());
        a.out().extend_from_slice(b" world");
        assert_eq!(a.flush(), Flushed::All);
        assert!(!a.has_pending());
        let mut got = 0;
        while got < 11 {
            match b.fill(64) {
                Filled::Some => got = b.inbuf.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(&b.inbuf, b"hello world");
        assert_eq!(b.in_fds.len(), 1);
        b.consume(6);
        assert_eq!(&b.inbuf, b"world");
        assert!(matches!(b.fill(64), Filled::Nothing));
    }

    #[test]
    fn a_full_socket_keeps_bytes_pending_and_a_closed_peer_is_gone() {
        let (mut a, b) = pair();
        let big = vec![7u8; 16 << 20];
        assert_eq!(a.write(&big), Flushed::Pending);
        assert!(a.has_pending());
        drop(b);
        assert_eq!(a.flush(), Flushed::Gone);
        assert!(!a.has_pending());
    }

    #[test]
    fn end_of_file_is_seen() {
        let (a, mut b) = pair();
        a.shutdown_write();
        assert!(matches!(b.fill(64), Filled::Eof));
    }
}
