//! The status words: the memory a parent and each of its workers share,
//! in which a worker says which task it is running (and since when), and
//! the parent says which task to skip. Its layout is a protocol between
//! the two, as the wire framing is; `sys` only maps the memory.

use crate::sys::{self, SharedAtomics};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

/// How many words each worker slot has in [`SharedWords`].
pub(crate) const STATUS_WORDS: usize = 7;

/// Words per slot when each worker's words have a page of their own (a
/// sandboxed pool: a worker unmaps every page but its own).
pub(crate) const PAGE_WORDS: usize = 4096 / 8;

/// What a worker says of itself, in memory its parent reads: the sequence
/// number of the task it started last, when it started it (CLOCK_MONOTONIC
/// nanoseconds, the clock of `Instant`), the sequence number of the last
/// task whose result it has written, which item of a chunk it runs, and
/// (written by the parent) a task to skip. A task is running while
/// `started == seq && finished < seq`.
#[derive(Clone, Copy)]
pub(crate) struct Status<'a> {
    pub(crate) started: &'a AtomicU64,
    pub(crate) start_ns: &'a AtomicU64,
    pub(crate) finished: &'a AtomicU64,
    /// Written by the parent: a task the worker must skip (cancelled before
    /// it started).
    pub(crate) skip: &'a AtomicU64,
    /// Written by a sandboxed worker as it dies of one of its limits (one
    /// of the codes in `sandbox::cause`); 0 otherwise.
    pub(crate) died_of: &'a AtomicU64,
    /// Written by a sandboxed worker as each task (each item of a chunk)
    /// starts: its own CPU time then, the base of the per-task CPU cap.
    pub(crate) item_cpu: &'a AtomicU64,
    /// Which item of the started task runs: 0 as the task starts, then
    /// 1 + the item's place in its chunk as each item of a chunk starts.
    /// Read once the worker has ended, to fail only that item of an
    /// auto-sized `imap` chunk.
    pub(crate) item: &'a AtomicU64,
}

impl Status<'_> {
    /// Zeroes the words (for a new worker in the slot).
    pub(crate) fn reset(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.store(0, SeqCst);
        self.start_ns.store(0, SeqCst);
        self.finished.store(0, SeqCst);
        self.skip.store(0, SeqCst);
        self.died_of.store(0, SeqCst);
        self.item_cpu.store(0, SeqCst);
        self.item.store(0, SeqCst);
    }

    /// Whether task `seq` is running now.
    pub(crate) fn running(&self, seq: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.load(SeqCst) == seq && self.finished.load(SeqCst) < seq
    }
}

/// A region of memory shared with the fork server and every worker, seen
/// as an array of `AtomicU64`. It is a mapping of a memfd, so that a
/// server started by exec (which inherits no memory) can map it too.
pub(crate) struct SharedWords {
    map: SharedAtomics,
    len: usize,
    fd: OwnedFd,
    /// Words from one slot to the next: [`STATUS_WORDS`], or
    /// [`PAGE_WORDS`] when each slot has a page of its own.
    stride: usize,
}

impl SharedWords {
    /// A zeroed region of `len` words.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let fd = sys::memfd()?;
        sys::set_len(&fd, Self::bytes(len))?;
        Self::map(fd, len, STATUS_WORDS)
    }

    /// A zeroed region with a page of words for each of `slots` slots.
    pub(crate) fn paged(slots: usize) -> io::Result<Self> {
        let len = slots.max(1) * PAGE_WORDS;
        let fd = sys::memfd()?;
        sys::set_len(&fd, Self::bytes(len))?;
        Self::map(fd, len, PAGE_WORDS)
    }

    /// Maps the region whose memfd is `fd` (made by [`SharedWords::new`] or
    /// [`SharedWords::paged`], as `stride` says, in the parent, inherited
    /// through exec).
    pub(crate) fn from_fd(fd: OwnedFd, stride: usize) -> io::Result<Self> {
        let len = sys::file_len(&fd)? / 8;
        if len == 0 {
            return Err(io::Error::other("the shared status words are empty"));
        }
        Self::map(fd, len, stride)
    }

    /// Whether each slot has a page of its own.
    pub(crate) fn is_paged(&self) -> bool {
        self.stride == PAGE_WORDS
    }

    /// In a freshly forked worker of a paged region: unmaps every page but
    /// slot `slot`'s and closes the memfd, so that nothing of this process
    /// can reach another worker's words. The value must never be used for
    /// another slot, nor dropped, afterwards (a worker ends with `_exit`).
    pub(crate) fn keep_only(&self, slot: usize) {
        assert!(self.is_paged() && (slot + 1) * PAGE_WORDS <= self.len);
        let page = PAGE_WORDS * 8;
        let own = slot * page;
        // Only slot `slot`'s words are used in this process again (the
        // promise above).
        self.map.unmap_except(own..own + page);
        sys::close_fd(self.fd.as_raw_fd());
    }

    fn bytes(len: usize) -> usize {
        (len.max(1) * 8).next_multiple_of(4096)
    }

    /// Maps `len` words of `fd`: at most the file's length (set in new(),
    /// or read by from_fd); the memfd is sealed against shrinking.
    fn map(fd: OwnedFd, len: usize, stride: usize) -> io::Result<Self> {
        let map = SharedAtomics::new(&fd, Self::bytes(len).min(sys::file_len(&fd)?))?;
        Ok(SharedWords {
            map,
            len,
            fd,
            stride,
        })
    }

    /// The memfd behind the region.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The memfd behind the region.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The status words of worker slot `slot`.
    pub(crate) fn status(&self, slot: usize) -> Status<'_> {
        let at = slot * self.stride;
        Status {
            started: self.word(at),
            start_ns: self.word(at + 1),
            finished: self.word(at + 2),
            skip: self.word(at + 3),
            died_of: self.word(at + 4),
            item_cpu: self.word(at + 5),
            item: self.word(at + 6),
        }
    }

    /// Word `i`.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len);
        self.map.word(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_words() {
        let words = SharedWords::new(2 * STATUS_WORDS).unwrap();
        let other = SharedWords::from_fd(words.fd().try_clone().unwrap(), STATUS_WORDS).unwrap();
        words.status(1).started.store(7, SeqCst);
        words.status(1).item_cpu.store(9, SeqCst);
        words.status(1).item.store(4, SeqCst);
        assert_eq!(other.status(1).started.load(SeqCst), 7);
        assert_eq!(other.status(1).item_cpu.load(SeqCst), 9);
        assert_eq!(other.status(1).item.load(SeqCst), 4);
        assert_eq!(other.status(0).item.load(SeqCst), 0);
        assert_eq!(other.status(0).started.load(SeqCst), 0);
        other.status(1).reset();
        assert_eq!(words.status(1).started.load(SeqCst), 0);
        assert_eq!(words.status(1).item_cpu.load(SeqCst), 0);
    }

    #[test]
    fn running_means_started_and_not_finished() {
        let words = SharedWords::new(STATUS_WORDS).unwrap();
        let s = words.status(0);
        assert!(!s.running(1));
        s.started.store(1, SeqCst);
        assert!(s.running(1));
        assert!(!s.running(2));
        s.finished.store(1, SeqCst);
        assert!(!s.running(1));
    }

    #[test]
    fn paged_slots_are_a_page_apart() {
        let words = SharedWords::paged(2).unwrap();
        assert!(words.is_paged());
        assert_eq!(sys::file_len(words.fd()).unwrap(), 2 * PAGE_WORDS * 8);
        words.status(1).skip.store(3, SeqCst);
        let flat = SharedWords::from_fd(words.fd().try_clone().unwrap(), PAGE_WORDS).unwrap();
        assert_eq!(flat.status(1).skip.load(SeqCst), 3);
        assert_eq!(flat.status(0).skip.load(SeqCst), 0);
        assert!(!SharedWords::new(STATUS_WORDS).unwrap().is_paged());
    }
}
