//! Waiting for fds to become ready: `poll(2)`.

use super::cvt;
use std::io;
use std::os::fd::RawFd;

/// `poll(2)` on `fds`, retrying on `EINTR` (with the same timeout).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid mutable slice of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => return Ok(n as usize),
        }
    }
}

/// Whether `fd` has data (or end-of-file) to read right now.
pub(crate) fn readable_now(fd: RawFd) -> bool {
    matches!(poll_in(fd, 0), Ok(n) if n > 0)
}

/// Waits until `fd` is readable (or hung up), at most `timeout`; returns
/// whether it is.
pub(crate) fn wait_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll_in(fd, ms)? > 0)
}

/// Waits until `fd` takes a write (or hung up), at most `timeout`;
/// returns whether it does.
pub(crate) fn wait_writable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll_one(fd, libc::POLLOUT, ms)? > 0)
}

/// Whether the peer of stream socket `fd` has shut its writing side, so
/// that every byte it sent before is in this side's receive buffer (or the
/// socket hung up, or failed). Reads nothing.
#[cfg(feature = "mpi")]
pub(crate) fn peer_shut_now(fd: RawFd) -> bool {
    matches!(poll_one(fd, libc::POLLRDHUP, 0), Ok(n) if n > 0)
}

/// [`poll`] of one fd for reading (no allocation: the worker's idle spin
/// calls it in a loop).
fn poll_in(fd: RawFd, timeout_ms: i32) -> io::Result<usize> {
    poll_one(fd, libc::POLLIN, timeout_ms)
}

fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<usize> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    poll(&mut p, timeout_ms)
}

/// A set of fds to wait on with one `poll(2)`, so that no caller builds a
/// `libc::pollfd` by hand. Meant to be kept and refilled for each wait
/// (`clear`, `push`..., `poll`): once it has grown to size, it allocates
/// nothing.
#[derive(Default)]
pub(crate) struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// Empties the set (keeping its room).
    pub(crate) fn clear(&mut self) {
        self.fds.clear();
    }

    /// How many fds are in the set.
    pub(crate) fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether the set is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Adds `fd`, watched for reading if `read`, for writing if `write`
    /// (a hang-up or an error is reported either way, even for neither);
    /// returns its index.
    pub(crate) fn push(&mut self, fd: RawFd, read: bool, write: bool) -> usize {
        let mut events = 0;
        if read {
            events |= libc::POLLIN;
        }
        if write {
            events |= libc::POLLOUT;
        }
        self.push_events(fd, events)
    }

    fn push_events(&mut self, fd: RawFd, events: libc::c_short) -> usize {
        self.fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Adds stream socket `fd`, watched for its peer shutting its writing
    /// side (see [`peer_shut_now`]); returns its index.
    #[cfg(feature = "mpi")]
    pub(crate) fn push_peer_shut(&mut self, fd: RawFd) -> usize {
        self.push_events(fd, libc::POLLRDHUP)
    }

    /// Waits until an fd of the set is ready, at most `timeout_ms`
    /// milliseconds (-1: no limit; 0: not at all), retrying on `EINTR`;
    /// returns how many are.
    pub(crate) fn poll(&mut self, timeout_ms: i32) -> io::Result<usize> {
        poll(&mut self.fds, timeout_ms)
    }

    fn revents(&self, i: usize) -> libc::c_short {
        self.fds[i].revents
    }

    /// Whether the last [`poll`](PollSet::poll) saw anything of fd `i`:
    /// ready, hung up, an error, or an invalid fd.
    pub(crate) fn ready(&self, i: usize) -> bool {
        self.revents(i) != 0
    }

    /// Whether a read of fd `i` returns at once: it has data, or it hung
    /// up (end-of-file) or has an error to report.
    pub(crate) fn readable(&self, i: usize) -> bool {
        self.revents(i) & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Whether fd `i` takes a write without blocking.
    pub(crate) fn writable(&self, i: usize) -> bool {
        self.revents(i) & libc::POLLOUT != 0
    }

    /// Whether fd `i`'s peer hung up, or the fd has an error (the loops
    /// treat a hang-up as readable: the read then sees end-of-file).
    #[cfg(test)]
    fn hung_up(&self, i: usize) -> bool {
        self.revents(i) & (libc::POLLHUP | libc::POLLERR) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_socket_is_readable_once_written_and_hung_up_once_closed() {
        let (a, b) = crate::sys::stream_pair().unwrap();
        let mut set = PollSet::default();
        assert!(set.is_empty());
        let r = set.push(a.as_raw_fd(), true, false);
        let w = set.push(b.as_raw_fd(), false, true);
        assert_eq!((r, w, set.len()), (0, 1, 2));
        assert_eq!(set.poll(0).unwrap(), 1);
        assert!(!set.ready(r) && !set.readable(r));
        assert!(set.writable(w) && !set.readable(w) && !set.hung_up(w));
        crate::sys::send_all(b.as_raw_fd(), b"x").unwrap();
        assert_eq!(set.poll(0).unwrap(), 2);
        assert!(set.ready(r) && set.readable(r) && !set.writable(r) && !set.hung_up(r));
        drop(b);
        set.clear();
        assert!(set.is_empty());
        let r = set.push(a.as_raw_fd(), false, false);
        assert_eq!(set.poll(0).unwrap(), 1);
        assert!(set.hung_up(r) && set.readable(r));
    }

    #[test]
    fn an_eventfd_is_readable_until_drained() {
        let efd = crate::sys::eventfd().unwrap();
        let mut set = PollSet::default();
        let i = set.push(efd.as_raw_fd(), true, false);
        assert_eq!(set.poll(0).unwrap(), 0);
        assert!(!readable_now(efd.as_raw_fd()));
        crate::sys::eventfd_signal(efd.as_raw_fd());
        assert_eq!(set.poll(0).unwrap(), 1);
        assert!(set.readable(i) && !set.hung_up(i));
        assert!(readable_now(efd.as_raw_fd()));
        crate::sys::drain(efd.as_raw_fd());
        assert_eq!(set.poll(0).unwrap(), 0);
        assert!(!set.ready(i));
    }
}
