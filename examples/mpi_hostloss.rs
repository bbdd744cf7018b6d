//! Losing a host over MPI (feature `mpi`): 2,000 tasks of 2 to 5 ms over
//! worker ranks on several hosts, and part-way through one host is lost
//! (its processes killed, or its network cut) by whoever runs this.
//!
//! ```text
//! # Open MPI (the survivors live on only with these settings):
//! mpirun --mca orte_enable_recovery 1 --mca orte_abort_on_non_zero_status 0 \
//!     -n 4 target/release/examples/mpi_hostloss
//! # MPICH:
//! mpiexec -disable-auto-cleanup -n 4 target/release/examples/mpi_hostloss
//! ```
//!
//! Settings, in the environment of every rank:
//! - `HOSTLOSS_RETRIES`: the tasks' retries, 0 (the default) or more;
//! - `HOSTLOSS_READY`: a path this program creates once a quarter of the
//!   results are in: the moment to lose the host;
//! - `HOSTLOSS_LOST_RANK`: the rank that will be lost (unset: none);
//! - `HOSTLOSS_END`: `terminate` ends the pool with `terminate()` (the
//!   default is `close()` and `join()`);
//! - `HOSTLOSS_WORKER_TIMEOUT`: the worker ranks' rank timeout, in
//!   seconds (the default is rank 0's, 4 s): longer, a rank cut off for a
//!   while outlives rank 0's verdict, and when its link comes back rank 0
//!   must fence it off (it then exits);
//! - `HOSTLOSS_HOLD`: seconds to keep the pool up once the tasks are
//!   done, before it ends (for the lost rank to come back meanwhile).
//!
//! It checks, and prints `mpi_hostloss: ok` (exit 0) or why not (exit 1):
//! - every task resolves exactly once (its callbacks count);
//! - every value is right;
//! - without retries, every failure is `Error::RankLost` naming the lost
//!   rank and its host, and at least one task failed so (the ones it
//!   held); with retries, every task succeeds;
//! - no task succeeded on the lost rank after it was counted as lost;
//! - the pool shrinks by the lost rank's workers, and a map over the
//!   survivors works;
//! - `close()` and `join()` (or `terminate()`) return.
//!
//! It also prints how long after the ready file the first task failed or
//! ran again: the time to notice the loss (less the harness's reaction).
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::{Error, Pool, TaskOptions};
use ranks::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TASKS: u32 = 2000;
/// How long everything may take.
const LIMIT: Duration = Duration::from_secs(90);

/// SplitMix64: a fixed, well-mixed function of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The task: 2 to 5 ms of sleep, then its value and the rank it ran on.
fn work(i: u32) -> (u64, Option<usize>) {
    std::thread::sleep(Duration::from_millis(2 + mix(u64::from(i)) % 4));
    (mix(u64::from(i) ^ 0xabcd), my_rank())
}

fn env_num(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v} is not a number")),
        Err(_) => Ok(None),
    }
}

/// What the callbacks saw: per task, how many times it resolved; the
/// failures; when the first failure came.
#[derive(Default)]
struct Seen {
    failures: BTreeMap<u32, Error>,
    first_failure: Option<Instant>,
}

/// The pool: on a worker rank, with HOSTLOSS_WORKER_TIMEOUT as its rank
/// timeout (the worker ranks serve in here and never return).
fn pool() -> Result<(Pool, usize), String> {
    let mut b = Pool::builder().mpi().workers_per_rank(WORKERS_PER_RANK);
    if let (Some(s), Some(1..)) = (env_num("HOSTLOSS_WORKER_TIMEOUT")?, my_rank()) {
        b = b.rank_timeout(Duration::from_secs(s));
    }
    let pool = b.build().map_err(|e| e.to_string())?;
    Ok((pool, world_size()?))
}

fn run() -> Result<(), String> {
    let (pool, size) = pool()?;
    let terminate = std::env::var("HOSTLOSS_END").is_ok_and(|v| v == "terminate");
    let retries = env_num("HOSTLOSS_RETRIES")?.unwrap_or(0) as u32;
    let lost = env_num("HOSTLOSS_LOST_RANK")?.map(|r| r as usize);
    let ready = std::env::var("HOSTLOSS_READY").ok();
    let before = pool.processes();
    let t0 = Instant::now();

    let resolved: Arc<Vec<AtomicU32>> = Arc::new((0..TASKS).map(|_| AtomicU32::new(0)).collect());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut pending = Vec::with_capacity(TASKS as usize);
    for i in 0..TASKS {
        let (ok, err, seen) = (resolved.clone(), resolved.clone(), seen.clone());
        let opts = TaskOptions::new()
            .retries(retries)
            .on_success(move |_: &(u64, Option<usize>)| {
                ok[i as usize].fetch_add(1, Ordering::SeqCst);
            })
            .on_error(move |e| {
                err[i as usize].fetch_add(1, Ordering::SeqCst);
                let mut s = seen.lock().unwrap();
                s.first_failure.get_or_insert_with(Instant::now);
                s.failures.insert(i, e.clone());
            });
        let r = pool
            .apply_async_with(work, i, opts)
            .map_err(|e| format!("submitting task {i}: {e}"))?;
        pending.push(r);
    }
    let done = || {
        resolved
            .iter()
            .filter(|n| n.load(Ordering::SeqCst) > 0)
            .count()
    };
    // The moment to lose the host: a quarter of the results are in.
    let mut ready_at = None;
    while ready.is_some() && ready_at.is_none() {
        if done() >= TASKS as usize / 4 {
            let path = ready.as_deref().unwrap_or_default();
            std::fs::write(path, b"ready\n").map_err(|e| format!("{path}: {e}"))?;
            ready_at = Some(Instant::now());
        } else if t0.elapsed() > LIMIT {
            return Err("a quarter of the tasks did not resolve in time".into());
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let retried_at = watch_retries(&pool, retries, ready_at, || done() == TASKS as usize);
    let mut ran_on = BTreeMap::new();
    for (i, r) in pending.into_iter().enumerate() {
        if !r.wait_timeout(LIMIT.saturating_sub(t0.elapsed())) {
            return Err(format!("task {i} did not resolve within {LIMIT:?}"));
        }
        match r.get() {
            Ok((v, rank)) if v == mix(i as u64 ^ 0xabcd) => {
                *ran_on.entry(rank).or_insert(0u32) += 1;
            }
            Ok(_) => return Err(format!("task {i} gave a wrong value")),
            Err(_) => {}
        }
    }
    // The callbacks run on the result-handler thread: give them a moment.
    wait_until(Duration::from_secs(10), "every callback ran", || {
        match done() == TASKS as usize {
            true => Ok(()),
            false => Err(format!("{} of {TASKS} resolved", done())),
        }
    })?;
    if let Some(i) = resolved.iter().position(|n| n.load(Ordering::SeqCst) != 1) {
        return Err(format!(
            "task {i} resolved {} times",
            resolved[i].load(Ordering::SeqCst)
        ));
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    check_failures(&seen, lost, retries, size)?;
    let noticed = seen.first_failure.or(retried_at);
    let after = pool.processes();
    check_survivors(&pool, lost, before, after)?;
    if let Some(secs) = env_num("HOSTLOSS_HOLD")? {
        // The pool stays up while the lost rank may come back: nothing it
        // sends may count (every task still resolved once).
        std::thread::sleep(Duration::from_secs(secs));
        if let Some(i) = resolved.iter().position(|n| n.load(Ordering::SeqCst) != 1) {
            return Err(format!(
                "after the hold, task {i} has resolved {} times",
                resolved[i].load(Ordering::SeqCst)
            ));
        }
    }
    end(pool, terminate)?;
    let noticed = match (ready_at, noticed) {
        (Some(r), Some(n)) => format!("{} ms", n.saturating_duration_since(r).as_millis()),
        _ => "-".into(),
    };
    println!(
        "mpi_hostloss: ok ({TASKS} tasks, retries {retries}, lost rank {lost:?}: {} failed with \
         RankLost; workers {before} -> {after}; first failure or retry after the ready file: \
         {noticed}; results per rank: {ran_on:?}; ended by {})",
        seen.failures.len(),
        if terminate {
            "terminate()"
        } else {
            "close() and join()"
        }
    );
    Ok(())
}

/// With retries, no task fails: the loss shows as retries. Returns when
/// the first retry was seen after the ready file (while the tasks run).
fn watch_retries(
    pool: &Pool,
    retries: u32,
    ready_at: Option<Instant>,
    all_done: impl Fn() -> bool,
) -> Option<Instant> {
    if retries == 0 || ready_at.is_none() {
        return None;
    }
    let t0 = Instant::now();
    while !all_done() && t0.elapsed() < LIMIT {
        if pool.stats().retried > 0 {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Without retries, every failure is `RankLost` for the lost rank (and at
/// least one); with retries, there is none.
fn check_failures(
    seen: &Seen,
    lost: Option<usize>,
    retries: u32,
    size: usize,
) -> Result<(), String> {
    let Some(lost) = lost else {
        return match seen.failures.first_key_value() {
            None => Ok(()),
            Some((i, e)) => Err(format!("no rank was to be lost, but task {i} failed: {e}")),
        };
    };
    if lost == 0 || lost >= size {
        return Err(format!(
            "HOSTLOSS_LOST_RANK={lost}: not a worker rank of {size}"
        ));
    }
    if retries > 0 {
        return match seen.failures.first_key_value() {
            None => Ok(()),
            Some((i, e)) => Err(format!("with retries, task {i} failed: {e}")),
        };
    }
    if seen.failures.is_empty() {
        return Err(format!("rank {lost} was lost, but no task failed"));
    }
    for (i, e) in &seen.failures {
        match e {
            Error::RankLost { rank, host, .. } if *rank == lost && !host.is_empty() => {}
            other => {
                return Err(format!(
                    "task {i} failed otherwise than RankLost of rank {lost}: {other}"
                ));
            }
        }
    }
    Ok(())
}

/// The pool went on without the lost rank's workers, and works.
fn check_survivors(
    pool: &Pool,
    lost: Option<usize>,
    before: usize,
    after: usize,
) -> Result<(), String> {
    let want = match lost {
        Some(_) => before - WORKERS_PER_RANK,
        None => before,
    };
    if after != want {
        return Err(format!(
            "the pool has {after} workers after the loss; {want} were expected"
        ));
    }
    let who = pool
        .map(whoami, vec![1u64; 40])
        .map_err(|e| format!("a map over the survivors: {e}"))?;
    if let Some(l) = lost
        && who.iter().any(|(rank, _, _)| *rank == Some(l))
    {
        return Err(format!("a task ran on rank {l} after it was lost"));
    }
    Ok(())
}

/// `close()` and `join()`, or `terminate()`, return, with a rank missing,
/// within a minute.
fn end(pool: Pool, terminate: bool) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = if terminate {
            pool.terminate();
            Ok(())
        } else {
            pool.close();
            pool.join().map_err(|e| format!("join: {e}"))
        };
        let _ = tx.send(r);
    });
    let what = if terminate {
        "terminate()"
    } else {
        "close() and join()"
    };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r,
        Err(_) => Err(format!("{what} did not return within 60 s")),
    }
}

fn main() {
    exit_with("mpi_hostloss", run)
}
