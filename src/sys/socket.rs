//! Unix sockets: the pairs the pool talks over, sending without
//! `SIGPIPE`, and file descriptors sent along (`SCM_RIGHTS`).

use super::{cvt, cvt_size};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A connected pair of close-on-exec stream sockets (one per worker: tasks
/// go one way, results the other). Writes use `MSG_NOSIGNAL`, so a dead peer
/// is `EPIPE`, never `SIGPIPE`.
pub(crate) fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_STREAM)
}

/// A connected pair of close-on-exec datagram-boundary sockets (the fork
/// server's channel, which also carries file descriptors).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_SEQPACKET)
}

fn socket_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two c_ints for socketpair to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both are fresh fds that we alone own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a socket's send and receive buffer sizes (best effort).
pub(crate) fn set_socket_buffers(fd: &OwnedFd, bytes: usize) {
    let v: libc::c_int = bytes.min(i32::MAX as usize) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: v is a live c_int and its size is passed; the fd is open.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Half-closes a stream socket for writing: the peer reads end-of-file.
pub(crate) fn shutdown_write(fd: &OwnedFd) {
    // SAFETY: shutdown on an open fd; failure (already shut) is harmless.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR);
    }
}

/// `send(2)` with `MSG_NOSIGNAL`, retrying on `EINTR`: a dead peer gives
/// `EPIPE` rather than a `SIGPIPE` that could end the process.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_flags(fd, buf, 0)
}

/// [`send`] that never blocks (`MSG_DONTWAIT`), on a socket that is in
/// blocking mode for another process that shares it.
pub(crate) fn send_nowait(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_flags(fd, buf, libc::MSG_DONTWAIT)
}

fn send_flags(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid readable region of buf.len() bytes.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | flags,
            )
        };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sends all of `buf` on a blocking socket.
pub(crate) fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send(fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Sends one datagram with file descriptors attached (`SCM_RIGHTS`; at
/// most [`MAX_FDS_PER_MSG`]).
pub(crate) fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_fds(sock, bytes, fds).map(drop)
}

/// Receives one datagram and any file descriptors attached to it (made
/// close-on-exec). Returns the byte count (0 is end-of-file) and the fds.
pub(crate) fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut fds = std::collections::VecDeque::new();
    // A datagram whose fd was lost is delivered without it: its handler
    // copes with a missing fd.
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let (n, _lost) = unsafe { recv_raw(sock, buf.as_mut_ptr(), buf.len(), &mut fds)? };
    Ok((n, fds.into()))
}

/// `recvmsg` of at most `len` bytes into `ptr`, retrying on `EINTR`; fds
/// that arrive are appended to `fds` (made close-on-exec). Returns the byte
/// count and whether fds were lost (`MSG_CTRUNC`: EMFILE, or too many).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn recv_raw(
    sock: RawFd,
    ptr: *mut u8,
    len: usize,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // Room for the most fds one message can carry (MAX_FDS_PER_MSG: a
    // frame with many SharedBufs sends them in messages of that many).
    let mut cbuf: Control = [0; 130];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: iov covers `len` writable bytes (the caller's promise) and
        // cbuf is live for the call.
        let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => break n,
        }
    };
    take_fds(&msg, fds);
    Ok((n, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Takes ownership of the fds that `recvmsg` delivered into `msg`'s
/// control buffer.
fn take_fds(msg: &libc::msghdr, fds: &mut std::collections::VecDeque<OwnedFd>) {
    // SAFETY: the kernel filled msg_control with well-formed headers up to
    // msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only within it, and each
    // SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds that were
    // installed in this process for us alone to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push_back(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// The most fds that one `sendmsg` on a Unix socket may carry (the
/// kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MSG: usize = 253;

/// A control buffer with room for one `SCM_RIGHTS` header and
/// [`MAX_FDS_PER_MSG`] fds, 8-aligned: 1040 bytes, of which
/// `CMSG_SPACE(4 * 253)` takes 1032.
type Control = [u64; 130];

/// `sendmsg` of `buf` with up to [`MAX_FDS_PER_MSG`] fds attached (to its
/// first byte; none is a plain send), with `MSG_NOSIGNAL`, retrying on
/// `EINTR`; returns the bytes sent (the fds went with them if > 0).
pub(crate) fn send_fds(sock: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MSG {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    let mut cbuf: Control = [0; 130];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes) } as _;
        // SAFETY: cbuf (a Control) holds CMSG_SPACE(4 * 253) bytes, so one
        // header and fds.len() <= 253 fds, which CMSG_FIRSTHDR and
        // CMSG_DATA address within it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: msg and what it points to (iov, cbuf) live across the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads at most `max` bytes (at least 1) of a stream socket onto the end
/// of `buf`, growing it, through `recvmsg`: fds that arrive are appended to
/// `fds` in order (made close-on-exec). Returns the byte count (0 is
/// end-of-file); an error if fds sent with the bytes were lost.
pub(crate) fn recv_append(
    sock: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < max {
        buf.try_reserve(max)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    }
    let spare = buf.capacity() - buf.len();
    let want = spare.min(max.max(1));
    // SAFETY: [len, len + want) lies within buf's allocation (want <= spare
    // capacity), so the pointer is valid for writes of `want` bytes.
    let (n, lost) = unsafe { recv_raw(sock, buf.as_mut_ptr().add(buf.len()), want, fds)? };
    // SAFETY: recvmsg initialised exactly n <= want bytes past len.
    unsafe { buf.set_len(buf.len() + n) };
    if lost {
        // The frames that name the lost fds would take the wrong ones: the
        // stream cannot be trusted any more.
        return Err(io::Error::other(
            "file descriptors sent with the stream were lost",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn an_fd_sent_with_a_datagram_arrives_as_the_same_file() {
        let (a, b) = seqpacket_pair().unwrap();
        let efd = crate::sys::eventfd().unwrap();
        send_with_fds(a.as_raw_fd(), b"hi", &[efd.as_raw_fd()]).unwrap();
        send_with_fds(a.as_raw_fd(), b"bare", &[]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 1));
        assert_ne!(fds[0].as_raw_fd(), efd.as_raw_fd());
        crate::sys::eventfd_signal(fds[0].as_raw_fd());
        assert!(crate::sys::readable_now(efd.as_raw_fd()));
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"bare"[..], 0));
    }

    #[test]
    fn fds_on_a_stream_are_appended_in_order_and_too_many_are_refused() {
        let (a, b) = stream_pair().unwrap();
        let (e1, e2) = (
            crate::sys::eventfd().unwrap(),
            crate::sys::eventfd().unwrap(),
        );
        let sent = send_fds(a.as_raw_fd(), b"abc", &[e1.as_raw_fd(), e2.as_raw_fd()]).unwrap();
        assert_eq!(sent, 3);
        let too_many = [e1.as_raw_fd(); MAX_FDS_PER_MSG + 1];
        let e = send_fds(a.as_raw_fd(), b"x", &too_many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let (mut buf, mut fds) = (Vec::new(), VecDeque::new());
        assert_eq!(
            recv_append(b.as_raw_fd(), &mut buf, 64, &mut fds).unwrap(),
            3
        );
        assert_eq!((buf.as_slice(), fds.len()), (&b"abc"[..], 2));
        crate::sys::eventfd_signal(fds[1].as_raw_fd());
        assert!(crate::sys::readable_now(e2.as_raw_fd()));
        assert!(!crate::sys::readable_now(e1.as_raw_fd()));
    }
}
