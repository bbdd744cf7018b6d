//! The worker loop: read task frames, run each, write result frames.
//!
//! A worker runs every task under `catch_unwind`, so a panic becomes a
//! `TaskPanicked` result and the worker goes on. Before each task it stores
//! the task's sequence number in a word of memory shared with the parent, so
//! that if the worker dies the parent knows which task was running (it gets
//! `WorkerLost`) and which were still waiting in the socket (they are
//! queued again).
//!
//! Each result is written before the next task starts, so a worker that
//! dies loses no finished task's result: everything it finished is in the
//! socket, and the parent reads it before it decides what was lost.
//! (Holding results back to write several at once was tried; a crash then
//! failed tasks that had finished. Tasks still arrive in batches, one read
//! for many.) Large inputs and outputs travel in shared-memory blocks (see
//! `shm.rs`).

use crate::proto::codec;
use crate::proto::shared_buf::{self, Mode, Region, Supply};
use crate::proto::shm::Block;
use crate::proto::task::{self, Init, Io, SharedIo, TaskFn, status};
use crate::proto::wire::{self, Frame, Header};
use crate::sandbox::{Active, Prepared};
use crate::sys;
use crate::sys::Status;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// How much the worker asks its socket for when no frame is partial.
const READ_CHUNK: usize = 256 << 10;
/// A buffer that grew past this (for one large frame) is given back once
/// it is empty.
const KEEP_CAPACITY: usize = 4 << 20;
/// The capacity of a fresh buffer for the frames to the parent.
const OUT_CAPACITY: usize = 64 << 10;

/// Set in the fork server, and so in every worker it forks.
static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this process as the fork server (and its future workers).
pub(crate) fn mark_worker_process() {
    IN_WORKER.store(true, Ordering::SeqCst);
}

/// Whether this process is a worker (or the fork server), or this thread
/// serves a worker's tasks (an MPI rank's worker thread).
pub(crate) fn in_worker() -> bool {
    IN_WORKER.load(Ordering::Relaxed) || crate::capture::serving()
}

/// Installs, once per process, a panic hook that is silent in workers and
/// calls the hook it replaced everywhere else.
///
/// In a worker a task's panic goes back to the caller as `TaskPanicked`,
/// so there is nothing to print; and printing would be dangerous: std's
/// default hook takes a lock (the backtrace lock) that another thread of
/// the parent may have held when the fork server was forked, and a lock
/// copied while held is never released in the child, so the panicking
/// task would hang forever. The hook is installed in the parent before it
/// forks the fork server, so every worker has it.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::thread::panicking() {
        return;
    }
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Where a task panicked, for its TaskPanicked (traceback.rs);
            // takes no lock.
            if crate::capture::serving() {
                crate::capture::record(info);
            }
            if !IN_WORKER.load(Ordering::Relaxed) {
                previous(info);
            }
        }));
    });
}

/// Runs the worker in this (forked) process; never returns. A sandbox,
/// if any, applies after the initializer.
pub(crate) fn run(
    sock: OwnedFd,
    status: Status<'static>,
    init: Option<&Init>,
    sandbox: Option<&Prepared>,
) -> ! {
    let apply = sandbox.map(|p| move || p.apply(status));
    let apply = apply
        .as_ref()
        .map(|f| f as &dyn Fn() -> Result<Active, String>);
    let code = exit_code(serve(sock, status, init, apply));
    flush_stdio();
    sys::exit_now(code)
}

/// A worker process's exit status once [`serve`] returned `served`.
fn exit_code(served: Result<(), Stop>) -> i32 {
    match served {
        Ok(()) => 0,
        Err(Stop::InitFailed) => 1,
        Err(Stop::Gone) => 0,
        Err(Stop::Limit) => 3,
    }
}

/// Writes out what a task or the initializer printed and left in the
/// standard library's buffer (stdout is line-buffered in this process's
/// memory: `print!` without a newline stays there, and a worker ends with
/// `_exit`, which would lose it). Called after each task, before its result
/// is sent, so that a task's output is written before its caller sees the
/// result; and before the worker exits.
fn flush_stdio() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

/// Why [`serve`] stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The initializer failed (and said so to the parent).
    InitFailed,
    /// The parent is gone, or the socket failed.
    Gone,
    /// A task went past a limit of the sandbox (its `died_of` word says
    /// which); the worker ends without its result.
    Limit,
}

/// Serves tasks from `sock` until the parent closes it (`Ok`). A worker
/// process exits when this returns; another transport (an MPI rank) may
/// clean up first.
/// `sandbox` applies the pool's sandbox, if it has one, once the
/// initializer has run.
pub(crate) fn serve(
    sock: OwnedFd,
    status: Status<'_>,
    init: Option<&Init>,
    sandbox: Option<&dyn Fn() -> Result<Active, String>>,
) -> Result<(), Stop> {
    crate::capture::serve_on_this_thread();
    let mut w = Worker {
        fd: sock.as_raw_fd(),
        status,
        active: None,
        out: Vec::with_capacity(OUT_CAPACITY),
        soft: None,
        memory: None,
    };
    if let Some(init) = init {
        w.run_init(init)?;
    }
    if let Some(apply) = sandbox {
        w.active = Some(w.apply_sandbox(apply)?);
    }
    w.say_ready()?;
    let mut inbox = Inbox {
        buf: Vec::with_capacity(READ_CHUNK),
        fds: VecDeque::new(),
        reader: wire::Reader::default(),
    };
    loop {
        while let Some(frame) = inbox.reader.next(&inbox.buf) {
            if w.handle(&frame, &inbox.buf, &mut inbox.fds)? == Next::Retire {
                return Ok(());
            }
        }
        if !w.receive(&mut inbox)? {
            return Ok(());
        }
    }
}

/// The worker loop's state between frames.
struct Worker<'s> {
    /// The socket to the parent (blocking).
    fd: RawFd,
    /// The words this worker shares with the parent.
    status: Status<'s>,
    /// The sandbox, once applied.
    active: Option<Active>,
    /// Frames to the parent not written yet.
    out: Vec<u8>,
    /// The soft time limit of the next task, from a SOFT_LIMIT frame: the
    /// task's sequence number and the limit in ns.
    soft: Option<(u64, u64)>,
    /// The limit on this worker's memory growth, from the CONFIG frame.
    memory: Option<MemoryLimit>,
}

/// What came from the parent and is not handled yet: the bytes, the fds
/// that came with them (in order: each frame takes its own from the
/// front), and how far the frames have been read.
struct Inbox {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    reader: wire::Reader,
}

impl Inbox {
    /// Drops the frames handled, keeping the partial one, if any, at the
    /// front of the buffer; gives back a large buffer once it is empty.
    fn compact(&mut self) {
        self.reader.compact(&mut self.buf);
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::with_capacity(READ_CHUNK);
        }
    }
}

/// What the worker does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Goes on to the next frame.
    Serve,
    /// Exits (its memory grew past its limit).
    Retire,
}

/// A TASK frame's input: its body, and the fds that came for it.
struct Input<'b> {
    /// The body, after the count of `SharedBuf` fds if one leads it.
    body: &'b [u8],
    /// The input block's fd, if the input is in a block (`Some(None)`: the
    /// fd did not arrive).
    block_fd: Option<Option<OwnedFd>>,
    /// The fds of the task's `SharedBuf`s.
    shared: Vec<OwnedFd>,
    /// Fewer `SharedBuf` fds came than the frame counts.
    shared_missing: bool,
}

impl<'b> Input<'b> {
    /// Takes the body of task `frame` from `buf`, and its fds from the
    /// front of `fds`. The fds of an input block and of SharedBufs are
    /// taken whatever happens next, so that the next frame's fds stay
    /// paired with their frame.
    fn take(frame: &Frame, buf: &'b [u8], fds: &mut VecDeque<OwnedFd>) -> Input<'b> {
        // A count of SharedBuf fds may lead the body (see wire.rs); a body
        // too short for it is empty.
        let (nshared, body) = match frame.shared_count(buf) {
            Some(n) => (n, frame.payload(buf)),
            None => (0, &[][..]),
        };
        let block_fd = (frame.header.status & wire::IN_BLOCK != 0).then(|| fds.pop_front());
        let shared: Vec<OwnedFd> = fds.drain(..nshared.min(fds.len())).collect();
        let shared_missing = shared.len() < nshared;
        Input {
            body,
            block_fd,
            shared,
            shared_missing,
        }
    }
}

/// Why a task does not run: the status and the message of its result.
type Refused = (u8, Cow<'static, str>);

/// What running a task left besides the bytes of its output.
struct Ran {
    status: u8,
    /// A large output: its block and length, and whether that block is the
    /// input's.
    spilled: Option<(Block, usize, bool)>,
    /// The output's `SharedBuf`s, given up by the task's values (the
    /// encoder took them out): sent with the result, then unmapped.
    shared: Vec<Region>,
}

impl Worker<'_> {
    /// Runs the initializer; if it fails, tells the parent why.
    fn run_init(&mut self, init: &Init) -> Result<(), Stop> {
        let failed = Header::new(wire::INIT_FAILED, 0, 0, 0).open(&mut self.out);
        let mut io = Io {
            input: &init.arg,
            block: None,
            reuse: false,
            spill: false,
            out: &mut self.out,
            spilled: None,
            shared: SharedIo::default(),
        };
        // SAFETY: the initializer was made by PoolBuilder::initializer
        // (TaskFn::single) in the process this one was forked from, or in
        // this same executable on an MPI rank.
        let st = unsafe { init.f.call(&mut io) };
        flush_stdio();
        if st == status::OK {
            self.out.clear();
            return Ok(());
        }
        failed.close(&mut self.out, st);
        let _ = sys::send_all(self.fd, &self.out);
        Err(Stop::InitFailed)
    }

    /// Applies the sandbox; if it cannot be, tells the parent why.
    fn apply_sandbox(
        &mut self,
        apply: &dyn Fn() -> Result<Active, String>,
    ) -> Result<Active, Stop> {
        apply().map_err(|msg| {
            Header::new(wire::SANDBOX_FAILED, 0, 0, 0).push_message(&mut self.out, 0, &msg);
            let _ = sys::send_all(self.fd, &self.out);
            Stop::InitFailed
        })
    }

    /// Tells the parent that this worker serves tasks (`a`: its pid).
    fn say_ready(&mut self) -> Result<(), Stop> {
        Header::new(wire::READY, 0, std::process::id() as u64, 0).push(&mut self.out);
        self.flush()
    }

    /// Handles one frame from the parent, whose bytes are in `buf`.
    fn handle(
        &mut self,
        frame: &Frame,
        buf: &[u8],
        fds: &mut VecDeque<OwnedFd>,
    ) -> Result<Next, Stop> {
        let h = &frame.header;
        match h.kind {
            wire::CONFIG => self.memory = configure(h),
            wire::SOFT_LIMIT => self.soft = Some((h.seq, h.a)),
            wire::TASK => return self.run_task(h, Input::take(frame, buf, fds)),
            _ => {}
        }
        Ok(Next::Serve)
    }

    /// Runs the task of header `h` and writes its result.
    fn run_task(&mut self, h: &Header, input: Input<'_>) -> Result<Next, Stop> {
        self.start(h.seq);
        let t0 = Instant::now();
        let mut done = Header::new(wire::DONE, h.seq, 0, 0).open(&mut self.out);
        let ran = self.execute(h, input, &done);
        if self.over_open_files(&done, ran.status) {
            self.status
                .died_of
                .store(crate::sandbox::cause::OPEN_FILES, Ordering::SeqCst);
            return Err(Stop::Limit);
        }
        // The run time, for the parent's dispatch (header field `b`).
        done.header.b = (Instant::now() - t0).as_nanos().min(u64::MAX as u128) as u64;
        self.send_result(done, ran)?;
        self.status.finished.store(h.seq, Ordering::SeqCst);
        self.retire_if_grown(h.seq)
    }

    /// Marks task `seq` as started: its soft deadline, and the words from
    /// which the parent learns which task a dead worker was running.
    fn start(&mut self, seq: u64) {
        let start_ns = sys::monotonic_ns();
        crate::deadline::begin_task(start_ns, soft_limit_for(self.soft.take(), seq));
        self.status.start_ns.store(start_ns, Ordering::SeqCst);
        self.status.started.store(seq, Ordering::SeqCst);
    }

    /// Runs the task of header `h` on `input`; its output (or why it
    /// failed) goes in the body of `done`, at the end of `self.out`.
    fn execute(&mut self, h: &Header, mut input: Input<'_>, done: &wire::Open) -> Ran {
        let checked = self.check_input(h.seq, &mut input);
        let mode = if h.status & wire::INLINE_SHARED != 0 {
            Mode::Inline
        } else {
            Mode::Fds
        };
        let mut io = Io {
            input: input.body,
            block: None,
            // A sandboxed worker never writes into the parent's block
            // (which it gets sealed, read-only).
            reuse: h.status & wire::KEEP_INPUT == 0 && self.active.is_none(),
            spill: true,
            out: &mut self.out,
            spilled: None,
            shared: SharedIo {
                mode,
                supply: Supply::from_fds(input.shared),
                out: Vec::new(),
            },
        };
        let mut st = match checked {
            Err((st, msg)) => {
                let _ = codec::encode_into(&*msg, io.out);
                st
            }
            Ok(block) => {
                if block.is_some() {
                    io.input = &[];
                    io.block = block;
                }
                let f = TaskFn {
                    tramp: h.a,
                    func: h.b,
                };
                // SAFETY: task frames come only from this worker's parent,
                // which encodes TaskFn::single/chunk values of this same
                // binary (a fork of it, or, for MPI, an exec of the same
                // executable, checked by hash at start-up).
                let st = unsafe { f.call(&mut io) };
                flush_stdio();
                st
            }
        };
        crate::deadline::end_task();
        let n = io.shared.out.len();
        if n != 0 && n > shared_buf::max_per_task() {
            // More buffers than one message may bring the parent.
            io.shared.out.clear();
            io.spilled = None;
            done.clear_body(io.out);
            let _ = codec::encode_into(&shared_buf::too_many_message(n, "result"), io.out);
            st = status::ENCODE;
        }
        Ran {
            status: st,
            spilled: io.spilled.take(),
            shared: std::mem::take(&mut io.shared.out),
        }
    }

    /// The input's block, if the input came in one; or why the task does
    /// not run: the status and message of its result.
    fn check_input(
        &self,
        seq: u64,
        input: &mut Input<'_>,
    ) -> Result<Option<(Block, usize)>, Refused> {
        // Cancelled before it started: skip it. (The parent writes `skip`
        // before it reads `started`, this process the other way round: one
        // of the two sees the other's write, so a task is either skipped
        // here or killed there once it runs.)
        if self.status.skip.load(Ordering::SeqCst) == seq {
            return Err((status::CANCELLED, "cancelled".into()));
        }
        if input.shared_missing {
            return Err((status::DECODE, "a task's SharedBufs did not arrive".into()));
        }
        match input.block_fd.take() {
            None => Ok(None),
            Some(fd) => in_block(input.body, fd)
                .map(Some)
                .map_err(|msg| (status::DECODE, msg.into())),
        }
    }

    /// Whether the task that just ran went past the sandbox's cap on open
    /// files (then the worker ends without its result).
    fn over_open_files(&self, done: &wire::Open, st: u8) -> bool {
        let Some(active) = &self.active else {
            return false;
        };
        let panicked = (st == status::PANIC).then(|| task::take_message(done.body(&self.out)));
        active.over_open_files(panicked.as_deref())
    }

    /// Writes the DONE frame `done` of a task that `ran`, with the fds that
    /// go with it: out before the next task starts (see the module
    /// comment).
    fn send_result(&mut self, mut done: wire::Open, mut ran: Ran) -> Result<(), Stop> {
        let mut fds: Vec<RawFd> = Vec::new();
        if let Some((block, len, same)) = &mut ran.spilled {
            // Only a task that succeeded leaves its output in a block.
            debug_assert_eq!(ran.status, status::OK);
            if self.active.is_some() {
                // Sealed before the parent maps it, so that no task can
                // change or truncate it under the parent.
                block.seal().map_err(|_| Stop::Gone)?;
            }
            // The body is the output's length; a new block's fd goes with
            // the frame.
            done.clear_body(&mut self.out);
            self.out.extend_from_slice(&(*len as u64).to_le_bytes());
            done.header.a = if *same {
                wire::OUT_SAME_BLOCK
            } else {
                fds.push(block.raw_fd());
                wire::OUT_NEW_BLOCK
            };
        }
        // The SharedBufs' fds come after the block's.
        fds.extend(ran.shared.iter().map(Region::raw_fd));
        done.prefix_shared(&mut self.out, ran.shared.len());
        let at = done.at();
        done.close(&mut self.out, ran.status);
        // The block and the SharedBufs are dropped (unmapped) once sent.
        self.send_out(at, &fds)
    }

    /// After task `seq`'s result is out: if this worker's memory grew past
    /// its limit, says why it exits and retires. The tasks after it were
    /// not started and run elsewhere.
    fn retire_if_grown(&mut self, seq: u64) -> Result<Next, Stop> {
        let Some(grown) = self.memory.as_ref().and_then(MemoryLimit::exceeded) else {
            return Ok(Next::Serve);
        };
        Header::new(wire::RETIRING, seq, grown, 0).push(&mut self.out);
        self.flush()?;
        Ok(Next::Retire)
    }

    /// Waits for the parent's next bytes, once the frames handled are
    /// dropped, and appends them to `inbox`. `Ok(false)`: the parent closed
    /// the socket.
    fn receive(&mut self, inbox: &mut Inbox) -> Result<bool, Stop> {
        inbox.compact();
        let need = inbox.reader.missing(&inbox.buf);
        let want = wire::read_size(need, READ_CHUNK);
        // Wait a moment for the next task without sleeping: it often comes
        // within microseconds, and waking from sleep costs more.
        let fd = self.fd;
        let _ = sys::spin_until(|| sys::readable_now(fd));
        match sys::recv_append(fd, &mut inbox.buf, want, &mut inbox.fds) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                // A frame larger than this worker can hold: answer it with an
                // error and skip its bytes.
                // The fds that came so far are this frame's (the frames
                // before it took theirs): they go with it.
                inbox.fds.clear();
                self.skip_oversized(&mut inbox.buf, need)?;
                Ok(true)
            }
            Err(_) => Err(Stop::Gone),
        }
    }

    /// Answers the frame at the start of `inbuf`, too large to hold, with
    /// an error, and skips the `need` bytes of it still in the socket.
    fn skip_oversized(&mut self, inbuf: &mut Vec<u8>, need: u64) -> Result<(), Stop> {
        let Some(h) = Header::parse(inbuf) else {
            return Err(Stop::Gone);
        };
        inbuf.clear();
        let mut left = need;
        let mut scratch = vec![0u8; READ_CHUNK];
        while left > 0 {
            let want = (left as usize).min(scratch.len());
            match sys::read(self.fd, &mut scratch[..want]) {
                Ok(0) | Err(_) => return Err(Stop::Gone),
                Ok(n) => left -= n as u64,
            }
        }
        let msg = format!(
            "a task of {} bytes is larger than the worker can hold",
            h.len
        );
        Header::new(wire::DONE, h.seq, 0, 0).push_message(&mut self.out, status::DECODE, &msg);
        self.flush()
    }

    /// Writes every frame in `self.out`.
    fn flush(&mut self) -> Result<(), Stop> {
        self.send_out(0, &[])
    }

    /// Writes every frame in `self.out`, `fds` attached to the frame that
    /// starts at `at` (none if empty). An error means the parent is gone.
    fn send_out(&mut self, at: usize, fds: &[RawFd]) -> Result<(), Stop> {
        if self.out.is_empty() {
            return Ok(());
        }
        let sent = if fds.is_empty() {
            sys::send_all(self.fd, &self.out)
        } else {
            let (before, frame) = self.out.split_at(at);
            sys::send_all(self.fd, before).and_then(|()| send_frame(self.fd, frame, fds))
        };
        sent.map_err(|_| Stop::Gone)?;
        self.out.clear();
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::with_capacity(OUT_CAPACITY);
        }
        Ok(())
    }
}

/// The soft time limit (ns) of task `seq`, from the last SOFT_LIMIT frame
/// (`soft`: its task and limit): a limit applies to its own task only.
fn soft_limit_for(soft: Option<(u64, u64)>, seq: u64) -> Option<u64> {
    soft.filter(|&(s, _)| s == seq).map(|(_, ns)| ns)
}

/// Applies the parent's CONFIG frame; returns the memory limit it sets.
fn configure(h: &Header) -> Option<MemoryLimit> {
    crate::capture::capture_frames(h.a & wire::CONFIG_BACKTRACES != 0);
    MemoryLimit::new(h.b)
}

/// `max_memory_per_child`: how much this worker's private memory may grow
/// over what it had before its first task (after the initializer: the
/// CONFIG frame is read once the worker is ready).
struct MemoryLimit {
    limit: u64,
    baseline: u64,
}

impl MemoryLimit {
    fn new(limit: u64) -> Option<MemoryLimit> {
        if limit == 0 {
            return None;
        }
        let baseline = sys::private_memory().ok()?;
        Some(MemoryLimit { limit, baseline })
    }

    /// The growth, if it is past the limit.
    fn exceeded(&self) -> Option<u64> {
        self.grown_past(sys::private_memory().ok()?)
    }

    /// The growth to `now` bytes, if it is past the limit.
    fn grown_past(&self, now: u64) -> Option<u64> {
        let grown = now.saturating_sub(self.baseline);
        (grown > self.limit).then_some(grown)
    }
}

/// Maps the block (whose fd is `fd`) that holds a task's input; `body` is
/// the frame's: the input's length.
fn in_block(body: &[u8], fd: Option<OwnedFd>) -> Result<(Block, usize), String> {
    let fd = fd.ok_or("a task's block did not arrive")?;
    let len = body
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .ok_or("a task's block length is missing")?;
    let b = Block::from_fd(fd).map_err(|e| format!("could not map a task's block: {e}"))?;
    if b.capacity() < len {
        return Err("a task's block is shorter than its input".into());
    }
    Ok((b, len))
}

/// Sends a frame with fds attached to its first bytes (the i-th on byte
/// `wire::fd_offset(0, i)`), on this blocking socket.
fn send_frame(fd: i32, frame: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let mut pos = 0;
    for (g, group) in fds.chunks(sys::MAX_FDS_PER_MSG).enumerate() {
        // Group g rides on byte g: up to there, bytes go without fds.
        if pos < g {
            sys::send_all(fd, &frame[pos..g])?;
            pos = g;
        }
        let last = (g + 1) * sys::MAX_FDS_PER_MSG >= fds.len();
        let end = if last { frame.len() } else { g + 1 };
        if end <= pos {
            return Err(std::io::Error::other("a frame too short for its fds"));
        }
        match sys::send_fds(fd, &frame[pos..end], group)? {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            n => pos += n,
        }
    }
    sys::send_all(fd, &frame[pos..])
}
