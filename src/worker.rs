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
//! (Holding results back to write several at once would fail, on a crash,
//! tasks that had finished. Tasks still arrive in batches, one read for
//! many.) Large inputs and outputs travel in shared-memory blocks (see
//! `proto/shm.rs`).

use crate::proto::codec;
use crate::proto::shared_buf::{self, Mode, Region, Supply};
use crate::proto::shm::Block;
use crate::proto::task::{self, Init, Io, SharedIo, TaskFn, code};
use crate::proto::wire::{self, Frame, Header, ResultAt};
use crate::proto::words::Status;
use crate::sandbox::{Active, Prepared};
use crate::sys;
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
static POOL_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this process as the pool's child: the fork server, and so every
/// worker it will fork.
pub(crate) fn mark_pool_child() {
    POOL_CHILD.store(true, Ordering::SeqCst);
}

/// Whether this process is a worker (or the fork server), or this thread
/// serves a worker's tasks (an MPI rank's worker thread).
pub(crate) fn in_worker() -> bool {
    POOL_CHILD.load(Ordering::Relaxed) || crate::capture::serving()
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
            if !POOL_CHILD.load(Ordering::Relaxed) {
                previous(info);
            }
        }));
    });
}

/// Runs the worker in this (forked) process; never returns. A sandbox,
/// if any, applies after the initializer.
pub(crate) fn run(
    sock: OwnedFd,
    words: Status<'static>,
    init: Option<&Init>,
    sandbox: Option<&Prepared>,
) -> ! {
    let apply = sandbox.map(|p| move || p.apply(words));
    let apply = apply
        .as_ref()
        .map(|f| f as &dyn Fn() -> Result<Active, String>);
    let code = exit_code(serve(sock, words, init, apply));
    flush_all_stdio();
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
/// result; and before the worker exits, when C's stdio buffers
/// (`printf` in C code a task called) are written out too.
fn flush_stdio() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

/// Whether this worker flushes C's stdio buffers after each task, not only
/// before it exits ([`flush_c_stdio_after_each_task`]).
static FLUSH_C_STDIO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this worker flush C's stdio buffers after each task: its stdout
/// is a pipe of the pool's, which C buffers whole (not by line, as it does
/// a terminal), so a task's `printf` would otherwise wait for the worker's
/// exit. Called in the new worker, before [`run`].
pub(crate) fn flush_c_stdio_after_each_task() {
    FLUSH_C_STDIO.store(true, Ordering::Relaxed);
}

/// [`flush_stdio`], and C's stdio buffers too: just before the worker
/// `_exit`s, which would lose them.
fn flush_all_stdio() {
    flush_stdio();
    sys::flush_c_stdio();
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
    words: Status<'_>,
    init: Option<&Init>,
    sandbox: Option<&dyn Fn() -> Result<Active, String>>,
) -> Result<(), Stop> {
    crate::capture::serve_on_this_thread();
    let mut w = Loop {
        fd: sock.as_raw_fd(),
        words,
        active: None,
        out: Vec::with_capacity(OUT_CAPACITY),
        soft: None,
        memory: None,
        in_fd: sock.as_raw_fd(),
        adopted: None,
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
            if w.handle(&frame, &inbox.buf, &mut inbox.fds)? == Step::Retire {
                return Ok(());
            }
        }
        if !w.receive(&mut inbox)? {
            return Ok(());
        }
    }
}

/// The worker loop's state between frames.
struct Loop<'s> {
    /// The socket to the parent (blocking).
    fd: RawFd,
    /// The words this worker shares with the parent.
    words: Status<'s>,
    /// The sandbox, once applied.
    active: Option<Active>,
    /// Frames to the parent not written yet.
    out: Vec<u8>,
    /// The soft time limit of the next task, from a SOFT_LIMIT frame: the
    /// task's sequence number and the limit in ns.
    soft: Option<(u64, u64)>,
    /// The limit on this worker's memory growth, from the CONFIG frame.
    memory: Option<MemoryLimit>,
    /// Where tasks come from: `fd`, or the stream it adopted (an ADOPT
    /// frame; results still go by `fd`, to the rank that relays them).
    in_fd: RawFd,
    adopted: Option<OwnedFd>,
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
enum Step {
    /// Goes on to the next frame.
    Serve,
    /// Exits (its memory grew past its limit).
    Retire,
}

/// Whether a task's input is in a block, and whether its fd came.
enum InBlock {
    /// The input is the frame's body.
    No,
    /// The input is in the block of this fd.
    Fd(OwnedFd),
    /// The input is in a block whose fd did not arrive.
    Missing,
}

/// A TASK frame's input: its body, and the fds that came for it.
struct Input<'b> {
    /// The body, after the count of `SharedBuf` fds if one leads it.
    body: &'b [u8],
    /// The input block's fd, if the input is in a block.
    block: InBlock,
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
        // A count of SharedBuf fds may lead the body (see proto/wire.rs); a
        // body too short for it is empty.
        let (nshared, body) = match frame.shared_count(buf) {
            Some(n) => (n, frame.payload(buf)),
            None => (0, &[][..]),
        };
        let block = match frame.header.status & wire::IN_BLOCK != 0 {
            false => InBlock::No,
            true => fds.pop_front().map_or(InBlock::Missing, InBlock::Fd),
        };
        let shared: Vec<OwnedFd> = fds.drain(..nshared.min(fds.len())).collect();
        let shared_missing = shared.len() < nshared;
        Input {
            body,
            block,
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

impl Loop<'_> {
    /// Runs the initializer; if it fails, tells the parent why.
    fn run_init(&mut self, init: &Init) -> Result<(), Stop> {
        let failed = Header::new(wire::INIT_FAILED, 0).open(&mut self.out);
        let mut io = Io {
            input: &init.arg,
            block: None,
            reuse: false,
            spill: false,
            out: &mut self.out,
            spilled: None,
            shared: SharedIo::default(),
            item: None,
        };
        // SAFETY: the initializer was made by PoolBuilder::initializer
        // (TaskFn::single) in the process this one was forked from, or in
        // this same executable on an MPI rank.
        let st = unsafe { init.f.call(&mut io) };
        flush_stdio();
        if st == code::OK {
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
            Header::new(wire::SANDBOX_FAILED, 0).push_message(&mut self.out, 0, &msg);
            let _ = sys::send_all(self.fd, &self.out);
            Stop::InitFailed
        })
    }

    /// Tells the parent that this worker serves tasks (and its pid).
    fn say_ready(&mut self) -> Result<(), Stop> {
        Header::ready(std::process::id()).push(&mut self.out);
        self.flush()
    }

    /// Handles one frame from the parent, whose bytes are in `buf`.
    fn handle(
        &mut self,
        frame: &Frame,
        buf: &[u8],
        fds: &mut VecDeque<OwnedFd>,
    ) -> Result<Step, Stop> {
        let h = &frame.header;
        match h.kind {
            wire::CONFIG => {
                crate::proto::logs::install(
                    self.fd,
                    crate::proto::logs::level_in(h.config_flags()),
                );
                self.memory = configure(h);
            }
            wire::SOFT_LIMIT => self.soft = Some((h.seq, h.soft_limit_ns())),
            wire::TASK => return self.run_task(h, Input::take(frame, buf, fds)),
            wire::ADOPT => {
                // Tasks come by the new stream from now on.
                let fd = fds.pop_front().ok_or(Stop::Gone)?;
                self.in_fd = fd.as_raw_fd();
                self.adopted = Some(fd);
            }
            _ => {}
        }
        Ok(Step::Serve)
    }

    /// Runs the task of header `h` and writes its result.
    fn run_task(&mut self, h: &Header, input: Input<'_>) -> Result<Step, Stop> {
        self.start(h.seq);
        let t0 = Instant::now();
        let mut done = Header::done(h.seq).open(&mut self.out);
        let ran = self.execute(h, input, &done);
        if self.active.is_some() || FLUSH_C_STDIO.load(Ordering::Relaxed) {
            // A sandboxed worker is killed after its task, never exits; a
            // worker whose stdout is a pipe of the pool's has C's stdout
            // buffered whole: what the task left in C's stdio buffers goes
            // out now, before its result.
            sys::flush_c_stdio();
        }
        if self.over_open_files(&done, ran.status) {
            self.words
                .died_of
                .store(crate::sandbox::cause::OPEN_FILES, Ordering::SeqCst);
            return Err(Stop::Limit);
        }
        // The run time, for the parent's dispatch.
        let ns = (Instant::now() - t0).as_nanos().min(u64::MAX as u128) as u64;
        done.header.set_run_time_ns(ns);
        self.send_result(done, ran)?;
        self.words.finished.store(h.seq, Ordering::SeqCst);
        self.retire_if_grown(h.seq)
    }

    /// Marks task `seq` as started: its soft deadline, and the words from
    /// which the parent learns which task a dead worker was running.
    fn start(&mut self, seq: u64) {
        let start_ns = sys::monotonic_ns();
        crate::deadline::begin_task(start_ns, soft_limit_for(self.soft.take(), seq));
        self.words.start_ns.store(start_ns, Ordering::SeqCst);
        // No item of this task has started yet (stored before `started`).
        self.words.item.store(0, Ordering::SeqCst);
        self.words.started.store(seq, Ordering::SeqCst);
        crate::proto::logs::set_task(seq);
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
            item: Some(self.words.item),
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
                    tramp: h.tramp(),
                    func: h.func(),
                };
                // SAFETY: task frames come only from this worker's parent,
                // which encodes TaskFn values (of a fn or of a Task) of this same
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
            st = code::ENCODE;
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
        if self.words.skip.load(Ordering::SeqCst) == seq {
            return Err((code::CANCELLED, "cancelled".into()));
        }
        if input.shared_missing {
            return Err((code::DECODE, "a task's SharedBufs did not arrive".into()));
        }
        let fd = match std::mem::replace(&mut input.block, InBlock::No) {
            InBlock::No => return Ok(None),
            InBlock::Fd(fd) => Some(fd),
            InBlock::Missing => None,
        };
        in_block(input.body, fd)
            .map(Some)
            .map_err(|msg| (code::DECODE, msg.into()))
    }

    /// Whether the task that just ran went past the sandbox's cap on open
    /// files (then the worker ends without its result).
    fn over_open_files(&self, done: &wire::Open, st: u8) -> bool {
        let Some(active) = &self.active else {
            return false;
        };
        let panicked = (st == code::PANIC).then(|| task::take_message(done.body(&self.out)));
        active.over_open_files(panicked.as_deref())
    }

    /// Writes the DONE frame `done` of a task that `ran`, with the fds that
    /// go with it: out before the next task starts (see the module
    /// comment).
    fn send_result(&mut self, mut done: wire::Open, mut ran: Ran) -> Result<(), Stop> {
        let mut fds: Vec<RawFd> = Vec::new();
        if let Some((block, len, same)) = &mut ran.spilled {
            // Only a task that succeeded leaves its output in a block.
            debug_assert_eq!(ran.status, code::OK);
            if self.active.is_some() {
                // Sealed before the parent maps it, so that no task can
                // change or truncate it under the parent.
                block.seal().map_err(|_| Stop::Gone)?;
            }
            // The body is the output's length; a new block's fd goes with
            // the frame.
            done.clear_body(&mut self.out);
            self.out.extend_from_slice(&(*len as u64).to_le_bytes());
            done.header.set_result_at(if *same {
                ResultAt::InputBlock
            } else {
                fds.push(block.raw_fd());
                ResultAt::NewBlock
            });
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
    fn retire_if_grown(&mut self, seq: u64) -> Result<Step, Stop> {
        let Some(grown) = self.memory.as_ref().and_then(MemoryLimit::exceeded) else {
            return Ok(Step::Serve);
        };
        Header::retiring(seq, grown).push(&mut self.out);
        self.flush()?;
        Ok(Step::Retire)
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
        let fd = self.in_fd;
        let _ = crate::proto::idle::spin_until(|| sys::readable_now(fd));
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
            match sys::read(self.in_fd, &mut scratch[..want]) {
                Ok(0) | Err(_) => return Err(Stop::Gone),
                Ok(n) => left -= n as u64,
            }
        }
        let msg = format!(
            "a task of {} bytes is larger than the worker can hold",
            h.len
        );
        Header::done(h.seq).push_message(&mut self.out, code::DECODE, &msg);
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
        // Whole frames only: a task's threads may log meanwhile.
        let lock = crate::proto::logs::send_lock();
        let sent = if fds.is_empty() {
            sys::send_all(self.fd, &self.out)
        } else {
            let (before, frame) = self.out.split_at(at);
            sys::send_all(self.fd, before).and_then(|()| send_frame(self.fd, frame, fds))
        };
        drop(lock);
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
    crate::capture::capture_frames(h.config_flags() & wire::CONFIG_BACKTRACES != 0);
    MemoryLimit::new(h.memory_limit())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::{DONE, READY, Reader};
    use std::sync::Arc;
    use std::time::Duration;

    fn double(x: u64) -> u64 {
        x * 2
    }

    fn big(n: u64) -> Vec<u8> {
        vec![7; n as usize]
    }

    fn shared(n: u64) -> crate::proto::shared_buf::SharedBuf {
        crate::proto::shared_buf::SharedBuf::from_slice(&[n as u8; 10]).unwrap()
    }

    fn soft_left(_: ()) -> bool {
        crate::deadline::time_left().is_some()
    }

    /// One served loop at a time: a task's soft deadline is a word of the
    /// whole process, which each task's end clears.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A worker loop on a thread of this process (as on an MPI rank), and
    /// the parent's end of its socket.
    struct Served {
        _serial: std::sync::MutexGuard<'static, ()>,
        sock: OwnedFd,
        words: Arc<crate::proto::words::SharedWords>,
        thread: std::thread::JoinHandle<Result<(), Stop>>,
        buf: Vec<u8>,
        fds: VecDeque<OwnedFd>,
        reader: Reader,
    }

    impl Served {
        /// Starts the loop and reads its READY frame.
        fn start() -> Served {
            let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let (sock, theirs) = sys::stream_pair().unwrap();
            let words = Arc::new(
                crate::proto::words::SharedWords::new(crate::proto::words::STATUS_WORDS).unwrap(),
            );
            let w = words.clone();
            let thread = std::thread::spawn(move || serve(theirs, w.status(0), None, None));
            let mut s = Served {
                _serial: serial,
                sock,
                words,
                thread,
                buf: Vec::new(),
                fds: VecDeque::new(),
                reader: Reader::default(),
            };
            let (ready, _) = s.frame();
            assert_eq!((ready.kind, ready.ready_pid()), (READY, std::process::id()));
            s
        }

        /// Sends task `seq` of `f` with `flags` and `body`.
        fn task(&self, f: TaskFn, seq: u64, flags: u8, body: &[u8]) {
            let mut h = Header::task(seq, f.tramp, f.func);
            h.status = flags;
            self.send(h, body);
        }

        fn send(&self, h: Header, body: &[u8]) {
            let mut out = Vec::new();
            let frame = h.open(&mut out);
            out.extend_from_slice(body);
            frame.close(&mut out, 0);
            sys::send_all(self.sock.as_raw_fd(), &out).unwrap();
        }

        /// The worker's next frame: its header and body.
        fn frame(&mut self) -> (Header, Vec<u8>) {
            let fd = self.sock.as_raw_fd();
            loop {
                if let Some(f) = self.reader.next(&self.buf) {
                    return (f.header, f.body(&self.buf).to_vec());
                }
                // A guard against a hang, not a measure of time.
                let t0 = Instant::now();
                while !sys::readable_now(fd) {
                    assert!(t0.elapsed() < Duration::from_secs(30), "no frame came");
                    std::thread::sleep(Duration::from_millis(1));
                }
                let want = wire::read_size(self.reader.missing(&self.buf), 4096);
                let n = sys::recv_append(fd, &mut self.buf, want, &mut self.fds).unwrap();
                assert!(n > 0, "the worker closed its socket");
            }
        }

        /// Closes the parent's end: the loop ends.
        fn close(self) -> Result<(), Stop> {
            let Served { sock, thread, .. } = self;
            drop(sock);
            thread.join().unwrap()
        }
    }

    fn encoded<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode_into(v, &mut out).unwrap();
        out
    }

    #[test]
    fn a_task_frame_is_answered_with_its_result() {
        let mut s = Served::start();
        s.task(TaskFn::single(double), 1, 0, &encoded(&21u64));
        let (h, body) = s.frame();
        assert_eq!(
            (h.kind, h.seq, h.status, h.result_at()),
            (DONE, 1, code::OK, ResultAt::Inline)
        );
        assert_eq!(task::decode_outcome::<u64>(h.status, &body).unwrap(), 42);
        let st = s.words.status(0);
        assert_eq!(st.started.load(Ordering::SeqCst), 1);
        assert_eq!(st.finished.load(Ordering::SeqCst), 1);
        assert!(s.fds.is_empty());
        assert_eq!(s.close(), Ok(()));
    }

    #[test]
    fn after_adopt_tasks_come_by_the_new_stream_and_results_go_by_the_old() {
        let mut s = Served::start();
        let (engine, adopted) = sys::stream_pair().unwrap();
        let mut out = Vec::new();
        Header::new(wire::ADOPT, 0).push(&mut out);
        sys::send_fds(s.sock.as_raw_fd(), &out, &[adopted.as_raw_fd()]).unwrap();
        drop(adopted);
        let mut task = Vec::new();
        let f = TaskFn::single(double);
        let frame = Header::task(1, f.tramp, f.func).open(&mut task);
        task.extend_from_slice(&encoded(&21u64));
        frame.close(&mut task, 0);
        sys::send_all(engine.as_raw_fd(), &task).unwrap();
        let (h, body) = s.frame();
        assert_eq!((h.kind, h.seq, h.status), (DONE, 1, code::OK));
        assert_eq!(task::decode_outcome::<u64>(h.status, &body).unwrap(), 42);
        // The adopted stream's end is the worker's end.
        drop(engine);
        assert_eq!(s.close(), Ok(()));
    }

    #[test]
    fn refused_tasks_are_answered_with_why() {
        let mut s = Served::start();
        let f = TaskFn::single(double);
        let arg = encoded(&1u64);
        s.words.status(0).skip.store(1, Ordering::SeqCst);
        s.task(f, 1, 0, &arg);
        // Its block's fd did not come with it.
        s.task(f, 2, wire::IN_BLOCK, &8u64.to_le_bytes());
        // Nor did its SharedBuf's.
        let mut counted = 1u32.to_le_bytes().to_vec();
        counted.extend_from_slice(&arg);
        s.task(f, 3, wire::SHARED_FDS, &counted);
        // A frame too short for its input's length.
        s.task(f, 4, 0, &[]);
        let answers: Vec<(u8, String)> = (1..=4)
            .map(|seq| {
                let (h, body) = s.frame();
                assert_eq!((h.kind, h.seq), (DONE, seq));
                (h.status, task::take_message(&body))
            })
            .collect();
        assert_eq!(answers[0], (code::CANCELLED, "cancelled".into()));
        assert_eq!(
            answers[1],
            (code::DECODE, "a task's block did not arrive".into())
        );
        assert_eq!(
            answers[2],
            (code::DECODE, "a task's SharedBufs did not arrive".into())
        );
        assert_eq!(answers[3].0, code::DECODE);
        assert_eq!(s.close(), Ok(()));
    }

    #[test]
    fn a_large_result_comes_in_a_new_block_and_shared_bufs_by_fd() {
        let mut s = Served::start();
        let n = 2 * crate::proto::shm::SPILL_AT as u64;
        s.task(TaskFn::single(big), 1, 0, &encoded(&n));
        s.task(TaskFn::single(shared), 2, 0, &encoded(&5u64));
        let (h, body) = s.frame();
        assert_eq!(
            (h.seq, h.status, h.result_at(), body.len()),
            (1, 0, ResultAt::NewBlock, 8)
        );
        let len = u64::from_le_bytes(body[..8].try_into().unwrap()) as usize;
        let block = Block::from_fd(s.fds.pop_front().expect("the block's fd")).unwrap();
        let (v, _) = codec::decode_untrusted::<Vec<u8>>(block.bytes(len)).unwrap();
        assert_eq!(v, vec![7; n as usize]);
        let (h, body) = s.frame();
        assert_eq!((h.seq, h.status), (2, wire::SHARED_FDS));
        assert_eq!(wire::shared_prefix(h.status, &body).unwrap().0, 1);
        assert_eq!(s.fds.len(), 1);
        assert_eq!(s.close(), Ok(()));
    }

    #[test]
    fn a_soft_limit_applies_to_its_own_task_only() {
        let mut s = Served::start();
        let f = TaskFn::single(soft_left);
        let unit = encoded(&());
        s.send(Header::soft_limit(1, 60_000_000_000), &[]);
        s.task(f, 1, 0, &unit);
        // A limit sent for task 3 does not apply to task 2.
        s.send(Header::soft_limit(3, 60_000_000_000), &[]);
        s.task(f, 2, 0, &unit);
        for (seq, limited) in [(1, true), (2, false)] {
            let (h, body) = s.frame();
            assert_eq!(h.seq, seq);
            assert_eq!(
                task::decode_outcome::<bool>(h.status, &body).unwrap(),
                limited
            );
        }
        assert_eq!(s.close(), Ok(()));
    }

    #[test]
    fn a_soft_limit_is_for_the_task_it_names() {
        assert_eq!(soft_limit_for(Some((3, 50)), 3), Some(50));
        assert_eq!(soft_limit_for(Some((2, 50)), 3), None);
        assert_eq!(soft_limit_for(None, 3), None);
    }

    #[test]
    fn memory_counts_as_grown_past_the_limit_only() {
        let m = MemoryLimit {
            limit: 100,
            baseline: 1000,
        };
        assert_eq!(m.grown_past(1100), None);
        assert_eq!(m.grown_past(1101), Some(101));
        assert_eq!(m.grown_past(10), None);
        assert!(MemoryLimit::new(0).is_none());
    }

    #[test]
    fn each_stop_has_its_exit_status() {
        assert_eq!(exit_code(Ok(())), 0);
        assert_eq!(exit_code(Err(Stop::Gone)), 0);
        assert_eq!(exit_code(Err(Stop::InitFailed)), 1);
        assert_eq!(exit_code(Err(Stop::Limit)), 3);
    }

    fn dev_null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A frame with `status` and `body`, as the worker's reader sees it.
    fn parsed(status: u8, body: &[u8]) -> (Frame, Vec<u8>) {
        let mut h = Header::task(1, 0, 0);
        h.status = status;
        let mut buf = Vec::new();
        let f = h.open(&mut buf);
        buf.extend_from_slice(body);
        f.close(&mut buf, 0);
        (Reader::default().next(&buf).unwrap(), buf)
    }

    #[test]
    fn a_task_takes_its_own_fds_and_leaves_the_next_frames() {
        let mut body = 2u32.to_le_bytes().to_vec();
        body.extend_from_slice(&8u64.to_le_bytes());
        let (frame, buf) = parsed(wire::IN_BLOCK | wire::SHARED_FDS, &body);
        let mut fds: VecDeque<OwnedFd> = (0..4).map(|_| dev_null()).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let input = Input::take(&frame, &buf, &mut fds);
        assert_eq!(input.body, &8u64.to_le_bytes());
        let block = match &input.block {
            InBlock::Fd(f) => Some(f.as_raw_fd()),
            _ => None,
        };
        assert_eq!(block, Some(raw[0]));
        let shared: Vec<RawFd> = input.shared.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(shared, raw[1..3]);
        assert!(!input.shared_missing);
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].as_raw_fd(), raw[3]);
    }

    #[test]
    fn a_task_short_of_fds_says_so() {
        let (frame, buf) = parsed(wire::IN_BLOCK | wire::SHARED_FDS, &3u32.to_le_bytes());
        let mut fds: VecDeque<OwnedFd> = (0..2).map(|_| dev_null()).collect();
        let input = Input::take(&frame, &buf, &mut fds);
        assert!(matches!(input.block, InBlock::Fd(_)));
        assert_eq!(input.shared.len(), 1);
        assert!(input.shared_missing);
        assert!(fds.is_empty());
        // Without flags a task takes no fd; a count cut short is no count.
        for (status, body) in [(0, &b"abc"[..]), (wire::SHARED_FDS, &[1, 0][..])] {
            let (frame, buf) = parsed(status, body);
            let mut fds: VecDeque<OwnedFd> = (0..2).map(|_| dev_null()).collect();
            let input = Input::take(&frame, &buf, &mut fds);
            assert!(matches!(input.block, InBlock::No) && input.shared.is_empty());
            assert_eq!(input.body.len(), if status == 0 { 3 } else { 0 });
            assert_eq!(fds.len(), 2);
        }
    }

    #[test]
    fn an_input_block_must_come_whole() {
        let err = |r: Result<(Block, usize), String>| r.err().unwrap();
        assert_eq!(
            err(in_block(&8u64.to_le_bytes(), None)),
            "a task's block did not arrive"
        );
        assert_eq!(
            err(in_block(&[1, 2], Some(dev_null()))),
            "a task's block length is missing"
        );
        let fd = sys::memfd().unwrap();
        sys::set_len(&fd, 4096).unwrap();
        assert_eq!(
            err(in_block(&(1u64 << 20).to_le_bytes(), Some(fd))),
            "a task's block is shorter than its input"
        );
        let fd = sys::memfd().unwrap();
        sys::set_len(&fd, 4096).unwrap();
        let (b, len) = in_block(&100u64.to_le_bytes(), Some(fd)).unwrap();
        assert_eq!((b.capacity() >= 100, len), (true, 100));
    }

    #[test]
    fn fds_go_on_the_frames_first_bytes() {
        let (a, b) = sys::stream_pair().unwrap();
        let frame: Vec<u8> = (0..40).collect();
        let files = [dev_null(), dev_null()];
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_frame(a.as_raw_fd(), &frame, &raw).unwrap();
        let (mut got, mut fds) = (Vec::new(), VecDeque::new());
        while got.len() < frame.len() {
            sys::recv_append(b.as_raw_fd(), &mut got, 64, &mut fds).unwrap();
        }
        assert_eq!((got, fds.len()), (frame, 2));
        // One group of fds per byte: a 1-byte frame has room for one.
        let many = vec![raw[0]; sys::MAX_FDS_PER_MSG + 1];
        assert!(send_frame(a.as_raw_fd(), &[0], &many).is_err());
    }
}
