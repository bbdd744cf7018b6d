//! The sending side of a worker: the frames of a task, as dispatch writes
//! them to the worker's connection (`State::dispatch` in `core.rs` picks
//! the worker and the tasks).

use super::{SeenStart, Worker};
use crate::engine::job::{Config, InFlight, Job};
use crate::proto::shm::Body;
use crate::proto::wire::{self, HDR, Header};
use crate::sys;

/// The bytes a job's frames take (for the batch's size cap).
pub(crate) fn frame_bytes(job: &Job) -> usize {
    let soft = if job.soft_timeout.is_some() { HDR } else { 0 };
    soft + HDR
        + match &job.payload {
            Body::Heap(p) => p.len(),
            Body::Shm(..) => 8,
        }
}

impl Worker {
    /// Appends `job`'s frames (its soft limit, if any, then the task) to
    /// the out buffer, with the fds they carry, and holds it; returns the
    /// task's sequence number on this worker.
    pub(crate) fn push_task(&mut self, job: Job, charge: u64, cfg: &Config) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent += 1;
        if cfg.sandbox.is_some() {
            // A sandboxed task's clock starts as it is sent (it goes alone,
            // to an idle worker): its start word is the task's to rewrite.
            self.seen_start = SeenStart {
                seq,
                ns: sys::monotonic_ns(),
            };
        }
        if let Some(soft) = job.soft_timeout {
            // Its soft limit, in the frame just before it.
            let ns = crate::deadline::nanos(soft);
            Header::soft_limit(seq, ns).push(self.conn.out());
        }
        self.push_task_frame(seq, &job, cfg.inline_shared);
        self.held_ns += charge;
        self.in_flight.push_back(InFlight { seq, job, charge });
        seq
    }

    fn push_task_frame(&mut self, seq: u64, job: &Job, inline_shared: bool) -> usize {
        let mut h = Header::task(seq, job.f.tramp, job.f.func);
        if inline_shared {
            h.status |= wire::INLINE_SHARED;
        }
        // The fds go on the frame's first bytes (wire::fd_offset): the
        // input block's, then the SharedBufs'.
        let at = self.conn.out().len();
        let mut nfds = 0;
        if !job.shared.is_empty() {
            h.status |= wire::SHARED_FDS;
        }
        if let Body::Shm(b, _) = &job.payload {
            h.status |= wire::IN_BLOCK;
            if job.retries > 0 {
                h.status |= wire::KEEP_INPUT;
            }
            self.conn.attach_fd(wire::fd_offset(at, 0), b.raw_fd());
            nfds = 1;
        }
        for r in &job.shared {
            self.conn.attach_fd(wire::fd_offset(at, nfds), r.raw_fd());
            nfds += 1;
        }
        let out = self.conn.out();
        let frame = h.open(out);
        if !job.shared.is_empty() {
            out.extend_from_slice(&(job.shared.len() as u32).to_le_bytes());
        }
        match &job.payload {
            Body::Heap(p) => out.extend_from_slice(p),
            Body::Shm(_, n) => out.extend_from_slice(&(*n as u64).to_le_bytes()),
        }
        let bytes = out.len() - at;
        frame.close(out, 0);
        bytes
    }
}
