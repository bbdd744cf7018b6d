//! What the supervisor does with the backend's events: a worker started,
//! could not be started (and the retry policy, `lifecycle::Starts`), or
//! ended (its last output read, the ledger's verdict on its tasks, the
//! initializer's blame, its replacement).

use crate::engine::completion::all_lost;
use crate::engine::core::{Engine, State};
use crate::engine::job::{Completion, KillReason};
use crate::engine::ledger::{self, Facts, Unready};
use crate::engine::lifecycle::Retry;
use crate::engine::seam::{End, Event};
use crate::engine::stats::EndFacts;
use crate::engine::worker::Worker;
use crate::error::Error;
use std::time::Instant;

/// One event from the backend.
pub(crate) fn on_event(engine: &Engine, st: &mut State, e: Event, done: &mut Vec<Completion>) {
    match e {
        Event::Started {
            slot,
            pid,
            rank,
            conn,
        } => {
            if let Some(i) = st.spawning.iter().position(|s| s.0 == slot) {
                done.append(&mut st.spawning.swap_remove(i).1);
            }
            st.starts.succeeded();
            st.tally.workers_started += 1;
            log::debug!("procpool: worker {pid} started");
            st.workers
                .push(Worker::new(slot, pid, rank, conn, &engine.cfg));
            // Started for a pool that has shrunk since: retired at once.
            st.trim(engine.cfg.sandbox.is_some());
        }
        Event::StartFailed { slot, cause } => {
            if let Some(i) = st.spawning.iter().position(|s| s.0 == slot) {
                let (slot, mut held) = st.spawning.swap_remove(i);
                st.free_slots.push(slot);
                done.append(&mut held);
            }
            start_failed(engine, st, cause, done);
        }
        Event::KillRefused { slot, task } => {
            // The cancelled task had finished before the kill: the worker
            // goes on.
            if let Some(w) = st.workers.iter_mut().find(|w| w.slot() == slot) {
                w.kill_refused(task);
            }
        }
        Event::TimedOut { slot, task } => {
            // Its backend killed it for the task's timeout: that task fails
            // with `Timeout` when its end is reported.
            if let Some(w) = st.workers.iter_mut().find(|w| w.slot() == slot) {
                let timed = w.in_flight().iter().find(|f| f.seq == task);
                if let Some((id, Some(timeout))) = timed.map(|f| (f.job.id, f.job.timeout)) {
                    w.killed_by_backend(KillReason::Timeout { id, timeout });
                }
            }
        }
        Event::Ended { slot, end } => ended(engine, st, slot, end, done),
        Event::RankLost {
            rank,
            host,
            why,
            capacity,
        } => rank_lost(engine, st, (rank, host, why), capacity),
        Event::Gone => st.backend_lost = true,
    }
}

/// An MPI rank was lost as a whole: the pool shrinks to what the other
/// ranks can host (its workers' ends follow, and settle their tasks), or
/// breaks if no rank is left.
fn rank_lost(engine: &Engine, st: &mut State, lost: (usize, &str, String), capacity: usize) {
    let (rank, host, why) = lost;
    st.size = st.size.min(capacity);
    log::warn!(
        "procpool: MPI rank {rank} on {host} was lost ({why}); the tasks it held fail with \
         Error::RankLost, or run again elsewhere if they have retries; the pool goes on with \
         {} worker(s)",
        st.size
    );
    if capacity == 0 && st.broken.is_none() {
        st.broken = Some(Error::Broken {
            reason: format!(
                "every worker rank of the MPI pool was lost (the last: rank {rank} on {host}, {why})"
            ),
        });
        engine.cv.notify_all();
    }
}

/// A worker could not be started (the backend could not fork it or make
/// its socket, or its socket could not be received here): out of fds, out
/// of processes, out of memory. The slot is free again and the outcomes
/// held for it are released.
///
/// While the pool is being built, `build()` fails with this error (and
/// the pool, dropped, kills and reaps what was started). Later, the pool
/// tries again after a delay that doubles each time, up to
/// `lifecycle::START_RETRIES` times in a row (a successful start resets
/// the count); then, if no worker is left, the pool is broken: every queued
/// task fails with this error, and so do later submissions. With workers
/// left it goes on with fewer, and tries again when the next one exits.
fn start_failed(engine: &Engine, st: &mut State, cause: String, done: &mut Vec<Completion>) {
    log::warn!("procpool: could not start a worker: {cause}");
    if st.building {
        let e = Error::Broken {
            reason: format!(
                "could not start all {} workers ({} started): {cause}",
                engine.cfg.processes,
                st.workers.len()
            ),
        };
        st.init_error.get_or_insert(e.clone());
        st.broken.get_or_insert(e);
        engine.cv.notify_all();
        return;
    }
    if st.starts.failed(Instant::now()) == Retry::Later {
        return;
    }
    if st.workers.is_empty() && st.spawning.is_empty() {
        st.broken = Some(Error::Broken {
            reason: format!(
                "no worker is left and {} attempts in a row to start one failed: {cause}",
                st.starts.failures
            ),
        });
        fail_if_no_workers(st, done);
        engine.cv.notify_all();
    }
}

fn fail_if_no_workers(st: &mut State, done: &mut Vec<Completion>) {
    if let Some(e) = st.broken.clone()
        && st.workers.is_empty()
        && st.spawning.is_empty()
    {
        for j in st.queue.drain(..) {
            done.push(Completion::new(j.slot, j.hook, Err(e.clone())));
        }
    }
}

/// The worker in `slot` ended: everything it wrote before it ended is in
/// its socket, so that is read first; then its tasks are settled.
fn ended(engine: &Engine, st: &mut State, slot: usize, end: End, done: &mut Vec<Completion>) {
    let Some(i) = st.workers.iter().position(|w| w.slot() == slot) else {
        return;
    };
    let mut w = st.workers.swap_remove(i);
    let before = done.len();
    w.read(&mut st.ready, &mut st.est, &engine.blocks, done, usize::MAX);
    // Its crash report, read once its end was reported: for its last
    // panics and for the tasks its end fails.
    let words = st.backend.as_mut().and_then(|b| b.last_words(slot));
    for c in &mut done[before..] {
        if let Err(e) = &mut c.outcome {
            e.add_last_words(words.as_ref());
        }
    }
    worker_ended(engine, st, w, end, words, done);
}

/// A worker ended (and its last output was read): its tasks are settled
/// (the ledger), with its crash report if there is one, the initializer
/// perhaps blamed, and it is replaced.
fn worker_ended(
    engine: &Engine,
    st: &mut State,
    mut w: Worker,
    end: End,
    last_words: Option<std::sync::Arc<str>>,
    done: &mut Vec<Completion>,
) {
    let mut started = engine.progress.started(w.slot());
    if engine.cfg.sandbox.is_some() || matches!(end, End::RankLost { .. }) {
        // A sandboxed task owns its start word: whatever it says, the tasks
        // its worker held (one at a time) count as started, so that a task
        // cannot have itself run again, and again, by rewinding it. A lost
        // rank said nothing of how far its workers got: each task sent
        // there may have run, so each counts as started (it fails, or
        // spends a retry), and only tasks never sent stay queued.
        started = started.max(w.in_flight().iter().map(|f| f.seq).max().unwrap_or(0));
    }
    // A sandboxed worker that died of one of its limits.
    let limit = match (engine.cfg.sandbox.as_ref(), end.status()) {
        (Some(l), Some(status)) => l.cause(engine.progress.died_of(w.slot()), status),
        _ => None,
    };
    let held = w.take_held();
    if !ledger::lost_any(&held, started) && w.kill().is_none() {
        log::debug!("procpool: worker {} exited ({end})", w.pid());
    } else if w.kill().is_none() {
        log::warn!(
            "procpool: worker {} lost ({end}) with {} task(s) in flight",
            w.pid(),
            held.len()
        );
    }
    let facts = Facts {
        pid: w.pid(),
        rank: w.rank(),
        end,
        started,
        item: match engine.cfg.item_progress {
            true => engine.progress.item(w.slot()),
            false => 0,
        },
        kill: w.kill(),
        limit,
    };
    let verdict = ledger::settle(held, &facts);
    st.tally.retried += verdict.retried;
    let why = EndFacts {
        kill: w.kill(),
        limit: limit.is_some(),
        retiring: w.retiring(),
    };
    st.tally.worker_ended(why, w.slot(), w.busy_ns());
    for job in verdict.requeue.into_iter().rev() {
        st.queue.push_front(job);
    }
    let lost: Vec<Completion> = verdict
        .failed
        .into_iter()
        .map(|(j, mut e)| {
            e.add_last_words(last_words.as_ref());
            Completion::new(j.slot, j.hook, Err(e))
        })
        .chain(
            verdict
                .finished
                .into_iter()
                .map(|j| Completion::new(j.slot, j.hook, all_lost(j.lost))),
        )
        .collect();
    st.free_slots.push(w.slot());
    if !w.ready() {
        died_unready(engine, st, &mut w, end);
    }
    replace(engine, st, w.pid(), lost, done);
}

/// A worker died before it was ready: perhaps the initializer's fault
/// (`ledger::blames_initializer`); the pool then breaks.
fn died_unready(engine: &Engine, st: &mut State, w: &mut Worker, end: End) {
    st.unready_deaths += u32::from(engine.cfg.has_init);
    let u = Unready {
        has_init: engine.cfg.has_init,
        building: st.building,
        deaths: st.unready_deaths,
        said_so: w.said_why_start_failed(),
    };
    if !ledger::blames_initializer(&u) {
        return;
    }
    let (message, sandbox_failed) = w.take_start_failure();
    let message =
        message.unwrap_or_else(|| format!("worker {} died in its initializer ({end})", w.pid()));
    let e = if sandbox_failed {
        Error::Sandbox { reason: message }
    } else {
        Error::InitializerFailed { message }
    };
    if st.building {
        st.init_error = Some(e.clone());
    }
    st.broken = Some(e);
    engine.cv.notify_all();
}

/// Replaces an ended worker if the pool still wants one; `lost` (its
/// failed tasks' outcomes) wait for the replacement to exist. A retry of
/// failed starts that is due makes up the count then, not now: the delay
/// is the point.
fn replace(
    engine: &Engine,
    st: &mut State,
    pid: u32,
    lost: Vec<Completion>,
    done: &mut Vec<Completion>,
) {
    if st.phase.wants_workers(st.queue.is_empty())
        && st.broken.is_none()
        && st.starts.retry_at.is_none()
        && st.short_of_workers(&engine.cfg)
    {
        log::debug!("procpool: replacing worker {pid}");
        let back = st.request_spawn(lost);
        done.extend(back);
        // Also make up for starts that failed earlier.
        st.make_up_workers(&engine.cfg, done);
    } else {
        done.extend(lost);
        fail_if_no_workers(st, done);
    }
}
