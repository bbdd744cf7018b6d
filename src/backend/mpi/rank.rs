//! A worker rank (rank >= 1): it never returns from `build`. It hosts its
//! own fork server (started by exec before MPI was initialised in this
//! process, without the launcher's variables), which forks the rank's
//! workers; so a task that crashes ends only its worker, as in a local
//! pool. The rank's "procpool-mpi" thread connects a TCP stream to rank 0
//! for each worker (`tcp`) and hands it to the worker (ADOPT), which reads
//! its tasks from it; the thread writes the worker's results on it,
//! inlining one that the worker put in a shared-memory block. (Where it
//! cannot connect, it relays both ways in MPI messages.) It keeps the
//! timeouts that rank 0 sends for the worker's tasks on this host's clock,
//! and reports each worker's end with its real wait status and the task it
//! had started (from its status words), once the worker's last output is
//! on its way. On STOP it closes its server (which kills its workers),
//! acknowledges and returns.
//!
//! It tells rank 0 it lives several times per rank timeout (`peers`).
//! If it hears nothing from rank 0 for the whole timeout, or rank 0 fences
//! it off (it was counted as lost), it closes its server too and returns
//! [`Finish::Orphaned`]: the process then exits without finalising MPI, so
//! nothing is left on a host cut off from the job.

use super::tcp::{self, Dial};
use super::transport::*;
use crate::backend::local::Local;
use crate::engine::seam::{Backend, End, Event};
use crate::proto::conn::{Conn, Flushed};
use crate::proto::task::code;
use crate::proto::wire::{self, Frame, Header, ResultAt};
use crate::proto::words::SharedWords;
use crate::sys::{self, PollSet};
use mpi::topology::Communicator;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// While every stream is a socket, MPI is looked at no more often than
/// this (it brings only control messages then).
const CONTROL_LOOK: Duration = Duration::from_micros(200);
/// How long the TCP stream of an ended worker is read, at most, for the
/// engine to close its end.
const LINGER: Duration = Duration::from_secs(60);

/// A worker this rank hosts, for rank 0's slot `remote`.
struct Hosted {
    remote: usize,
    /// Its slot in this rank's fork server (and status words).
    local: usize,
    pid: u32,
    /// Our end of its stream, once it is up.
    conn: Option<Conn>,
    /// Where rank 0 listens for its stream (none: it goes over MPI).
    dial: Option<Dial>,
    /// The TCP stream to rank 0's engine, if it connected. The worker
    /// adopted it (an ADOPT frame) and reads its tasks from it; this rank
    /// writes the worker's results on it, batched as they come from the
    /// worker's socket, and never reads it while the worker lives. The
    /// stream outlives the worker: what the worker wrote before it died
    /// still goes out, and then the rank shuts it.
    up: Option<Conn>,
    /// Bytes from rank 0 not yet whole frames (streams over MPI).
    inbuf: Vec<u8>,
    /// Rank 0 said end-of-file (over MPI): shut our write side once all
    /// is out.
    eof: bool,
    shut: bool,
    /// The worker's stream reached end-of-file.
    drained: bool,
    /// The timeouts of the tasks relayed to it: (task, ns).
    timeouts: VecDeque<(u64, u64)>,
    /// Tasks to skip (cancelled before they started), beyond the one in
    /// its skip word.
    skips: std::collections::BTreeSet<u64>,
    /// The task this rank had it killed for (past its timeout).
    timed_out: u64,
    /// Its fork server reported its end: the wait status.
    ended: Option<i32>,
}

/// How a worker rank's service ended.
pub(super) enum Finish {
    /// Rank 0 said STOP; `finalize`: every rank is live, so MPI may be
    /// finalised.
    Stopped { finalize: bool },
    /// Rank 0 was silent past the rank timeout, or fenced this rank off.
    Orphaned,
}

pub(super) struct WorkerRank<'c> {
    link: Link<'c>,
    server: Local,
    words: Arc<SharedWords>,
    free: Vec<usize>,
    hosted: Vec<Hosted>,
    events: Vec<Event>,
    msg: Vec<u8>,
    /// Rank 0 is gone for this rank: a message to it did not go out within
    /// the rank timeout, or it said FENCE.
    orphaned: bool,
    /// A connection to rank 0 failed: later workers' streams go over MPI.
    tcp_failed: bool,
    /// The TCP streams of workers that ended, read (and what comes thrown
    /// away) until the engine closes its end, so that closing ours resets
    /// nothing; each until a deadline.
    lingering: Vec<(OwnedFd, Instant)>,
}

impl<'c> WorkerRank<'c> {
    /// A rank whose fork server (`server`, with `words`) may host `cap`
    /// workers at once.
    pub(super) fn new(link: Link<'c>, server: Local, words: Arc<SharedWords>, cap: usize) -> Self {
        WorkerRank {
            link,
            server,
            words,
            // A replacement may start before the worker it replaces is gone.
            free: (0..2 * cap).rev().collect(),
            hosted: Vec::new(),
            events: Vec::new(),
            msg: Vec::new(),
            orphaned: false,
            tcp_failed: false,
            lingering: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> Finish {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut polled = PollSet::default();
        let mut last_look = Instant::now();
        loop {
            // While every stream is a socket, MPI carries only control
            // messages: looking at it (which costs a progress call of the
            // MPI library) on every turn would only slow the streams.
            let mut active = false;
            if self.relaying() || last_look.elapsed() >= CONTROL_LOOK {
                last_look = Instant::now();
                active = self.link.pump();
            }
            let mut finish = None;
            while let Some((from, msg)) = self.link.inbox.pop_front() {
                if from == 0 {
                    active = true;
                    finish = finish.or(self.on_message(&msg));
                }
            }
            if let Some(finish) = finish.or_else(|| self.root_lost()) {
                return self.finish(finish);
            }
            active |= self.server_events();
            for i in (0..self.hosted.len()).rev() {
                active |= self.serve(i);
            }
            self.check_timeouts();
            self.advance_skips();
            if active {
                idle.reset();
                continue;
            }
            polled.clear();
            if let Some((fd, write)) = self.server.poll_fd() {
                polled.push(fd, true, write);
            }
            for h in &self.hosted {
                if let Some(c) = h.conn.as_ref().filter(|_| !h.drained) {
                    polled.push(c.raw(), true, c.has_pending());
                }
                if let Some(up) = h.up.as_ref().filter(|u| u.has_pending()) {
                    polled.push(up.raw(), false, true);
                }
            }
            for (fd, _) in &self.lingering {
                polled.push(fd.as_raw_fd(), true, false);
            }
            if self.relaying() {
                idle.wait(&mut polled);
            } else {
                // Tasks go from the engine to the workers with no hop
                // through this thread, and results wake it on their
                // sockets (after a short spin): MPI, which has only control
                // messages now, is looked at every millisecond.
                let spin = crate::proto::idle::remote_spin_budget();
                let _ = crate::proto::idle::spin_for(spin, || polled.poll(0).is_ok_and(|n| n > 0))
                    || polled.poll(1).is_ok();
            }
            self.linger();
        }
    }

    /// Says "I live" to rank 0 when it is time. `Orphaned` if rank 0 is
    /// gone for this rank.
    fn root_lost(&mut self) -> Option<Finish> {
        self.link.beat();
        self.orphaned |= !self.link.take_stuck().is_empty();
        if self.orphaned || self.link.peers.silent().is_some() {
            return Some(Finish::Orphaned);
        }
        None
    }

    /// Ends the service: closing the server's socket makes it kill and
    /// reap every worker, then exit. A STOP is acknowledged.
    fn finish(mut self, finish: Finish) -> Finish {
        let rank = self.link.comm.rank();
        let _ = Box::new(self.server).wait();
        match finish {
            Finish::Stopped { .. } => {
                self.link.post(0, &[M_STOP_ACK]);
                self.link.flush(self.link.peers.timeout());
            }
            Finish::Orphaned => {
                // Said once its workers are gone, and without waiting: on a
                // host cut off from the job, the launcher's daemon may no
                // longer take this rank's output.
                let msg = format!(
                    "procpool: MPI rank {rank} lost rank 0 (silent for {:?}, or it counted this \
                     rank as lost); it ended its workers and exits\n",
                    self.link.peers.timeout()
                );
                let _ = sys::set_nonblocking_raw(2);
                let _ = sys::write(2, msg.as_bytes());
            }
        }
        finish
    }

    /// Whether a worker's stream goes over MPI (so MPI must be polled
    /// eagerly).
    fn relaying(&self) -> bool {
        self.hosted
            .iter()
            .any(|h| h.up.is_none() && h.conn.is_some())
    }

    /// Reads the TCP streams of ended workers until the engine closes its
    /// end (or their deadline passes), throwing the bytes away.
    fn linger(&mut self) {
        if self.lingering.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut scratch = [0u8; 16 << 10];
        self.lingering.retain(|(fd, until)| {
            loop {
                match sys::read(fd.as_raw_fd(), &mut scratch) {
                    Ok(0) => return false,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return *until > now,
                    Err(_) => return false,
                }
            }
        });
    }

    /// Sends a control message to rank 0, without waiting (a message it
    /// does not take within the rank timeout orphans this rank).
    fn tell(&mut self, msg: &[u8]) {
        self.link.post(0, msg);
    }

    fn find(&self, remote: usize) -> Option<usize> {
        self.hosted.iter().position(|h| h.remote == remote)
    }

    /// One message from rank 0; returns how the service ends, if it does.
    fn on_message(&mut self, msg: &[u8]) -> Option<Finish> {
        let kind = *msg.first()?;
        match kind {
            M_STOP => {
                let finalize = msg.get(1) == Some(&FINALIZE);
                return Some(Finish::Stopped { finalize });
            }
            M_FENCE => return Some(Finish::Orphaned),
            _ => {}
        }
        let remote = slot_of(msg)?;
        match kind {
            M_START => self.start(remote, Dial::decode(&msg[5..])),
            M_DATA => {
                if let Some(i) = self.find(remote) {
                    self.relay(i, &msg[5..]);
                }
            }
            M_EOF => {
                if let Some(i) = self.find(remote) {
                    self.hosted[i].eof = true;
                }
            }
            M_SKIP => {
                if let Some(i) = self.find(remote) {
                    let task = u64_at(msg, 5).unwrap_or(0);
                    self.hosted[i].skips.insert(task);
                    self.advance_skips();
                }
            }
            M_TIMEOUT => {
                let (task, ns) = (u64_at(msg, 5).unwrap_or(0), u64_at(msg, 13).unwrap_or(0));
                if let Some(i) = self.find(remote) {
                    self.hosted[i].timeouts.push_back((task, ns));
                }
            }
            M_KILL => {
                let task = u64_at(msg, 5).unwrap_or(0);
                if let Some(h) = self.find(remote).map(|i| &self.hosted[i]) {
                    let (local, pid) = (h.local, h.pid);
                    self.server.kill(local, pid, task);
                }
            }
            _ => {}
        }
        None
    }

    fn start(&mut self, remote: usize, dial: Option<Dial>) {
        let Some(local) = self.free.pop() else {
            let mut m = header(M_START_FAILED, remote);
            m.extend_from_slice(b"this rank hosts as many workers as it may");
            self.tell(&m);
            return;
        };
        self.hosted.push(Hosted {
            remote,
            local,
            pid: 0,
            conn: None,
            dial,
            up: None,
            inbuf: Vec::new(),
            eof: false,
            shut: false,
            drained: false,
            timeouts: VecDeque::new(),
            skips: std::collections::BTreeSet::new(),
            timed_out: 0,
            ended: None,
        });
        self.server.start(local);
    }

    /// Writes the whole frames that came from rank 0 (over MPI) before the
    /// worker was up.
    fn relay_tasks(&mut self, i: usize) {
        let h = &mut self.hosted[i];
        let inbuf = std::mem::take(&mut h.inbuf);
        self.relay(i, &inbuf);
    }

    /// Relays `bytes` from rank 0 after what waits: whole frames straight
    /// from `bytes` when nothing waits (no copy), else appended to what
    /// waits and passed from there; a partial frame is kept for later.
    /// Before the worker is up, everything waits.
    fn relay(&mut self, i: usize, bytes: &[u8]) {
        let h = &mut self.hosted[i];
        let Some(conn) = h.conn.as_mut() else {
            h.inbuf.extend_from_slice(bytes);
            return;
        };
        if h.inbuf.is_empty() {
            let pos = pass_frames(bytes, conn);
            h.inbuf.extend_from_slice(&bytes[pos..]);
        } else {
            // Each piece of a large frame is copied once, not once per
            // piece that follows it.
            h.inbuf.extend_from_slice(bytes);
            let pos = pass_frames(&h.inbuf, conn);
            h.inbuf.drain(..pos);
        }
    }

    /// What this rank's fork server reported. Returns whether it said
    /// anything.
    fn server_events(&mut self) -> bool {
        self.server.flush();
        self.server.events(&mut self.events);
        let any = !self.events.is_empty();
        for e in std::mem::take(&mut self.events) {
            self.on_event(e);
        }
        any
    }

    fn on_event(&mut self, e: Event) {
        let by_local =
            |hosted: &[Hosted], local: usize| hosted.iter().position(|h| h.local == local);
        match e {
            Event::Started {
                slot, pid, conn, ..
            } => {
                if let Some(i) = by_local(&self.hosted, slot) {
                    let h = &mut self.hosted[i];
                    h.pid = pid;
                    h.conn = Some(Conn::new(conn, Vec::new()));
                    // Rank 0 hands the engine the TCP stream, or the relay,
                    // as this message says.
                    let over_tcp = self.connect(i);
                    let mut m = header(M_STARTED, self.hosted[i].remote);
                    m.extend_from_slice(&pid.to_le_bytes());
                    m.push(if over_tcp { STREAM_TCP } else { 0 });
                    self.tell(&m);
                    self.relay_tasks(i);
                }
            }
            Event::StartFailed { slot, cause } => {
                if let Some(i) = by_local(&self.hosted, slot) {
                    let h = self.hosted.swap_remove(i);
                    self.free.push(h.local);
                    let mut m = header(M_START_FAILED, h.remote);
                    m.extend_from_slice(cause.as_bytes());
                    self.tell(&m);
                }
            }
            Event::KillRefused { slot, task } => {
                if let Some(i) = by_local(&self.hosted, slot) {
                    let h = &mut self.hosted[i];
                    if h.timed_out == task {
                        // The task finished before its timeout's kill.
                        h.timed_out = 0;
                    } else {
                        let mut m = header(M_KILL_REFUSED, h.remote);
                        m.extend_from_slice(&task.to_le_bytes());
                        self.tell(&m);
                    }
                }
            }
            Event::Ended { slot, end } => {
                if let Some(i) = by_local(&self.hosted, slot) {
                    self.hosted[i].ended = Some(match end {
                        End::Exited(s) => s.into_raw(),
                        _ => SERVER_LOST,
                    });
                }
            }
            Event::Gone => {
                // The server is gone, and its workers with it (they die
                // with it); no wait status will come.
                for h in self.hosted.iter_mut() {
                    h.ended.get_or_insert(SERVER_LOST);
                    h.drained = true;
                }
            }
            Event::TimedOut { .. } | Event::RankLost { .. } => {}
        }
    }

    /// Connects worker `i`'s stream to rank 0 over TCP, if rank 0 said
    /// where and no connection of this rank has failed yet. Returns whether
    /// it did.
    fn connect(&mut self, i: usize) -> bool {
        let h = &mut self.hosted[i];
        let Some(dial) = h.dial.as_ref().filter(|_| !self.tcp_failed) else {
            return false;
        };
        match tcp::connect(dial, h.remote, self.link.comm.rank() as usize, h.pid) {
            Ok(s) => {
                // The worker takes the stream over: ADOPT, with the fd.
                if let Some(conn) = h.conn.as_mut() {
                    let at = conn.out().len();
                    conn.attach_fd(wire::fd_offset(at, 0), s.as_raw_fd());
                    Header::new(wire::ADOPT, 0).push(conn.out());
                    conn.flush();
                }
                h.up = Some(Conn::shared(s));
                true
            }
            Err(e) => {
                eprintln!(
                    "procpool: MPI rank {} cannot connect to rank 0 ({e}); its workers' \
                     streams go over MPI",
                    self.link.comm.rank()
                );
                self.tcp_failed = true;
                false
            }
        }
    }

    /// Moves worker `i`'s output to rank 0 (over MPI; or, on a TCP stream,
    /// what it wrote before it adopted it: READY, say) and flushes tasks to
    /// it; once it has ended and its output is all out, shuts its TCP
    /// stream and reports its end. Returns whether anything happened.
    fn serve(&mut self, i: usize) -> bool {
        let remote = self.hosted[i].remote;
        let mut active = false;
        let h = &mut self.hosted[i];
        if let Some(conn) = h.conn.as_mut() {
            let (flushed, moved) = conn.flush_some();
            active |= moved;
            if flushed != Flushed::Pending && h.eof && !h.shut {
                conn.shutdown_write();
                h.shut = true;
            }
            if !h.drained {
                let (got, eof) = read_some(conn);
                h.drained = eof;
                active |= got || eof;
                match h.up.as_mut() {
                    Some(up) => results(conn, up.out(), |_| {}),
                    None => {
                        let (link, msg) = (&mut self.link, &mut self.msg);
                        msg.clear();
                        msg.extend_from_slice(&header(M_DATA, remote));
                        let mut sent = true;
                        results(conn, msg, |m| sent &= link.send_data(0, m));
                        sent &= link.send_data(0, msg);
                        self.orphaned |= !sent;
                    }
                }
            }
        }
        let h = &mut self.hosted[i];
        let flushed = match h.up.as_mut() {
            Some(up) => {
                let (flushed, moved) = up.flush_some();
                active |= moved;
                flushed != Flushed::Pending
            }
            None => true,
        };
        if h.ended.is_some() && (h.drained || h.conn.is_none()) && flushed {
            let h = self.hosted.swap_remove(i);
            self.free.push(h.local);
            let status = h.ended.unwrap_or(SERVER_LOST);
            let started = self.words.status(h.local).started.load(Ordering::SeqCst);
            let mut m = header(M_ENDED, remote);
            m.extend_from_slice(&(status as u32).to_le_bytes());
            m.extend_from_slice(&started.to_le_bytes());
            m.extend_from_slice(&h.timed_out.to_le_bytes());
            // ENDED first: rank 0 takes a stream shut before it as a sign
            // that this rank died.
            self.tell(&m);
            if let Some(up) = h.up {
                // After the worker's last bytes: rank 0 reports its end
                // once this arrives. Then read until the engine closes.
                up.shutdown_write();
                let fd = up.into_fd();
                let _ = sys::set_nonblocking(&fd);
                self.lingering.push((fd, Instant::now() + LINGER));
            }
            active = true;
        }
        active
    }

    /// Moves each worker's skip word on to the next task to skip, once the
    /// worker is past the one it holds (it finished it, skipped or not, or
    /// started a later one: before that, it may be just reading the word).
    fn advance_skips(&mut self) {
        for h in self.hosted.iter_mut().filter(|h| !h.skips.is_empty()) {
            let st = self.words.status(h.local);
            let started = st.started.load(Ordering::SeqCst);
            let current = st.skip.load(Ordering::SeqCst);
            let past =
                current == 0 || current < started || st.finished.load(Ordering::SeqCst) >= current;
            // Those it has reached are running or done: a kill covers them.
            h.skips.retain(|&t| t > started);
            if past && let Some(next) = h.skips.pop_first() {
                st.skip.store(next, Ordering::SeqCst);
            }
        }
    }

    /// Kills a worker whose task ran past its timeout, counted from the
    /// start its status words recorded, on this host's clock.
    fn check_timeouts(&mut self) {
        let now = sys::monotonic_ns();
        for h in self.hosted.iter_mut() {
            if h.timed_out != 0 || h.timeouts.is_empty() {
                continue;
            }
            let st = self.words.status(h.local);
            let started = st.started.load(Ordering::SeqCst);
            // Timeouts of tasks that have finished are done with.
            while h.timeouts.front().is_some_and(|&(seq, _)| seq < started) {
                h.timeouts.pop_front();
            }
            let Some(&(seq, ns)) = h.timeouts.front() else {
                continue;
            };
            if seq != started || !st.running(seq) {
                continue;
            }
            let ran = now.saturating_sub(st.start_ns.load(Ordering::SeqCst));
            if ran >= ns {
                log::warn!(
                    "procpool: task {seq} of worker {} ran past its timeout; killing it",
                    h.pid
                );
                h.timed_out = seq;
                self.server.kill(h.local, h.pid, seq);
            }
        }
    }
}

/// Writes the whole frames at the start of `bytes` from rank 0 to the
/// worker's `conn`, in one write. Returns how many bytes they took.
fn pass_frames(bytes: &[u8], conn: &mut Conn) -> usize {
    let mut pos = 0;
    while let Some(f) = Frame::parse(bytes, pos) {
        pos = f.end;
    }
    if pos > 0 {
        conn.write(&bytes[..pos]);
    }
    pos
}

/// Appends the whole frames that `conn` has read to `out` (a result in a
/// block with its bytes inline), calling `full` whenever `out` holds a
/// message's worth; consumes them.
fn results(conn: &mut Conn, out: &mut Vec<u8>, mut full: impl FnMut(&mut Vec<u8>)) {
    let mut pos = 0;
    while let Some(f) = Frame::parse(&conn.inbuf, pos) {
        let done_in_block = f.header.kind == wire::DONE
            && matches!(
                f.header.result_at(),
                ResultAt::NewBlock | ResultAt::InputBlock
            );
        if done_in_block {
            inline_result(f.header, f.body(&conn.inbuf), &mut conn.in_fds, out);
        } else {
            out.extend_from_slice(&conn.inbuf[f.at..f.end]);
        }
        pos = f.end;
        if out.len() >= CHUNK {
            full(out);
        }
    }
    conn.consume(pos);
}

/// Appends a DONE frame whose output was in a block as a frame with the
/// output inline (or, if the block cannot be read, an encode error).
fn inline_result(h: Header, body: &[u8], fds: &mut VecDeque<OwnedFd>, msg: &mut Vec<u8>) {
    let len = block_len(body).unwrap_or(0);
    // This rank never sends an input block to its worker, so the output can
    // only be in a new block (OUT_SAME_BLOCK would be a bug).
    let block = if h.result_at() == ResultAt::NewBlock {
        map_block(fds.pop_front(), len)
    } else {
        Err("it named an input block that the worker was not given".into())
    };
    let mut nh = Header::done(h.seq);
    nh.set_run_time_ns(h.run_time_ns());
    match block {
        Ok(b) => {
            let frame = nh.open(msg);
            msg.extend_from_slice(b.bytes(len));
            frame.close(msg, h.status);
        }
        Err(e) => {
            nh.push_message(
                msg,
                code::ENCODE,
                &format!("a result could not be read: {e}"),
            );
        }
    }
}
