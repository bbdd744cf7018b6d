//! Framing of the messages between the parent and a worker on their stream
//! socket. Every frame is a fixed header and a body:
//!
//! ```text
//! | len: u64 | kind: u8 | status: u8 | seq: u64 | a: u64 | b: u64 | body: len bytes |
//! ```
//!
//! All integers are little-endian. `seq` numbers the tasks sent to one
//! worker (1, 2, ...); for a task, `a` and `b` are the trampoline and
//! function offsets (see `task.rs`).

/// Size of a frame header.
pub(crate) const HDR: usize = 34;

/// Worker to parent: the initializer ran; the worker serves tasks.
pub(crate) const READY: u8 = 1;
/// Worker to parent: the initializer failed; the body is the message.
pub(crate) const INIT_FAILED: u8 = 2;
/// Worker to parent: task `seq` finished with `status`; the body is its output.
pub(crate) const DONE: u8 = 3;
/// Parent to worker: run task `seq`.
pub(crate) const TASK: u8 = 4;
/// Parent to worker, before any task: settings (`a`: flags, see
/// [`CONFIG_BACKTRACES`]; `b`: the limit in bytes on the growth of its
/// private memory, 0 for none).
pub(crate) const CONFIG: u8 = 5;

/// Parent to worker, just before a TASK frame: that task's soft time limit
/// (`seq`: the task's; `a`: nanoseconds from its start).
pub(crate) const SOFT_LIMIT: u8 = 6;
/// Worker to parent, after a task's DONE: its memory grew past its limit
/// (`a`: the growth in bytes); it exits, and the tasks it had not started
/// are to run elsewhere.
pub(crate) const RETIRING: u8 = 7;

/// CONFIG flag (in `a`): record a backtrace when a task panics.
pub(crate) const CONFIG_BACKTRACES: u64 = 1;

/// Worker to parent: the sandbox could not be applied; the body is why.
pub(crate) const SANDBOX_FAILED: u8 = 8;

/// TASK flag (in `status`): the body is the 8-byte length of the input,
/// which is in the block whose fd came with the frame.
pub(crate) const IN_BLOCK: u8 = 1;
/// TASK flag: the worker must not write the result into the input's block
/// (the parent may need the input again, to retry the task).
pub(crate) const KEEP_INPUT: u8 = 2;
/// TASK flag: a result's `SharedBuf`s are copied inline, not sent by
/// reference (the worker is an MPI rank, beyond shared memory).
pub(crate) const INLINE_SHARED: u8 = 0x40;
/// TASK and DONE flag (in `status`): `SharedBuf` fds came with the frame,
/// after the block's fd if any; the body starts with their count (4 bytes),
/// and the rest of it is the usual body. The fds ride on the frame's first
/// bytes, at most `sys::MAX_FDS_PER_MSG` on each (see [`fd_offset`]).
pub(crate) const SHARED_FDS: u8 = 0x80;

/// Where the fds of a frame that starts at `at` go: the i-th on byte
/// `at + i / MAX_FDS_PER_MSG`, so that no message carries more than the
/// kernel allows. A frame has at least `HDR` bytes, room for 34 groups.
pub(crate) fn fd_offset(at: usize, i: usize) -> usize {
    at + i / crate::sys::MAX_FDS_PER_MSG
}

/// Splits the body of a frame with [`SHARED_FDS`] into the count of its
/// `SharedBuf` fds and the rest; a frame without the flag has none.
pub(crate) fn shared_prefix(status: u8, body: &[u8]) -> Option<(usize, &[u8])> {
    if status & SHARED_FDS == 0 {
        return Some((0, body));
    }
    let n = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    Some((n, &body[4..]))
}

/// DONE (in `a`): the body is the 8-byte length of the output, which is in
/// the task's input block.
pub(crate) const OUT_SAME_BLOCK: u64 = 1;
/// DONE (in `a`): the body is the 8-byte length of the output, which is in
/// the block whose fd came with the frame.
pub(crate) const OUT_NEW_BLOCK: u64 = 2;

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) len: u64,
    pub(crate) kind: u8,
    pub(crate) status: u8,
    pub(crate) seq: u64,
    pub(crate) a: u64,
    pub(crate) b: u64,
}

impl Header {
    /// A header whose length is filled in by `finish`.
    pub(crate) fn new(kind: u8, seq: u64, a: u64, b: u64) -> Self {
        Header {
            len: 0,
            kind,
            status: 0,
            seq,
            a,
            b,
        }
    }

    /// Appends this header to `out` and returns where it starts, for `finish`.
    pub(crate) fn begin(&self, out: &mut Vec<u8>) -> usize {
        let at = out.len();
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.kind);
        out.push(self.status);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.a.to_le_bytes());
        out.extend_from_slice(&self.b.to_le_bytes());
        at
    }

    /// Parses a header from the first `HDR` bytes of `buf`, if there are that many.
    pub(crate) fn parse(buf: &[u8]) -> Option<Header> {
        if buf.len() < HDR {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
        Some(Header {
            len: u(0),
            kind: buf[8],
            status: buf[9],
            seq: u(10),
            a: u(18),
            b: u(26),
        })
    }
}

/// Sets the length (everything after the header) and status of the frame
/// that `begin` started at `at`.
pub(crate) fn finish(out: &mut [u8], at: usize, status: u8) {
    let len = (out.len() - at - HDR) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
    out[at + 9] = status;
}

/// If `buf` starts with a whole frame, its header and total size.
pub(crate) fn complete(buf: &[u8]) -> Option<(Header, usize)> {
    let h = Header::parse(buf)?;
    let total = (HDR as u64).checked_add(h.len)?;
    if (buf.len() as u64) >= total {
        Some((h, total as usize))
    } else {
        None
    }
}

/// How many more bytes the frame at the start of `buf` needs (0 if whole,
/// or if not even its header has arrived).
pub(crate) fn missing(buf: &[u8]) -> u64 {
    match Header::parse(buf) {
        Some(h) => (HDR as u64)
            .saturating_add(h.len)
            .saturating_sub(buf.len() as u64),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = vec![9u8];
        let at = Header::new(TASK, 7, 11, 13).begin(&mut out);
        out.extend_from_slice(b"body");
        finish(&mut out, at, 2);
        let (h, total) = complete(&out[1..]).unwrap();
        assert_eq!(h.kind, TASK);
        assert_eq!((h.seq, h.a, h.b, h.status, h.len), (7, 11, 13, 2, 4));
        assert_eq!(total, HDR + 4);
        assert!(complete(&out[1..out.len() - 1]).is_none());
        assert_eq!(missing(&out[1..out.len() - 1]), 1);
    }
}
