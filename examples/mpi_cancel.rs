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
