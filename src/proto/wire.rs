//! Framing of the messages between the parent and a worker on their stream
//! socket: the header's layout, the frame kinds and flags, how frames are
//! written ([`Header::open`], [`Open::close`]) and read ([`Reader`],
//! [`Frame`]), and where a frame's fds ride ([`fd_offset`]). Every frame is
//! a fixed header and a body:
//!
//! ```text
//! | len: u64 | kind: u8 | status: u8 | seq: u64 | a: u64 | b: u64 | body: len bytes |
//! ```
//!
//! All integers are little-endian. `seq` numbers the tasks sent to one
//! worker (1, 2, ...). What `a` and `b` carry depends on the frame's kind
//! (for a task, the trampoline and function offsets: see `task.rs`): each
//! kind has its constructor and its accessors here ([`Header::task`],
//! [`Header::tramp`], [`Header::run_time_ns`], ...), and no code outside
//! this file reads or writes them raw.

use std::ops::Range;

/// Size of a frame header.
pub(crate) const HDR: usize = 34;

// Where each field of the header lies.
const LEN_AT: usize = 0;
const KIND_AT: usize = 8;
const STATUS_AT: usize = 9;
const SEQ_AT: usize = 10;
const A_AT: usize = 18;
const B_AT: usize = 26;

/// Size of the count of `SharedBuf` fds that leads a [`SHARED_FDS`] body.
const SHARED_COUNT: usize = 4;

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
/// An MPI rank to its worker, with one fd: from now on the worker reads
/// its tasks from that fd, a TCP stream from the engine on another host.
/// Its results still go to the rank, which relays them (in batches, and
/// after the worker's death too) on that stream. (Kind 9 is retired: it
/// must not be given to a new frame.)
pub(crate) const ADOPT: u8 = 10;
/// Worker to parent: a log record of task `seq` (`a`: its level; the body:
/// `proto::logs`).
pub(crate) const LOG: u8 = 11;

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
/// `SharedBuf` fds and the rest; a frame without the flag has none. `None`:
/// the flag is set but the body is too short for the count.
pub(crate) fn shared_prefix(status: u8, body: &[u8]) -> Option<(usize, &[u8])> {
    if status & SHARED_FDS == 0 {
        return Some((0, body));
    }
    let n = u32::from_le_bytes(body.get(..SHARED_COUNT)?.try_into().ok()?) as usize;
    Some((n, &body[SHARED_COUNT..]))
}

/// DONE (in `a`): the body is the 8-byte length of the output, which is in
/// the task's input block.
const OUT_SAME_BLOCK: u64 = 1;
/// DONE (in `a`): the body is the 8-byte length of the output, which is in
/// the block whose fd came with the frame.
const OUT_NEW_BLOCK: u64 = 2;

/// Where a DONE frame's output lies (its header's `a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResultAt {
    /// In the frame's body (`a` 0).
    Inline,
    /// In the task's input block; the body is its 8-byte length.
    InputBlock,
    /// In the block whose fd came with the frame; the body is its 8-byte
    /// length.
    NewBlock,
    /// Anything else: no worker of this crate sends it.
    Unknown(u64),
}

/// A frame header. `a` and `b` mean something different for each kind of
/// frame: they are written by the kind's constructor (or setter) and read
/// by its accessors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) len: u64,
    pub(crate) kind: u8,
    pub(crate) status: u8,
    pub(crate) seq: u64,
    a: u64,
    b: u64,
}

impl Header {
    /// A header whose length is filled in by [`Open::close`].
    fn with(kind: u8, seq: u64, a: u64, b: u64) -> Self {
        Header {
            len: 0,
            kind,
            status: 0,
            seq,
            a,
            b,
        }
    }

    /// A header with any `a` and `b`, for tests that feed the parser
    /// anything.
    #[cfg(test)]
    pub(crate) fn with_fields(kind: u8, seq: u64, a: u64, b: u64) -> Self {
        Header::with(kind, seq, a, b)
    }

    /// A header of `kind` for task `seq` whose `a` and `b` carry nothing.
    pub(crate) fn new(kind: u8, seq: u64) -> Self {
        Header::with(kind, seq, 0, 0)
    }

    /// READY: the worker `pid` serves tasks.
    pub(crate) fn ready(pid: u32) -> Self {
        Header::with(READY, 0, pid as u64, 0)
    }

    /// READY: the pid of the worker that sent it (the parent knows it
    /// already; tests read it).
    #[cfg(test)]
    pub(crate) fn ready_pid(&self) -> u32 {
        debug_assert_eq!(self.kind, READY);
        self.a as u32
    }

    /// TASK `seq`: run the task at these trampoline and function offsets.
    pub(crate) fn task(seq: u64, tramp: u64, func: u64) -> Self {
        Header::with(TASK, seq, tramp, func)
    }

    /// TASK: the task's trampoline offset.
    pub(crate) fn tramp(&self) -> u64 {
        debug_assert_eq!(self.kind, TASK);
        self.a
    }

    /// TASK: the task's function offset.
    pub(crate) fn func(&self) -> u64 {
        debug_assert_eq!(self.kind, TASK);
        self.b
    }

    /// CONFIG: settings `flags` (see [`CONFIG_BACKTRACES`]) and the limit
    /// in bytes on the growth of the worker's private memory (0: none).
    pub(crate) fn config(flags: u64, memory: u64) -> Self {
        Header::with(CONFIG, 0, flags, memory)
    }

    /// CONFIG: its flags.
    pub(crate) fn config_flags(&self) -> u64 {
        debug_assert_eq!(self.kind, CONFIG);
        self.a
    }

    /// CONFIG: the limit on the growth of the worker's memory (0: none).
    pub(crate) fn memory_limit(&self) -> u64 {
        debug_assert_eq!(self.kind, CONFIG);
        self.b
    }

    /// SOFT_LIMIT: task `seq` has a soft time limit of `ns` from its start.
    pub(crate) fn soft_limit(seq: u64, ns: u64) -> Self {
        Header::with(SOFT_LIMIT, seq, ns, 0)
    }

    /// SOFT_LIMIT: the limit, in ns from the task's start.
    pub(crate) fn soft_limit_ns(&self) -> u64 {
        debug_assert_eq!(self.kind, SOFT_LIMIT);
        self.a
    }

    /// DONE `seq`: the output inline, its run time 0 until set.
    pub(crate) fn done(seq: u64) -> Self {
        Header::new(DONE, seq)
    }

    /// DONE: where its output lies.
    pub(crate) fn result_at(&self) -> ResultAt {
        debug_assert_eq!(self.kind, DONE);
        match self.a {
            0 => ResultAt::Inline,
            OUT_SAME_BLOCK => ResultAt::InputBlock,
            OUT_NEW_BLOCK => ResultAt::NewBlock,
            a => ResultAt::Unknown(a),
        }
    }

    /// DONE: says where its output lies.
    pub(crate) fn set_result_at(&mut self, at: ResultAt) {
        self.a = match at {
            ResultAt::Inline => 0,
            ResultAt::InputBlock => OUT_SAME_BLOCK,
            ResultAt::NewBlock => OUT_NEW_BLOCK,
            ResultAt::Unknown(a) => a,
        };
    }

    /// DONE: the task's run time in the worker, in ns.
    pub(crate) fn run_time_ns(&self) -> u64 {
        debug_assert_eq!(self.kind, DONE);
        self.b
    }

    /// DONE: sets the task's run time.
    pub(crate) fn set_run_time_ns(&mut self, ns: u64) {
        self.b = ns;
    }

    /// RETIRING, after task `seq`: the worker's memory grew by `grown`
    /// bytes, past its limit.
    pub(crate) fn retiring(seq: u64, grown: u64) -> Self {
        Header::with(RETIRING, seq, grown, 0)
    }

    /// RETIRING: how much the worker's memory grew, in bytes.
    pub(crate) fn growth(&self) -> u64 {
        debug_assert_eq!(self.kind, RETIRING);
        self.a
    }

    /// LOG: a record of task `seq`, at `level` (`proto::logs`).
    pub(crate) fn log(seq: u64, level: u64) -> Self {
        Header::with(LOG, seq, level, 0)
    }

    /// LOG: the record's level, as the worker sent it.
    pub(crate) fn log_level(&self) -> u64 {
        debug_assert_eq!(self.kind, LOG);
        self.a
    }

    /// The header as it goes on the wire.
    fn to_bytes(self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[LEN_AT..KIND_AT].copy_from_slice(&self.len.to_le_bytes());
        b[KIND_AT] = self.kind;
        b[STATUS_AT] = self.status;
        b[SEQ_AT..A_AT].copy_from_slice(&self.seq.to_le_bytes());
        b[A_AT..B_AT].copy_from_slice(&self.a.to_le_bytes());
        b[B_AT..HDR].copy_from_slice(&self.b.to_le_bytes());
        b
    }

    /// Appends this header to `out` as the start of a frame whose body the
    /// caller appends next; [`Open::close`] then writes its final header.
    pub(crate) fn open(self, out: &mut Vec<u8>) -> Open {
        let at = out.len();
        out.extend_from_slice(&self.to_bytes());
        Open { header: self, at }
    }

    /// Appends a whole frame with no body (its `len` is 0).
    pub(crate) fn push(self, out: &mut Vec<u8>) {
        self.open(out).close(out, 0);
    }

    /// Appends a whole frame with `status` whose body is `msg`, encoded (the
    /// text of an error, read back with `task::take_message`).
    pub(crate) fn push_message(self, out: &mut Vec<u8>, status: u8, msg: &str) {
        let frame = self.open(out);
        // Encoding a str into a Vec cannot fail.
        let _ = crate::proto::codec::encode_into(msg, out);
        frame.close(out, status);
    }

    /// Parses a header from the first `HDR` bytes of `buf`, if there are that many.
    pub(crate) fn parse(buf: &[u8]) -> Option<Header> {
        let buf: &[u8; HDR] = buf.get(..HDR)?.try_into().ok()?;
        let u = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
        Some(Header {
            len: u(LEN_AT),
            kind: buf[KIND_AT],
            status: buf[STATUS_AT],
            seq: u(SEQ_AT),
            a: u(A_AT),
            b: u(B_AT),
        })
    }
}

/// A frame being written at the end of a buffer: [`Header::open`] appended
/// its header, the caller appends its body, and [`Open::close`] writes the
/// header again with the body's length. Fields of the header may change in
/// between (a DONE's [`Header::set_result_at`], say); the bytes are written
/// once, at close.
#[derive(Debug)]
pub(crate) struct Open {
    /// The header that [`Open::close`] writes (its `len` is set there).
    pub(crate) header: Header,
    at: usize,
}

impl Open {
    /// Where the frame starts in its buffer.
    pub(crate) fn at(&self) -> usize {
        self.at
    }

    /// The body written so far.
    pub(crate) fn body<'a>(&self, out: &'a [u8]) -> &'a [u8] {
        &out[self.at + HDR..]
    }

    /// Drops the body written so far (to write another in its place).
    pub(crate) fn clear_body(&self, out: &mut Vec<u8>) {
        out.truncate(self.at + HDR);
    }

    /// Puts the count `n` of the `SharedBuf` fds that go with the frame
    /// before its body, and flags it [`SHARED_FDS`]; nothing if `n` is 0.
    /// (The body moves by 4 bytes: the count is known only once the body is
    /// written.)
    pub(crate) fn prefix_shared(&mut self, out: &mut Vec<u8>, n: usize) {
        if n == 0 {
            return;
        }
        let body = self.at + HDR;
        out.splice(body..body, (n as u32).to_le_bytes());
        self.header.status |= SHARED_FDS;
    }

    /// Ends the frame where `out` ends: writes its header, with the length
    /// of everything after it and `status` added to the flags already set.
    pub(crate) fn close(mut self, out: &mut [u8], status: u8) {
        self.header.len = (out.len() - self.at - HDR) as u64;
        self.header.status |= status;
        out[self.at..self.at + HDR].copy_from_slice(&self.header.to_bytes());
    }
}

/// A whole frame in a buffer: its header, and where it lies. The buffer is
/// the one it was read from ([`Reader::next`]); its accessors take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) header: Header,
    /// Where the frame starts.
    pub(crate) at: usize,
    /// Where it ends (one past its last byte).
    pub(crate) end: usize,
}

impl Frame {
    /// The frame that starts at `at` in `buf`, if all of it is there.
    pub(crate) fn parse(buf: &[u8], at: usize) -> Option<Frame> {
        let header = Header::parse(buf.get(at..)?)?;
        let len = (HDR as u64).checked_add(header.len)?;
        let left = (buf.len() - at) as u64;
        (left >= len).then(|| Frame {
            header,
            at,
            end: at + len as usize,
        })
    }

    /// Its body, with the count of `SharedBuf` fds if one leads it.
    pub(crate) fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.at + HDR..self.end]
    }

    /// The count of the `SharedBuf` fds that came with it (0 without
    /// [`SHARED_FDS`]); `None` if the flag is set and the count is missing.
    pub(crate) fn shared_count(&self, buf: &[u8]) -> Option<usize> {
        shared_prefix(self.header.status, self.body(buf)).map(|(n, _)| n)
    }

    /// Where its body proper lies in the buffer: after the count of
    /// `SharedBuf` fds, if one leads it.
    pub(crate) fn payload_range(&self) -> Range<usize> {
        let mut start = self.at + HDR;
        if self.header.status & SHARED_FDS != 0 {
            start = (start + SHARED_COUNT).min(self.end);
        }
        start..self.end
    }

    /// Its body proper (see [`Frame::payload_range`]).
    pub(crate) fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.payload_range()]
    }
}

/// Reads the frames of a buffer that bytes are appended to: each call to
/// [`Reader::next`] yields the next whole frame, and the reader remembers
/// how far it has read. It holds no borrow of the buffer, so that the
/// caller may take fds or write answers while it reads.
#[derive(Debug, Default)]
pub(crate) struct Reader {
    pos: usize,
}

impl Reader {
    /// The next whole frame of `buf`, if it has come in full.
    pub(crate) fn next(&mut self, buf: &[u8]) -> Option<Frame> {
        let f = Frame::parse(buf, self.pos)?;
        self.pos = f.end;
        Some(f)
    }

    /// How many more bytes the frame after those read needs (0 if it is
    /// whole, or if not even its header has arrived).
    pub(crate) fn missing(&self, buf: &[u8]) -> u64 {
        missing(buf.get(self.pos..).unwrap_or_default())
    }

    /// Removes the frames read so far from the front of `buf`, keeping a
    /// partial frame, and reads on from its new start.
    pub(crate) fn compact(&mut self, buf: &mut Vec<u8>) {
        buf.drain(..self.pos);
        self.pos = 0;
    }
}

/// How many bytes to ask the socket for next: what the partial frame at the
/// end of the buffer still misses (`missing`, from [`Reader::missing`]),
/// else `chunk`.
pub(crate) fn read_size(missing: u64, chunk: usize) -> usize {
    if missing > 0 {
        usize::try_from(missing).unwrap_or(usize::MAX)
    } else {
        chunk
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
        let frame = Header::task(7, 11, 13).open(&mut out);
        out.extend_from_slice(b"body");
        frame.close(&mut out, 2);
        let f = Frame::parse(&out, 1).unwrap();
        let h = f.header;
        assert_eq!(h.kind, TASK);
        assert_eq!((h.seq, h.a, h.b, h.status, h.len), (7, 11, 13, 2, 4));
        assert_eq!(f.end - f.at, HDR + 4);
        assert!(Frame::parse(&out[..out.len() - 1], 1).is_none());
        assert_eq!(missing(&out[1..out.len() - 1]), 1);
    }

    /// A whole frame of `kind` for task `seq` with `body`.
    fn frame(out: &mut Vec<u8>, kind: u8, seq: u64, body: &[u8]) {
        let f = Header::new(kind, seq).open(out);
        out.extend_from_slice(body);
        f.close(out, 0);
    }

    #[test]
    fn several_frames_in_one_buffer_come_out_in_order() {
        let mut buf = Vec::new();
        frame(&mut buf, TASK, 1, b"one");
        frame(&mut buf, SOFT_LIMIT, 2, b"");
        frame(&mut buf, TASK, 2, b"second");
        let mut r = Reader::default();
        let a = r.next(&buf).unwrap();
        let b = r.next(&buf).unwrap();
        let c = r.next(&buf).unwrap();
        assert!(r.next(&buf).is_none());
        assert_eq!(
            (a.header.kind, a.header.seq, a.body(&buf)),
            (TASK, 1, &b"one"[..])
        );
        assert_eq!(
            (b.at, b.end - b.at, b.header.kind),
            (HDR + 3, HDR, SOFT_LIMIT)
        );
        assert_eq!((c.header.seq, c.body(&buf)), (2, &b"second"[..]));
        assert_eq!(c.end, buf.len());
        assert_eq!(r.missing(&buf), 0);
        r.compact(&mut buf);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_header_waits_for_more() {
        let mut buf = Vec::new();
        frame(&mut buf, TASK, 1, b"whole");
        let first = buf.len();
        frame(&mut buf, TASK, 2, b"next");
        buf.truncate(first + 10);
        let mut r = Reader::default();
        assert_eq!(r.next(&buf).unwrap().header.seq, 1);
        assert!(r.next(&buf).is_none());
        // Not even its header is here: how long it is is not known yet.
        assert_eq!(r.missing(&buf), 0);
        assert_eq!(read_size(r.missing(&buf), 4096), 4096);
        r.compact(&mut buf);
        assert_eq!(buf.len(), 10);
        assert!(r.next(&buf).is_none());
        // The rest of it comes: it is read from the front.
        let mut rest = Vec::new();
        frame(&mut rest, TASK, 2, b"next");
        buf.extend_from_slice(&rest[10..]);
        assert_eq!(r.next(&buf).unwrap().body(&buf), b"next");
    }

    #[test]
    fn a_partial_body_says_what_it_misses() {
        let mut buf = Vec::new();
        frame(&mut buf, DONE, 3, &[7; 100]);
        buf.truncate(HDR + 40);
        let mut r = Reader::default();
        assert!(r.next(&buf).is_none());
        assert_eq!(r.missing(&buf), 60);
        assert_eq!(read_size(r.missing(&buf), 4096), 60);
        buf.extend_from_slice(&[7; 60]);
        let f = r.next(&buf).unwrap();
        assert_eq!(f.body(&buf), &[7; 100][..]);
        assert_eq!(r.missing(&buf), 0);
    }

    #[test]
    fn an_oversized_length_is_never_whole() {
        for len in [u64::MAX, u64::MAX - 10, 1 << 62] {
            let mut h = Header::new(TASK, 1);
            h.len = len;
            let mut buf = Vec::new();
            buf.extend_from_slice(&h.to_bytes());
            buf.extend_from_slice(&[0; 64]);
            assert!(Frame::parse(&buf, 0).is_none());
            assert!(Reader::default().next(&buf).is_none());
            let need = missing(&buf);
            assert_eq!(need, (HDR as u64).saturating_add(len) - buf.len() as u64);
            assert!(read_size(need, 4096) > 4096);
        }
    }

    #[test]
    fn a_fresh_reader_reads_a_buffer_from_its_start() {
        let mut buf = Vec::new();
        frame(&mut buf, TASK, 1, b"a");
        frame(&mut buf, TASK, 2, b"b");
        let mut r = Reader::default();
        let first = r.next(&buf).unwrap();
        // The caller hands the first frame's bytes on itself, as the
        // supervisor does with a large result.
        buf.drain(..first.end);
        let mut r = Reader::default();
        assert_eq!(r.next(&buf).unwrap().header.seq, 2);
    }

    /// A DONE frame with body "abc" and `n` SharedBufs' fds, closed with
    /// `status`.
    fn with_shared(n: usize, status: u8) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut f = Header::new(DONE, 4).open(&mut buf);
        buf.extend_from_slice(b"abc");
        f.prefix_shared(&mut buf, n);
        f.close(&mut buf, status);
        buf
    }

    #[test]
    fn the_shared_fds_count_leads_the_body() {
        let buf = with_shared(3, 1);
        let f = Reader::default().next(&buf).unwrap();
        assert_eq!(f.header.status, 1 | SHARED_FDS);
        assert_eq!(f.header.len, 7);
        assert_eq!(f.shared_count(&buf), Some(3));
        assert_eq!(f.payload(&buf), b"abc");
        assert_eq!(f.payload_range(), HDR + 4..HDR + 7);
        assert_eq!(
            shared_prefix(f.header.status, f.body(&buf)),
            Some((3, &b"abc"[..]))
        );
    }

    #[test]
    fn without_shared_fds_the_body_is_all_payload() {
        let buf = with_shared(0, 0);
        let f = Frame::parse(&buf, 0).unwrap();
        assert_eq!(f.header.status & SHARED_FDS, 0);
        assert_eq!(
            (f.shared_count(&buf), f.payload(&buf)),
            (Some(0), &b"abc"[..])
        );
    }

    #[test]
    fn a_shared_fds_flag_without_its_count_is_malformed() {
        let mut buf = Vec::new();
        let mut h = Header::new(DONE, 4);
        h.status = SHARED_FDS;
        let f = h.open(&mut buf);
        buf.extend_from_slice(&[1, 0]);
        f.close(&mut buf, 0);
        let f = Frame::parse(&buf, 0).unwrap();
        assert_eq!(f.shared_count(&buf), None);
        assert!(f.payload(&buf).is_empty());
    }

    #[test]
    fn fds_ride_one_group_per_byte() {
        let max = crate::sys::MAX_FDS_PER_MSG;
        assert_eq!(fd_offset(10, 0), 10);
        assert_eq!(fd_offset(10, max - 1), 10);
        assert_eq!(fd_offset(10, max), 11);
        assert_eq!(fd_offset(0, 2 * max + 1), 2);
        // The most fds one frame may carry still ride on its header.
        assert!(fd_offset(0, HDR * max - 1) < HDR);
    }

    #[test]
    fn close_writes_the_fields_set_after_open() {
        let mut buf = vec![0xee; 5];
        let mut f = Header::new(DONE, 9).open(&mut buf);
        assert_eq!(f.at(), 5);
        buf.extend_from_slice(b"scratch");
        assert_eq!(f.body(&buf), b"scratch");
        f.clear_body(&mut buf);
        buf.extend_from_slice(&42u64.to_le_bytes());
        f.header.a = OUT_NEW_BLOCK;
        f.header.b = 1234;
        f.close(&mut buf, 3);
        let f = Frame::parse(&buf, 5).unwrap();
        let h = f.header;
        assert_eq!(
            (h.kind, h.seq, h.a, h.b, h.status, h.len),
            (DONE, 9, OUT_NEW_BLOCK, 1234, 3, 8)
        );
        assert_eq!(f.end, buf.len());
    }

    #[test]
    fn empty_and_message_frames_are_whole() {
        let mut buf = Vec::new();
        Header::ready(77).push(&mut buf);
        Header::new(DONE, 5).push_message(&mut buf, 3, "too large");
        let mut r = Reader::default();
        let ready = r.next(&buf).unwrap();
        assert_eq!(
            (ready.header.kind, ready.header.a, ready.end - ready.at),
            (READY, 77, HDR)
        );
        let done = r.next(&buf).unwrap();
        assert_eq!((done.header.seq, done.header.status), (5, 3));
        assert_eq!(
            crate::proto::task::take_message(done.body(&buf)),
            "too large"
        );
        assert_eq!(done.end, buf.len());
    }
}
