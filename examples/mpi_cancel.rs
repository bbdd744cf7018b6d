//! `cancel()` on a task that runs on an MPI rank kills it there (feature
//! `mpi`): the result resolves `Cancelled`, the rank kills and replaces
//! the worker that ran it, and the pool goes on.
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_cancel
//! ```
//!
//! A task that would sleep 60 s first writes a marker (its rank, pid and
//! host) into a directory that rank 0 makes after `build()`, so rank 0
//! knows it runs and where. The ranks must share that filesystem (one
//! host, or the simulated hosts of `.ci/mpi-hosts.sh`); on a cluster with
//! node-local /tmp, point PROCPOOL_MARKER_DIR at a shared directory.
//! Then: one running task is cancelled, then one per worker at once, and a
//! finished task cannot be cancelled. Prints `mpi_cancel: ok`.
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::{AsyncResult, Error};
use ranks::*;
use std::time::{Duration, Instant};

/// How long a task may take to start, or a cancelled one to resolve.
const BOUND: Duration = Duration::from_secs(30);

/// Says where it runs (in the marker at `path`), then sleeps `ms`.
fn long_task((path, ms): (String, u64)) -> u64 {
    ranks::mark(&path);
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn double(x: u64) -> u64 {
    x * 2
}

/// Creates the file at `path`, if any, and returns at once. Without a
/// path it does nothing: microseconds, however loaded the machine, so
/// the pool learns that it is short and sends it to busy workers too.
fn touch(path: Option<String>) -> bool {
    path.is_none_or(|p| std::fs::File::create(p).is_ok())
}

/// Creates the file at `path`, if any, then sleeps `ms`: short by what
/// the pool learns of it (it is warmed up without a path and with 0 ms),
/// so that a worker that runs a long one is still sent short tasks.
fn pause((path, ms): (Option<String>, u64)) -> bool {
    let made = touch(path);
    std::thread::sleep(Duration::from_millis(ms));
    made
}

/// How many times the queued-cancel case sets itself up before it fails.
const QUEUED_TRIES: u32 = 3;

/// A task sent to a busy worker and cancelled before it starts never runs:
/// the worker's rank is told to skip it. See [`queue_behind`] for how a
/// task comes to wait behind another on its worker. The pool sends a
/// busy worker only tasks it has learnt are short; the warm-up makes sure
/// of that with tasks that do nothing. Should no task wait on a worker
/// all the same (the stats show the tasks still in the pool's queue), the
/// case is set up again, and after [`QUEUED_TRIES`] it fails: it never
/// passes without checking.
fn a_queued_task_never_runs(pool: &procpool::Pool, dir: &MarkerDir) -> Result<(), String> {
    let mut why = String::new();
    for t in 1..=QUEUED_TRIES {
        match queue_behind(pool, dir, t)? {
            Some(v) => {
                println!(
                    "a task cancelled while queued behind a running one on its worker never ran \
                     (task {v}, set-up {t} of {QUEUED_TRIES})"
                );
                return Ok(());
            }
            None => why = format!("set-up {t}: no task waited on a worker"),
        }
    }
    Err(format!(
        "after {QUEUED_TRIES} set-ups, no task waited behind a running one on its worker ({why})"
    ))
}

/// One try: every worker runs a `pause`, the last one started short, the
/// others 6 s, so that no worker is free before 40 `touch` tasks are
/// queued. When the short pause ends, the pool tops up every busy worker
/// with them. Once no more finish, those still pending wait behind a
/// pause on their worker, if the pool's queue is empty: one of them is
/// cancelled, and must not leave its file. Returns the cancelled task, or
/// None if the tasks did not go to the workers.
fn queue_behind(pool: &procpool::Pool, dir: &MarkerDir, t: u32) -> Result<Option<usize>, String> {
    // The pool learns that `touch` and `pause` are short (and forgets what
    // an earlier try's long pauses taught it).
    for _ in 0..60 {
        pool.apply(touch, None).map_err(|e| e.to_string())?;
        pool.apply(pause, (None, 0)).map_err(|e| e.to_string())?;
    }
    let n = pool.processes();
    // One at a time, each once the last runs: each goes to an idle worker
    // (a short task for a busy one could wait behind the last).
    let mut blockers = Vec::new();
    for i in 0..n {
        let ms = if i + 1 == n { 300 } else { 6_000 };
        let path = dir.file(&format!("block-{t}-{i}"));
        let r = pool
            .apply_async(pause, (Some(path.clone()), ms))
            .map_err(|e| e.to_string())?;
        blockers.push(r);
        wait_until(BOUND, "a pause runs", || {
            if std::path::Path::new(&path).exists() {
                Ok(())
            } else {
                Err(format!("{path} not made yet"))
            }
        })?;
    }
    let file = |i: usize| dir.file(&format!("queued-{t}-{i}"));
    let queued = (0..40)
        .map(|i| pool.apply_async(touch, Some(file(i))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    // Once the short pause has ended and no more results come, those still
    // pending wait behind a long pause, or in the pool's queue.
    if let Some(short) = blockers.pop() {
        short
            .get()
            .map_err(|e| format!("the short pause failed: {e}"))?;
    }
    let mut done = usize::MAX;
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
        let now = queued.iter().filter(|q| q.ready()).count();
        if now == done {
            break;
        }
        done = now;
    }
    let on_workers = pool.stats().queued == 0;
    let victim = queued
        .iter()
        .position(|q| !q.ready())
        .filter(|_| on_workers);
    if let Some(v) = victim
        && !queued[v].cancel()
    {
        return Err(format!("cancel() of queued task {v} returned false"));
    }
    for b in blockers {
        b.get().map_err(|e| format!("a pause failed: {e}"))?;
    }
    for (i, q) in queued.into_iter().enumerate() {
        match (q.get(), Some(i) == victim) {
            (Err(Error::Cancelled), true) | (Ok(true), false) => {}
            (other, was) => {
                return Err(format!("queued task {i} (cancelled: {was}) gave {other:?}"));
            }
        }
    }
    if let Some(v) = victim
        && std::path::Path::new(&file(v)).exists()
    {
        return Err(format!(
            "queued task {v} was cancelled but ran all the same"
        ));
    }
    Ok(victim)
}

/// Waits for the task's marker: (rank, pid, host) of the worker running it.
fn running(path: &str) -> Result<(usize, u32, String), String> {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(m) = read_marker(path) {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            return Err(format!("a 60 s task had not started after {BOUND:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cancels a running task and checks that it resolves `Cancelled` soon.
fn cancel(r: AsyncResult<u64>, what: &str) -> Result<Duration, String> {
    let t = Instant::now();
    if !r.cancel() {
        return Err(format!("cancel() of {what} returned false"));
    }
    if !r.wait_timeout(BOUND) {
        return Err(format!(
            "{what} was cancelled but had not resolved after {BOUND:?}"
        ));
    }
    match r.get() {
        Err(Error::Cancelled) => Ok(t.elapsed()),
        other => Err(format!("{what}, cancelled, gave {other:?}")),
    }
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let (pool, ranks) = mpi_pool()?;
    let dir = MarkerDir::new("mpi_cancel")?;
    let me = ranks::hostname();
    let c = census(&pool, ranks, BOUND)?;
    println!("workers: {}", c.describe());

    // One running task.
    let marker = dir.file("one");
    let r = pool
        .apply_async(long_task, (marker.clone(), 60_000))
        .map_err(|e| e.to_string())?;
    let (rank, pid, host) = running(&marker)?;
    if !pool.worker_pids().contains(&pid) || !c.ran_on(pid, rank) {
        return Err(format!(
            "the task runs in {pid} on rank {rank}, which is not a worker there: worker_pids() = \
             {:?}, census: {}",
            pool.worker_pids(),
            c.describe()
        ));
    }
    let took = cancel(r, "a running 60 s task")?;
    wait_replaced(&pool, &[pid], BOUND)?;
    if host == me {
        // On rank 0's host its pid can be checked: killed, not left running.
        wait_gone(pid, BOUND)?;
    }
    let after = census(&pool, ranks, BOUND)?;
    after.expect_replaced(rank, WORKERS_PER_RANK, pid, "the cancel")?;
    println!(
        "cancelled a running task on rank {rank} (worker {pid} on {host}) in {took:.2?}; \
         replaced: {}",
        after.describe()
    );
    check_map(&pool)?;

    // One running task per worker, all cancelled at once.
    let n = pool.processes();
    let mut tasks = Vec::new();
    for i in 0..n {
        let marker = dir.file(&format!("many-{i}"));
        let r = pool
            .apply_async(long_task, (marker.clone(), 60_000))
            .map_err(|e| e.to_string())?;
        tasks.push((marker, r));
    }
    let mut pids = Vec::new();
    for (marker, _) in &tasks {
        pids.push(running(marker)?.1);
    }
    for (i, (_, r)) in tasks.into_iter().enumerate() {
        cancel(r, &format!("running task {i} of {n}"))?;
    }
    wait_replaced(&pool, &pids, BOUND)?;
    let c = census(&pool, ranks, BOUND)?;
    c.expect_full(ranks, WORKERS_PER_RANK, &format!("{n} cancels at once"))?;
    println!("cancelled {n} running tasks at once (workers {pids:?}); every rank serves on");

    a_queued_task_never_runs(&pool, &dir)?;

    // A finished task is not cancelled: its value stands.
    let r = pool.apply_async(double, 21).map_err(|e| e.to_string())?;
    if !r.wait_timeout(BOUND) {
        return Err(format!("double(21) gave no result within {BOUND:?}"));
    }
    if r.cancel() {
        return Err("cancel() of a finished task returned true".into());
    }
    match r.get() {
        Ok(42) => {}
        other => return Err(format!("double(21), after a late cancel, gave {other:?}")),
    }
    check_map(&pool)?;
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    drop(dir);
    println!("mpi_cancel: ok");
    Ok(())
}

fn main() {
    exit_with("mpi_cancel", run)
}
