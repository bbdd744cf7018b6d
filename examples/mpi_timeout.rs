//! A task that times out on an MPI rank fails with `Error::Timeout`
//! naming its rank; the rank kills the worker that ran it (on its own
//! clock), replaces it, and keeps serving. No rank is lost (feature `mpi`).
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_timeout
//! ```
//!
//! Each worker rank hosts two workers. One task that sleeps 60 s with a
//! 300 ms timeout must fail within seconds, its worker must be replaced on
//! the same rank, and every rank must answer afterwards. Then one such
//! task per worker times out at once, and still every rank answers with
//! all its workers; a task that finishes within its timeout is unharmed.
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::{Error, TaskOptions};
use ranks::*;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(300);
/// How long a timed-out task's result may take to arrive.
const BOUND: Duration = Duration::from_secs(20);
/// How long a census or a replacement may take.
const SETTLE: Duration = Duration::from_secs(30);

/// Sleeps `ms`, then says which worker and host ran it.
fn sleepy(ms: u64) -> (u32, String) {
    std::thread::sleep(Duration::from_millis(ms));
    (std::process::id(), ranks::hostname())
}

/// Checks that `res` is the `Timeout` of a task on a worker rank; returns
/// the pid and rank it names.
fn expect_timeout(res: Result<(u32, String), Error>, ranks: usize) -> Result<(u32, usize), String> {
    match res {
        Err(Error::Timeout {
            timeout,
            pid,
            rank: Some(rank),
            ..
        }) if timeout == TIMEOUT && (1..ranks).contains(&rank) => Ok((pid, rank)),
        other => Err(format!(
            "a 60 s task with a {TIMEOUT:?} timeout gave {other:?}; expected Timeout {{ timeout: \
             {TIMEOUT:?}, rank: Some(1..{ranks}) }}"
        )),
    }
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let (pool, ranks) = mpi_pool()?;
    let opts = || TaskOptions::new().timeout(TIMEOUT);
    let me = ranks::hostname();

    // One timeout.
    let c = census(&pool, ranks, SETTLE)?;
    println!("workers: {}", c.describe());
    let t = Instant::now();
    let r = pool
        .apply_async_with(sleepy, 60_000, opts())
        .map_err(|e| e.to_string())?;
    if !r.wait_timeout(BOUND) {
        return Err(format!(
            "a 60 s task with a {TIMEOUT:?} timeout was still running after {BOUND:?}"
        ));
    }
    let (pid, rank) = expect_timeout(r.get(), ranks)?;
    let took = t.elapsed();
    if !c.ran_on(pid, rank) {
        return Err(format!(
            "Timeout names worker {pid} on rank {rank}; the census saw {}",
            c.describe()
        ));
    }
    wait_replaced(&pool, &[pid], SETTLE)?;
    // A worker on this host can be seen to be gone (on another host its
    // pid means nothing here).
    if c.hosts_of[&rank].contains(&me) && c.hosts_of[&rank].len() == 1 {
        wait_gone(pid, SETTLE)?;
    }
    // The same rank serves on, with all its workers: no rank is lost.
    let after = census(&pool, ranks, SETTLE)?;
    after.expect_replaced(rank, WORKERS_PER_RANK, pid, "the timeout")?;
    println!(
        "timeout on rank {rank}: worker {pid} killed and replaced, the result came after \
         {took:.2?}; rank {rank} serves on: {}",
        after.describe()
    );
    check_map(&pool)?;

    // One timeout per worker, all at once.
    let n = pool.processes();
    let pending: Vec<_> = (0..n)
        .map(|_| pool.apply_async_with(sleepy, 60_000, opts()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut killed = Vec::new();
    let mut by_rank = std::collections::BTreeMap::<usize, usize>::new();
    for r in pending {
        if !r.wait_timeout(BOUND) {
            return Err(format!(
                "one of {n} timed tasks at once gave no result within {BOUND:?}"
            ));
        }
        let (pid, rank) = expect_timeout(r.get(), ranks)?;
        killed.push(pid);
        *by_rank.entry(rank).or_default() += 1;
    }
    wait_replaced(&pool, &killed, SETTLE)?;
    let c = census(&pool, ranks, SETTLE)?;
    c.expect_full(ranks, WORKERS_PER_RANK, &format!("{n} timeouts at once"))?;
    println!(
        "{n} timeouts at once (per rank: {by_rank:?}); every rank serves on: {}",
        c.describe()
    );

    // A task that ends within its timeout is not touched.
    let before = pool.worker_pids();
    match pool.apply_with(sleepy, 10, opts()) {
        Ok((pid, _)) if before.contains(&pid) => {}
        other => {
            return Err(format!(
                "a 10 ms task with a {TIMEOUT:?} timeout gave {other:?}"
            ));
        }
    }
    check_map(&pool)?;
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_timeout: ok");
    Ok(())
}

fn main() {
    exit_with("mpi_timeout", run)
}
