//! The reading side of a worker: what comes back on its socket, its
//! frames turned into outcomes. In a sandboxed pool nothing it sends is
//! believed that the protocol does not allow (`proto/untrusted.rs`).

use super::Worker;
use crate::engine::completion::{Buf, Payload, with_lost};
use crate::engine::job::{Completion, Job, KillReason};
use crate::engine::plan::Estimates;
use crate::error::Error;
use crate::proto::conn::Filled;
use crate::proto::shared_buf::{self, Supply};
use crate::proto::shm::{Block, BlockCache, Body, Lent};
use crate::proto::task::{self, code};
use crate::proto::untrusted;
use crate::proto::wire::{self, Frame, Header, ResultAt};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A result at least this large is handed over with the read buffer it
/// arrived in (no copy); the buffer starts afresh.
const HAND_OVER: usize = 1 << 20;
/// How much one read asks for when no frame is partly read.
const READ_CHUNK: usize = 256 << 10;
/// How much the supervisor reads from one worker in one turn of its poll
/// loop. A worker with more to send is still readable on the next turn
/// (the poll is level-triggered), after the others have been served: one
/// that floods its socket cannot keep the supervisor from the rest. One
/// read takes about a socket buffer's worth (1 MiB), so a large result
/// costs a poll per few MiB, next to copying them.
pub(crate) const READ_BUDGET: usize = 4 << 20;

/// What reading a worker's frames needs besides the worker.
struct Sink<'a> {
    ready: &'a mut usize,
    est: &'a mut Estimates,
    cache: &'a Arc<BlockCache>,
    done: &'a mut Vec<Completion>,
}

impl Worker {
    /// Reads what it has sent, up to `budget` bytes (all of it once it has
    /// ended), and turns whole frames into outcomes (into `done`); counts
    /// it in `ready` once it is, and learns the run times it reports.
    /// Returns how many bytes it read.
    pub(crate) fn read(
        &mut self,
        ready: &mut usize,
        est: &mut Estimates,
        cache: &Arc<BlockCache>,
        done: &mut Vec<Completion>,
        budget: usize,
    ) -> usize {
        let before = (self.ready, self.in_flight.len());
        let mut sink = Sink {
            ready,
            est,
            cache,
            done,
        };
        let got = self.read_frames(&mut sink, budget);
        if self.cpu.is_on() {
            if (self.ready, self.in_flight.len()) != before {
                // Read after the frames that said a task ended: the tasks
                // after it started later than this reading.
                self.cpu.task_ended();
            }
            if self.in_flight.is_empty() {
                self.cpu.look_at(None);
            }
        }
        got
    }

    /// Reads and parses until the socket has nothing more, or at least
    /// `budget` bytes are read (the last read may take it past by what the
    /// socket held); returns how many were.
    fn read_frames(&mut self, sink: &mut Sink<'_>, budget: usize) -> usize {
        let mut got = 0usize;
        while got < budget && !self.violated {
            // A sandboxed worker's claim is checked before the buffer grows
            // for it.
            if let Err(reason) = self.check_partial() {
                self.violation(reason);
                break;
            }
            let need = wire::missing(&self.conn.inbuf);
            let had = self.conn.inbuf.len();
            // The read buffer is reserved for the whole frame at once (a
            // frame is read in one buffer, grown once); one read takes what
            // the socket holds, so a turn may end a read past the budget.
            match self.conn.fill(wire::read_size(need, READ_CHUNK)) {
                Filled::Some => got += self.conn.inbuf.len().saturating_sub(had),
                Filled::Nothing => break,
                Filled::Eof => {
                    // It died (or closed its side); its exit report follows.
                    self.eof = true;
                    break;
                }
                Filled::Failed(e) => {
                    self.read_failed(e, need);
                    break;
                }
            }
            if let Err(reason) = self.check_fds() {
                self.violation(reason);
                break;
            }
            self.parse_frames(sink);
        }
        got
    }

    /// Reading its socket failed: its stream can no longer be trusted.
    fn read_failed(&mut self, e: std::io::Error, need: u64) {
        let e = if e.kind() == std::io::ErrorKind::OutOfMemory {
            // A result larger than this process can hold.
            Error::TooLarge { len: need }
        } else {
            // fds lost, say: make sure it dies.
            Error::io("reading from a worker", e)
        };
        self.set_kill(KillReason::Error(e), 0);
        self.eof = true;
    }

    /// In a sandboxed pool: the frame the read buffer starts with, once its
    /// header is in, must be one the protocol allows, its length within
    /// the result limit (`proto/untrusted.rs`).
    fn check_partial(&self) -> Result<(), String> {
        match (self.result_limit, Header::parse(&self.conn.inbuf)) {
            (Some(limit), Some(h)) => untrusted::check_header(&h, limit),
            _ => Ok(()),
        }
    }

    /// In a sandboxed pool: fds beyond those its frames may carry are
    /// closed as soon as they are received, and break the protocol.
    fn check_fds(&mut self) -> Result<(), String> {
        let fds = &mut self.conn.in_fds;
        if self.result_limit.is_none() || fds.is_empty() {
            return Ok(());
        }
        let allowed = untrusted::fds_allowed(&self.conn.inbuf);
        if fds.len() <= allowed {
            return Ok(());
        }
        let extra = fds.len() - allowed;
        fds.truncate(allowed);
        Err(format!(
            "sent {extra} file descriptor(s) where the protocol carries none"
        ))
    }

    /// A sandboxed worker broke the protocol: the pool kills it, reads
    /// nothing more from it (what it sent is dropped and its fds closed),
    /// and fails its task with the error returned.
    fn violation(&mut self, reason: impl Into<String>) -> Error {
        if let (true, Some(KillReason::Error(e))) = (self.violated, &self.kill.reason) {
            // The first violation is what it is killed for.
            return e.clone();
        }
        let e = Error::ProtocolViolation {
            pid: self.pid,
            reason: reason.into(),
        };
        log::warn!("procpool: {e}");
        self.set_kill(KillReason::Error(e.clone()), 0);
        self.violated = true;
        self.eof = true;
        self.conn.inbuf = Vec::new();
        self.conn.in_fds.clear();
        e
    }

    /// A failure of the worker's own protocol: the pool kills it (in a
    /// sandboxed pool, as a violation).
    fn broken(&mut self, what: &str) {
        if self.result_limit.is_some() {
            self.violation(what);
            return;
        }
        let e = Error::Broken {
            reason: format!("worker {} {what}", self.pid),
        };
        self.set_kill(KillReason::Error(e), 0);
    }

    /// A result that breaks the protocol: in a sandboxed pool a violation
    /// (the worker is killed), else its task's `Broken` error.
    fn bad_result(&mut self, what: &str) -> Error {
        if self.result_limit.is_some() {
            return self.violation(what);
        }
        Error::Broken {
            reason: format!("worker {}: {what}", self.pid),
        }
    }

    fn parse_frames(&mut self, sink: &mut Sink<'_>) {
        let mut pos = 0usize;
        while let Some(f) = Frame::parse(&self.conn.inbuf, pos) {
            if let Some(limit) = self.result_limit
                && let Err(reason) = untrusted::check_header(&f.header, limit)
            {
                self.violation(reason);
            }
            if !self.violated {
                pos = self.frame(f, sink);
            }
            if self.violated {
                // Its buffer is gone, with the rest of what it sent.
                return;
            }
        }
        self.conn.consume(pos);
    }

    /// Handles one whole frame; returns where the next one starts.
    fn frame(&mut self, f: Frame, sink: &mut Sink<'_>) -> usize {
        let h = f.header;
        match h.kind {
            wire::READY if !self.ready => {
                self.ready = true;
                *sink.ready += 1;
            }
            wire::READY if self.result_limit.is_some() => {
                self.violation("said it was ready twice");
            }
            wire::RETIRING => {
                // Its memory grew past the limit: it exits after this task.
                log::debug!(
                    "procpool: worker {} grew by {} bytes, past max_memory_per_child; replacing it",
                    self.pid,
                    h.growth()
                );
                self.retiring = true;
            }
            wire::INIT_FAILED | wire::SANDBOX_FAILED
                if self.ready && self.result_limit.is_some() =>
            {
                self.violation("reported a failed start after it was ready");
            }
            wire::INIT_FAILED => {
                let b = f.body(&self.conn.inbuf);
                self.init_msg = Some(task::init_failure_message(h.status, b));
            }
            wire::SANDBOX_FAILED => {
                self.init_msg = Some(task::take_message(f.body(&self.conn.inbuf)));
                self.sandbox_failed = true;
            }
            wire::LOG => {
                let body = f.body(&self.conn.inbuf);
                if let Err(why) = crate::proto::logs::forward(&h, body, self.pid)
                    && self.result_limit.is_some()
                {
                    self.violation(why);
                }
            }
            wire::DONE => {
                // `done` may take the read buffer itself (a large
                // result): parsing goes on from wherever it leaves it.
                return self.done(f, sink);
            }
            _ => {}
        }
        f.end
    }

    /// A DONE frame: stores its outcome. Returns where the next frame
    /// starts.
    fn done(&mut self, f: Frame, sink: &mut Sink<'_>) -> usize {
        let (h, end) = (f.header, f.end);
        // The count of the SharedBufs that came with it, if any.
        let Some(nshared) = f.shared_count(&self.conn.inbuf) else {
            self.broken("sent a malformed result");
            return end;
        };
        let body_at = f.payload_range().start;
        let (outcome, next) = self.outcome(h, body_at, end, sink.cache);
        // Its SharedBufs' fds came after its block's (if any).
        let fds = &mut self.conn.in_fds;
        let shared_fds: Vec<OwnedFd> = fds.drain(..nshared.min(fds.len())).collect();
        let shared_missing = shared_fds.len() < nshared;
        if !matches!(self.in_flight.front(), Some(f) if f.seq == h.seq) {
            self.broken("answered a task it was not given");
            return next;
        }
        let mut f = self.in_flight.pop_front().expect("front exists");
        let outcome = self.with_shared(outcome, shared_fds, shared_missing, &mut f.job);
        self.held_ns = self.held_ns.saturating_sub(f.charge);
        // The worker reports each task's run time.
        sink.est.learn(f.job.f, h.run_time_ns(), f.job.items);
        self.busy_ns = self.busy_ns.saturating_add(h.run_time_ns());
        if !f.job.cancelled {
            // A split chunk's lost items join its result in their places.
            let outcome = with_lost(outcome, std::mem::take(&mut f.job.lost));
            sink.done
                .push(Completion::new(f.job.slot, f.job.hook, outcome));
        }
        if let Body::Shm(b, _) = f.job.payload {
            sink.cache.put(b);
        }
        if self.in_flight.is_empty() {
            self.deadline = None;
        }
        next
    }

    /// The outcome a DONE frame's body holds, and where the next frame
    /// starts (0 when the read buffer was handed over with the result).
    fn outcome(
        &mut self,
        h: Header,
        body_at: usize,
        end: usize,
        cache: &Arc<BlockCache>,
    ) -> (Result<Payload, Error>, usize) {
        let st = h.status & !wire::SHARED_FDS;
        if matches!(h.result_at(), ResultAt::InputBlock | ResultAt::NewBlock) {
            let body = self.conn.inbuf[body_at..end].to_vec();
            return (self.block_outcome(h, &body, cache), end);
        }
        if st != code::OK {
            let body = &self.conn.inbuf[body_at..end];
            return (Err(task::outcome_error(st, body)), end);
        }
        let (buf, next) = if h.len as usize >= HAND_OVER {
            let rest = self.conn.inbuf[end..].to_vec();
            let mut vec = std::mem::replace(&mut self.conn.inbuf, rest);
            vec.truncate(end);
            (
                Buf::Heap {
                    vec,
                    start: body_at,
                },
                0,
            )
        } else {
            let vec = self.conn.inbuf[body_at..end].to_vec();
            (Buf::Heap { vec, start: 0 }, end)
        };
        (Ok(Payload::Bytes(buf, Supply::default())), next)
    }

    /// The caller's own buffers come back as they were lent (the same
    /// mapping); the others are mapped where the value is decoded.
    fn with_shared(
        &self,
        outcome: Result<Payload, Error>,
        fds: Vec<OwnedFd>,
        missing: bool,
        job: &mut Job,
    ) -> Result<Payload, Error> {
        let lent = std::mem::take(&mut job.shared);
        let broken = |reason: String| Error::Broken {
            reason: format!("worker {}: {reason}", self.pid),
        };
        match outcome {
            Ok(Payload::Bytes(..)) if missing => {
                Err(broken("a result's SharedBufs did not arrive".into()))
            }
            Ok(Payload::Bytes(b, _)) => match Supply::resolve(fds, lent) {
                // A sandboxed worker copies its buffers inline: the value
                // may make no more of them (each an fd here) than one task
                // may carry.
                Ok(s) if self.result_limit.is_some() => {
                    Ok(Payload::Bytes(b, s.cap_inline(shared_buf::max_per_task())))
                }
                Ok(s) => Ok(Payload::Bytes(b, s)),
                Err(reason) => Err(broken(reason)),
            },
            other => other,
        }
    }

    /// The outcome of a DONE frame whose output is in a block. A sandboxed
    /// worker's claims (the length, the block's size) are checked against
    /// the result limit before the block is mapped.
    fn block_outcome(
        &mut self,
        h: Header,
        body: &[u8],
        cache: &Arc<BlockCache>,
    ) -> Result<Payload, Error> {
        if let Some(limit) = self.result_limit
            && let Err(reason) = untrusted::check_done_body(&h, body, limit)
        {
            return Err(self.violation(reason));
        }
        let Some(len) = body.get(..8) else {
            return Err(self.bad_result("a block length is missing"));
        };
        let len = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let mut block = if h.result_at() == ResultAt::InputBlock {
            match self.input_block(cache.is_sandboxed()) {
                Ok(b) => b,
                Err(what) => return Err(self.bad_result(what)),
            }
        } else {
            let Some(fd) = self.conn.in_fds.pop_front() else {
                return Err(self.bad_result("a result's block did not arrive"));
            };
            match self.result_limit {
                Some(limit) => match Block::from_sealed_fd(fd, untrusted::block_max(limit)) {
                    Ok(b) => b,
                    Err(e) => return Err(self.violation(format!("sent a result block: {e}"))),
                },
                None => Block::from_fd(fd).map_err(|e| Error::io("mapping a result's block", e))?,
            }
        };
        block
            .refresh()
            .map_err(|e| Error::io("mapping a result's block", e))?;
        if block.capacity() < len {
            return Err(self.bad_result("a result's block is shorter than the result"));
        }
        Ok(Payload::Bytes(
            Buf::Block(Lent {
                block: Some(block),
                len,
                cache: cache.clone(),
            }),
            Supply::default(),
        ))
    }

    /// The input block of the task at the front, for a result written into
    /// it.
    fn input_block(&mut self, sandboxed: bool) -> Result<Block, &'static str> {
        if sandboxed {
            // Its input was sealed: it cannot have written its result there.
            return Err("a sandboxed worker named its input block for its result");
        }
        match self.in_flight.front_mut().map(|f| &mut f.job.payload) {
            Some(p @ Body::Shm(..)) => match std::mem::replace(p, Body::Heap(Vec::new())) {
                Body::Shm(b, _) => Ok(b),
                Body::Heap(_) => unreachable!(),
            },
            _ => Err("a result named an input block that it had not"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::job::Config;
    use crate::sys;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// A pool's settings, sandboxed (with `result_limit`) or not.
    fn config(result_limit: Option<u64>) -> Config {
        Config {
            processes: 1,
            max_tasks_per_child: None,
            timeout: None,
            soft_timeout: None,
            retries: 0,
            has_init: false,
            check_task: None,
            backtraces: false,
            forward_logs: log::LevelFilter::Off,
            max_memory_per_child: None,
            sandbox: None,
            result_limit,
            inline_shared: false,
            inline_bodies: false,
            backend_keeps_timeouts: false,
            prefetch_chunks: false,
            spin: Duration::ZERO,
            item_progress: true,
        }
    }

    /// A worker as the supervisor sees it, and the other end of its
    /// socket (the worker's, here this test's).
    fn worker(result_limit: Option<u64>) -> (Worker, OwnedFd) {
        let (ours, theirs) = sys::stream_pair().expect("socketpair");
        let w = Worker::new(0, 1, None, ours, &config(result_limit));
        (w, theirs)
    }

    /// One `read` of the worker's socket.
    fn read_once(w: &mut Worker, budget: usize) -> usize {
        let (mut ready, mut est) = (0, Estimates::default());
        let cache = Arc::new(BlockCache::default());
        w.read(&mut ready, &mut est, &cache, &mut Vec::new(), budget)
    }

    /// A worker that never stops sending frames the protocol allows
    /// (RETIRING) is read a budget's worth at a time: the supervisor's turn
    /// ends however fast it sends.
    #[test]
    fn a_turn_reads_one_worker_for_at_most_its_budget() {
        for limit in [None, Some(1 << 20)] {
            let (mut w, theirs) = worker(limit);
            let flood = std::thread::spawn(move || {
                let mut batch = Vec::new();
                for _ in 0..10_000 {
                    Header::retiring(1, 0).push(&mut batch);
                }
                while sys::send_all(theirs.as_raw_fd(), &batch).is_ok() {}
            });
            let budget = 1 << 20;
            let mut total = 0;
            while total < 8 * budget {
                let got = read_once(&mut w, budget);
                assert!(got < budget + READ_CHUNK, "one turn read {got} bytes");
                total += got;
            }
            assert!(w.retiring && !w.violated && w.kill().is_none());
            drop(w);
            flood.join().unwrap();
        }
    }

    /// A sandboxed worker's claim past its limit is refused before the
    /// read buffer grows for it, and kills the worker; without a sandbox
    /// the same header is believed.
    #[test]
    fn a_claim_past_the_limit_kills_a_sandboxed_worker_before_any_allocation() {
        let mut h = Header::done(1);
        h.len = 64 << 20;
        let mut bytes = Vec::new();
        h.open(&mut bytes);
        let (mut w, theirs) = worker(Some(1 << 20));
        sys::send_all(theirs.as_raw_fd(), &bytes).unwrap();
        read_once(&mut w, usize::MAX);
        read_once(&mut w, usize::MAX);
        assert!(w.violated && w.eof && w.conn.inbuf.capacity() == 0);
        match w.kill() {
            Some(KillReason::Error(Error::ProtocolViolation { reason, .. })) => {
                assert!(reason.contains("claims 67108864 bytes"), "{reason}")
            }
            _ => panic!("the worker was not killed for a violation"),
        }
        let (mut w, theirs) = worker(None);
        sys::send_all(theirs.as_raw_fd(), &bytes).unwrap();
        sys::send_all(theirs.as_raw_fd(), &[0; 100]).unwrap();
        read_once(&mut w, usize::MAX);
        read_once(&mut w, usize::MAX);
        assert!(!w.violated && w.kill().is_none());
        assert!(w.conn.inbuf.capacity() >= 64 << 20);
    }

    /// fds on a frame that carries none are closed as soon as they arrive,
    /// and kill a sandboxed worker; without a sandbox they are kept.
    #[test]
    fn stray_fds_are_closed_at_once_in_a_sandbox() {
        let mut frame = Vec::new();
        Header::retiring(1, 0).push(&mut frame);
        for (limit, kept) in [(Some(1 << 20), 0), (None, 200)] {
            let (mut w, theirs) = worker(limit);
            let (a, _b) = sys::stream_pair().unwrap();
            let fds = vec![a.as_raw_fd(); 200];
            sys::send_fds(theirs.as_raw_fd(), &frame, &fds).unwrap();
            read_once(&mut w, usize::MAX);
            assert_eq!(w.conn.in_fds.len(), kept);
            assert_eq!(w.violated, limit.is_some());
        }
    }
}
