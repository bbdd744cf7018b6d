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

use crate::proto::shared_buf::{Mode, Supply};
use crate::proto::shm::Block;
use crate::proto::status::Status;
use crate::proto::task::{Init, Io, SharedIo, TaskFn, status};
use crate::proto::wire::{self, HDR, Header};
use crate::sandbox::{Active, Prepared};
use crate::sys;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

const READ_CHUNK: usize = 256 << 10;
const KEEP_CAPACITY: usize = 4 << 20;

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
    let code = match serve(sock, status, init, apply) {
        Ok(()) => 0,
        Err(Stop::InitFailed) => 1,
        Err(Stop::Gone) => 0,
        Err(Stop::Limit) => 3,
    };
    flush_stdio();
    sys::exit_now(code)
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
    let fd = sock.as_raw_fd();
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    crate::capture::serve_on_this_thread();
    if let Some(init) = init {
        let at = Header::new(wire::INIT_FAILED, 0, 0, 0).begin(&mut out);
        let mut io = Io {
            input: &init.arg,
            block: None,
            reuse: false,
            spill: false,
            out: &mut out,
            spilled: None,
            shared: SharedIo::default(),
        };
        // SAFETY: the initializer was made by PoolBuilder::initializer
        // (TaskFn::single) in the process this one was forked from, or in
        // this same executable on an MPI rank.
        let st = unsafe { init.f.call(&mut io) };
        flush_stdio();
        if st != status::OK {
            wire::finish(&mut out, at, st);
            let _ = sys::send_all(fd, &out);
            return Err(Stop::InitFailed);
        }
        out.clear();
    }
    let active = match sandbox.map(|apply| apply()) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(msg)) => {
            let at = Header::new(wire::SANDBOX_FAILED, 0, 0, 0).begin(&mut out);
            let _ = crate::proto::codec::encode_into(&msg, &mut out);
            wire::finish(&mut out, at, 0);
            let _ = sys::send_all(fd, &out);
            return Err(Stop::InitFailed);
        }
    };
    let at = Header::new(wire::READY, 0, std::process::id() as u64, 0).begin(&mut out);
    wire::finish(&mut out, at, 0);
    sys::send_all(fd, &out).map_err(|_| Stop::Gone)?;
    out.clear();

    let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut pos = 0usize;
    // The soft time limit of the next task, from a SOFT_LIMIT frame: the
    // task's sequence number and the limit in ns.
    let mut soft: Option<(u64, u64)> = None;
    // The limit on this worker's memory growth, from the CONFIG frame.
    let mut memory: Option<MemoryLimit> = None;
    loop {
        while let Some((h, total)) = wire::complete(&inbuf[pos..]) {
            let body = &inbuf[pos + HDR..pos + total];
            pos += total;
            if h.kind == wire::CONFIG {
                memory = configure(&h);
                continue;
            }
            if h.kind == wire::SOFT_LIMIT {
                soft = Some((h.seq, h.a));
                continue;
            }
            if h.kind != wire::TASK {
                continue;
            }
            // A count of SharedBuf fds may lead the body (see wire.rs).
            let (nshared, body) = wire::shared_prefix(h.status, body).unwrap_or((0, &[]));
            let start_ns = sys::monotonic_ns();
            let limit = soft.take().filter(|&(seq, _)| seq == h.seq);
            crate::deadline::begin_task(start_ns, limit.map(|(_, ns)| ns));
            status.start_ns.store(start_ns, Ordering::SeqCst);
            status.started.store(h.seq, Ordering::SeqCst);
            let t0 = Instant::now();
            let at = Header::new(wire::DONE, h.seq, 0, 0).begin(&mut out);
            // The fds of an input block and of SharedBufs are taken whatever
            // happens next, so that the next frame's fds stay paired with
            // their frame.
            let block_fd = (h.status & wire::IN_BLOCK != 0).then(|| fds.pop_front());
            let shared_fds: Vec<OwnedFd> = fds.drain(..nshared.min(fds.len())).collect();
            let shared_missing = shared_fds.len() < nshared;
            let mode = if h.status & wire::INLINE_SHARED != 0 {
                Mode::Inline
            } else {
                Mode::Fds
            };
            let mut io = Io {
                input: body,
                block: None,
                // A sandboxed worker never writes into the parent's block
                // (which it gets sealed, read-only).
                reuse: h.status & wire::KEEP_INPUT == 0 && active.is_none(),
                spill: true,
                out: &mut out,
                spilled: None,
                shared: SharedIo {
                    mode,
                    supply: Supply::from_fds(shared_fds),
                    out: Vec::new(),
                },
            };
            let mut st = status::OK;
            // Cancelled before it started: skip it. (The parent writes
            // `skip` before it reads `started`, this process the other way
            // round: one of the two sees the other's write, so a task is
            // either skipped here or killed there once it runs.)
            if status.skip.load(Ordering::SeqCst) == h.seq {
                let _ = crate::proto::codec::encode_into("cancelled", io.out);
                st = status::CANCELLED;
            } else if shared_missing {
                let msg = "a task's SharedBufs did not arrive";
                let _ = crate::proto::codec::encode_into(msg, io.out);
                st = status::DECODE;
            } else if let Some(fd) = block_fd {
                match in_block(body, fd) {
                    Ok(b) => {
                        io.input = &[];
                        io.block = Some(b);
                    }
                    Err(msg) => {
                        let _ = crate::proto::codec::encode_into(&msg, io.out);
                        st = status::DECODE;
                    }
                }
            }
            if st == status::OK {
                let f = TaskFn {
                    tramp: h.a,
                    func: h.b,
                };
                // SAFETY: task frames come only from this worker's parent,
                // which encodes TaskFn::single/chunk values of this same
                // binary (a fork of it, or, for MPI, an exec of the same
                // executable, checked by hash at start-up).
                st = unsafe { f.call(&mut io) };
                flush_stdio();
            }
            crate::deadline::end_task();
            if !io.shared.out.is_empty()
                && io.shared.out.len() > crate::proto::shared_buf::max_per_task()
            {
                // More buffers than one message may bring the parent.
                let msg = crate::proto::shared_buf::too_many_message(io.shared.out.len(), "result");
                io.shared.out.clear();
                io.spilled = None;
                io.out.truncate(at + HDR);
                let _ = crate::proto::codec::encode_into(&msg, io.out);
                st = status::ENCODE;
            }
            let spilled = io.spilled.take();
            // The result's SharedBufs: given up by the task's values (the
            // encoder took them out), sent with the result, then unmapped.
            let shared = std::mem::take(&mut io.shared.out);
            let shared_fds: Vec<i32> = shared.iter().map(|r| r.raw_fd()).collect();
            drop(io);
            if let Some(a) = &active {
                let panicked = (st == status::PANIC)
                    .then(|| crate::proto::task::take_message(&out[at + HDR..]));
                if a.over_open_files(panicked.as_deref()) {
                    status
                        .died_of
                        .store(crate::sandbox::cause::OPEN_FILES, Ordering::SeqCst);
                    return Err(Stop::Limit);
                }
            }
            let now = Instant::now();
            let took = (now - t0).as_nanos().min(u64::MAX as u128) as u64;
            match spilled {
                None => {
                    let mut flags = 0;
                    if !shared_fds.is_empty() {
                        let n = shared_fds.len() as u32;
                        out.splice(at + HDR..at + HDR, n.to_le_bytes());
                        flags = wire::SHARED_FDS;
                    }
                    wire::finish(&mut out, at, st | flags);
                    // The run time, for the parent's dispatch (header field `b`).
                    out[at + 26..at + 34].copy_from_slice(&took.to_le_bytes());
                    if !shared_fds.is_empty() {
                        let frame = out.split_off(at);
                        flush(fd, &mut out)?;
                        send_frame(fd, &frame, &shared_fds).map_err(|_| Stop::Gone)?;
                    }
                }
                Some((mut block, len, same)) => {
                    if active.is_some() {
                        // Sealed before the parent maps it, so that no task can
                        // change or truncate it under the parent.
                        block.seal().map_err(|_| Stop::Gone)?;
                    }
                    // The frame is a header and the output's length; a new
                    // block's fd goes with it.
                    out.truncate(at);
                    let tag = if same {
                        wire::OUT_SAME_BLOCK
                    } else {
                        wire::OUT_NEW_BLOCK
                    };
                    let mut h = Header::new(wire::DONE, h.seq, tag, took);
                    h.len = 8;
                    let mut frame = Vec::with_capacity(HDR + 12);
                    let mut fds = Vec::with_capacity(1 + shared_fds.len());
                    if !same {
                        fds.push(block.raw_fd());
                    }
                    if !shared_fds.is_empty() {
                        h.len += 4;
                        h.status |= wire::SHARED_FDS;
                        fds.extend_from_slice(&shared_fds);
                    }
                    h.begin(&mut frame);
                    if !shared_fds.is_empty() {
                        frame.extend_from_slice(&(shared_fds.len() as u32).to_le_bytes());
                    }
                    frame.extend_from_slice(&(len as u64).to_le_bytes());
                    flush(fd, &mut out)?;
                    send_frame(fd, &frame, &fds).map_err(|_| Stop::Gone)?;
                    drop(block);
                }
            }
            // Out before the next task starts (see the module comment).
            flush(fd, &mut out)?;
            drop(shared);
            status.finished.store(h.seq, Ordering::SeqCst);
            if let Some(grown) = memory.as_ref().and_then(MemoryLimit::exceeded) {
                // Its result is out; the tasks after it were not started
                // and run elsewhere. Say why, and exit.
                let at = Header::new(wire::RETIRING, h.seq, grown, 0).begin(&mut out);
                wire::finish(&mut out, at, 0);
                flush(fd, &mut out)?;
                return Ok(());
            }
        }
        // Keep the partial frame, if any, at the front of the buffer.
        inbuf.drain(..pos);
        pos = 0;
        if inbuf.is_empty() && inbuf.capacity() > KEEP_CAPACITY {
            inbuf = Vec::with_capacity(READ_CHUNK);
        }
        let need = wire::missing(&inbuf);
        let want = if need > 0 {
            usize::try_from(need).unwrap_or(usize::MAX)
        } else {
            READ_CHUNK
        };
        // Wait a moment for the next task without sleeping: it often comes
        // within microseconds, and waking from sleep costs more.
        let _ = crate::proto::idle::spin_until(|| sys::readable_now(fd));
        match sys::recv_append(fd, &mut inbuf, want, &mut fds) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                // A frame larger than this worker can hold: answer it with an
                // error and skip its bytes.
                // The fds that came so far are this frame's (the frames
                // before it took theirs): they go with it.
                fds.clear();
                skip_oversized(fd, &mut inbuf, &mut out, need)?;
            }
            Err(_) => return Err(Stop::Gone),
        }
    }
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
        let now = sys::private_memory().ok()?;
        let grown = now.saturating_sub(self.baseline);
        (grown > self.limit).then_some(grown)
    }
}

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

fn flush(fd: i32, out: &mut Vec<u8>) -> Result<(), Stop> {
    if out.is_empty() {
        return Ok(());
    }
    // An error means the parent is gone.
    sys::send_all(fd, out).map_err(|_| Stop::Gone)?;
    out.clear();
    if out.capacity() > KEEP_CAPACITY {
        *out = Vec::with_capacity(64 << 10);
    }
    Ok(())
}

fn skip_oversized(fd: i32, inbuf: &mut Vec<u8>, out: &mut Vec<u8>, need: u64) -> Result<(), Stop> {
    let Some(h) = Header::parse(inbuf) else {
        return Err(Stop::Gone);
    };
    let mut left = need;
    inbuf.clear();
    let mut scratch = vec![0u8; READ_CHUNK];
    while left > 0 {
        let want = (left as usize).min(scratch.len());
        match sys::read(fd, &mut scratch[..want]) {
            Ok(0) | Err(_) => return Err(Stop::Gone),
            Ok(n) => left -= n as u64,
        }
    }
    let at = Header::new(wire::DONE, h.seq, 0, 0).begin(out);
    let msg = format!(
        "a task of {} bytes is larger than the worker can hold",
        h.len
    );
    let _ = crate::proto::codec::encode_into(&msg, out);
    wire::finish(out, at, status::DECODE);
    flush(fd, out)
}
