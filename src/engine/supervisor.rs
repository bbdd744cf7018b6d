//! The supervisor thread: it polls every worker's socket, the backend and
//! an eventfd (callers' wake-ups); reads results without ever waiting
//! behind a write (every parent-side socket is non-blocking, and unsent
//! bytes wait in the worker's connection until it is writable); hears the
//! backend's events (a worker started, could not start, ended); enforces
//! timeouts, pending cancels and the sandbox's CPU cap; replaces workers;
//! and winds the pool down.

use crate::engine::core::{Engine, State};
use crate::engine::events;
use crate::engine::job::Completion;
use crate::engine::lifecycle::Phase;
use crate::engine::seam::{Backend, Event};
use crate::engine::watch;
use crate::engine::worker::READ_BUDGET;
use crate::error::Error;
use crate::proto::task;
use crate::sys::{self, PollSet};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The supervisor thread. A panic in it (a bug) fails every outstanding
/// task and kills the workers rather than leave callers waiting forever.
pub(crate) fn run(engine: Arc<Engine>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(&engine)));
    if let Err(p) = outcome {
        let reason = format!(
            "the pool's supervisor thread panicked: {}",
            task::panic_message(&*p)
        );
        log::error!("procpool: {reason}");
        let e = Error::Broken { reason };
        engine.lock().broken = Some(e.clone());
        engine.abandon(e);
    }
}

/// What the poll set holds, besides the workers' sockets from `workers_at`.
struct Polled {
    set: PollSet,
    backend: Option<usize>,
    workers_at: usize,
    /// The slot of each worker socket, in poll order.
    who: Vec<usize>,
}

/// How the pool ends, once the loop sees it has.
enum Shutdown {
    /// It finished (closed and drained, or terminated): wait for the backend.
    Finished(Option<Box<dyn Backend>>),
    /// The backend ended on its own: the pool is broken.
    Lost(Option<Box<dyn Backend>>),
}

fn run_loop(engine: &Engine) {
    let cpu_watch = engine
        .cfg
        .sandbox
        .as_ref()
        .and_then(|l| l.cpu_per_task)
        .map(watch::cpu_interval);
    let mut polled = Polled {
        set: PollSet::default(),
        backend: None,
        workers_at: 0,
        who: Vec::new(),
    };
    let mut events = Vec::new();
    loop {
        let timeout_ms = {
            let st = engine.lock();
            if st.finished {
                break;
            }
            prepare_poll(engine, &st, &mut polled, cpu_watch)
        };
        wait(&mut polled.set, timeout_ms, engine.cfg.spin);
        let mut done: Vec<Completion> = Vec::new();
        let ending = {
            let mut guard = engine.lock();
            handle_io(engine, &mut guard, &polled, &mut events, &mut done);
            after_io(engine, &mut guard, &mut done)
        };
        engine.run_completions(done);
        match ending {
            None => {}
            Some(Shutdown::Finished(b)) => {
                if let Some(b) = b {
                    b.wait();
                }
                engine.cv.notify_all();
                break;
            }
            Some(Shutdown::Lost(b)) => {
                let reason = match b {
                    Some(b) => b.wait(),
                    None => "the fork server exited".into(),
                };
                backend_lost(engine, reason);
                break;
            }
        }
    }
}

/// Fills the poll set; returns how long the poll may sleep (ms, -1: until
/// something happens): until the nearest deadline, pending-cancel check or
/// retry of a failed start.
fn prepare_poll(engine: &Engine, st: &State, p: &mut Polled, cpu_watch: Option<Duration>) -> i32 {
    p.set.clear();
    p.who.clear();
    p.set.push(engine.wake.as_raw_fd(), true, false);
    p.backend = st
        .backend
        .as_ref()
        .and_then(|b| b.poll_fd())
        .map(|(fd, write)| p.set.push(fd, true, write));
    p.workers_at = p.set.len();
    let now = Instant::now();
    let mut next = st.starts.retry_at;
    let mut soonest = |d: Instant| next = Some(next.map_or(d, |n: Instant| n.min(d)));
    for w in st.workers.iter() {
        let (read, write) = (!w.eof(), w.has_pending());
        // A socket polled for nothing would still wake the poll on a
        // hang-up, again and again.
        if read || write {
            p.set.push(w.raw_fd(), read, write);
            p.who.push(w.slot());
        }
        if w.kill().is_some() {
            continue;
        }
        if let Some(d) = w.deadline() {
            soonest(d);
        }
        if w.has_cancels() {
            soonest(now + watch::RECHECK);
        }
        if let Some(d) = w.cpu().next() {
            soonest(d);
        }
    }
    if let Some(every) = cpu_watch {
        // A task sent by a caller is not announced to this thread (that
        // would cost a wake-up per task): under a CPU cap it looks at least
        // this often, so it sees every task within a fraction of the cap.
        soonest(now + every);
    }
    match next {
        None => -1,
        Some(d) if d <= now => 0,
        Some(d) => ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32,
    }
}

/// Polls without sleeping for a moment first (results often follow within
/// microseconds, and waking from sleep costs more), then sleeps.
fn wait(set: &mut PollSet, timeout_ms: i32, spin: std::time::Duration) {
    let mut n = 0;
    if timeout_ms != 0 {
        crate::proto::idle::spin_for(spin, || {
            n = set.poll(0).unwrap_or(0);
            n > 0
        });
    }
    if n == 0 && set.poll(timeout_ms).is_err() {
        std::thread::yield_now();
    }
}

/// Reads the workers that have something, flushes those that can take
/// more, and hears the backend.
fn handle_io(
    engine: &Engine,
    st: &mut State,
    p: &Polled,
    events: &mut Vec<Event>,
    done: &mut Vec<Completion>,
) {
    if p.set.ready(0) {
        sys::drain(engine.wake.as_raw_fd());
    }
    let ready_before = st.ready;
    for (k, &slot) in p.who.iter().enumerate() {
        let i = p.workers_at + k;
        if !p.set.ready(i) {
            continue;
        }
        let Some(w) = st.workers.iter_mut().find(|w| w.slot() == slot) else {
            continue;
        };
        if p.set.writable(i) {
            w.flush();
        }
        if p.set.readable(i) {
            let before = done.len();
            w.read(
                &mut st.ready,
                &mut st.est,
                &engine.blocks,
                done,
                READ_BUDGET,
            );
            with_last_words(st.backend.as_mut(), slot, &mut done[before..]);
        }
    }
    if st.ready != ready_before {
        st.unready_deaths = 0;
        engine.cv.notify_all();
    }
    if let Some(i) = p.backend
        && let Some(b) = st.backend.as_mut()
    {
        if p.set.writable(i) {
            b.flush();
        }
        if p.set.ready(i) {
            b.events(events);
        }
    }
    for e in events.drain(..) {
        events::on_event(engine, st, e, done);
    }
}

/// What the loop does once the I/O is handled: retries, clocks, kills, and
/// the lifecycle. Returns how the pool ends, if it does now.
fn after_io(engine: &Engine, st: &mut State, done: &mut Vec<Completion>) -> Option<Shutdown> {
    if st.backend_lost {
        return Some(Shutdown::Lost(st.backend.take()));
    }
    if st.starts.take_due(Instant::now())
        && st.phase.wants_workers(st.queue.is_empty())
        && st.broken.is_none()
    {
        st.make_up_workers(&engine.cfg, done);
    }
    if let Some(limits) = &engine.cfg.sandbox {
        retire_sandboxed(st, limits);
    }
    watch::check_clocks(st, &*engine.progress, engine.cfg.sandbox.is_some());
    if let Some(cap) = engine.cfg.sandbox.as_ref().and_then(|l| l.cpu_per_task) {
        watch::check_cpu(st, &*engine.progress, cap);
    }
    st.send_kills();
    let finished = match st.phase {
        Phase::Terminated => {
            st.fail_all(Error::Terminated, done);
            st.workers.clear();
            st.spawning.clear();
            true
        }
        Phase::Closed => {
            if st.phase.retire_idle(st.queue.is_empty()) {
                for w in st.workers.iter_mut() {
                    if w.ready() && !w.retiring() && w.in_flight().is_empty() {
                        w.retire();
                    }
                }
                if let Some(limits) = &engine.cfg.sandbox {
                    retire_sandboxed(st, limits);
                    st.send_kills();
                }
            }
            let no_workers = st.workers.is_empty() && st.spawning.is_empty();
            st.phase.drained(st.queue.is_empty(), no_workers)
        }
        Phase::Running => false,
    };
    if finished {
        st.finished = true;
        return Some(Shutdown::Finished(st.backend.take()));
    }
    st.dispatch(&engine.cfg, false);
    // Dispatch may have marked a worker for a kill (a reused sandboxed
    // worker found busy while idle).
    st.send_kills();
    None
}

/// A sandboxed worker is killed once its last task is answered, never
/// asked to exit (its task owns it and could keep it running); one that
/// may run more tasks is killed once it ends a task with threads left
/// over, before its next task.
fn retire_sandboxed(st: &mut State, limits: &crate::sandbox::Limits) {
    for w in st.workers.iter_mut() {
        if !w.ready() || w.kill().is_some() || !w.in_flight().is_empty() {
            continue;
        }
        let pid = w.pid();
        let leftover =
            || limits.tasks_per_worker > 1 && crate::sys::thread_count(pid).is_none_or(|n| n > 1);
        let fresh = w.answered_since_idle_check();
        // A worker that shut its side of the socket (after forging its own
        // answer, say) is not waited for either.
        if w.retiring() || w.eof() || (fresh && leftover()) {
            w.retire_now();
        }
    }
}

/// Gives the worker's crash report to the outcomes just read from it
/// that fail in a way it belongs to (a panic), asking the backend for it
/// only if there is one.
fn with_last_words(backend: Option<&mut Box<dyn Backend>>, slot: usize, done: &mut [Completion]) {
    let wants = |c: &Completion| matches!(&c.outcome, Err(e) if e.wants_last_words());
    if !done.iter().any(wants) {
        return;
    }
    let words = backend.and_then(|b| b.last_words(slot));
    for c in done.iter_mut() {
        if let Err(e) = &mut c.outcome {
            e.add_last_words(words.as_ref());
        }
    }
}

/// The backend ended on its own (its server killed from outside, say): the
/// pool is broken. Every outstanding task fails with the error that says
/// why, and so do later submissions and `join`.
fn backend_lost(engine: &Engine, reason: String) {
    log::error!("procpool: {reason}; the pool is broken");
    let mut done = Vec::new();
    {
        let mut st = engine.lock();
        // What broke it first, if something did (the server could not
        // start, say), says more than its exit.
        let e = st.broken.get_or_insert(Error::Broken { reason }).clone();
        st.fail_all(e, &mut done);
        st.workers.clear();
        st.spawning.clear();
        st.phase = Phase::Terminated;
        st.finished = true;
    }
    engine.cv.notify_all();
    engine.run_completions(done);
}
