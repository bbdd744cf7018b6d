//! Chaos over MPI ranks (feature `mpi`): 2,000 tasks, of which a fixed,
//! seeded choice of about 5% SIGKILL their own worker on their first
//! attempt. Every task must resolve exactly once; without retries exactly
//! the chosen ones fail, with `WorkerLost` naming the rank and pid that
//! died; with retries every task comes back right.
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_chaos
//! ```
//!
//! A chosen task tells its first attempt from a retry by a marker file
//! that it makes (create-new) before it kills itself, in a directory that
//! rank 0 makes after `build()` and sends in the tasks' arguments. The
//! ranks must share that filesystem (one host, or the simulated hosts of
//! `.ci/mpi-hosts.sh`); on a cluster with node-local /tmp, point
//! PROCPOOL_MARKER_DIR at a shared directory.
//!
//! MPI can be initialised once per program run, so one pool runs all
//! three phases, each with fresh markers:
//! 1. `apply_async_with` and `TaskOptions::retries(0)`: the chosen tasks
//!    fail with `WorkerLost` (SIGKILL, the rank and pid of their marker),
//!    every other task gives its value;
//! 2. the same with `retries(1)`: every task gives its value, and every
//!    chosen one did die once;
//! 3. `map_async_with` with `MapOptions::chunksize(1).retries(1)`: the
//!    whole map comes back right.
//!
//! Callbacks count how many times each task resolves: exactly once.
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::{Error, MapOptions, Pool, TaskOptions};
use ranks::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const TASKS: u32 = 2000;
/// The choice of tasks that die: fixed, so that every run kills the same.
const SEED: u64 = 0x5eed_c4a0_5000_0001;
/// Out of 1000: about 5% are chosen.
const PER_MILLE: u64 = 50;
/// How long each phase may take, all its tasks together.
const PHASE: Duration = Duration::from_secs(60);
/// How long a census or a replacement may take.
const SETTLE: Duration = Duration::from_secs(30);

/// SplitMix64: a fixed, well-mixed function of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn chosen(i: u32) -> bool {
    mix(SEED ^ u64::from(i)) % 1000 < PER_MILLE
}

/// The value task `i` must give.
fn value(i: u32) -> u64 {
    mix(u64::from(i))
}

#[derive(Serialize, Deserialize, Clone)]
struct Job {
    i: u32,
    /// The marker to make before dying; None for a task that is not chosen.
    marker: Option<String>,
}

/// The task: a chosen one SIGKILLs its own worker on its first attempt.
fn chaos(job: Job) -> u64 {
    if let Some(path) = &job.marker
        && ranks::mark(path)
    {
        // SAFETY: kill on our own pid; SIGKILL cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_secs(10));
        return 0; // not reached: the kill landed
    }
    value(job.i)
}

fn jobs(dir: &MarkerDir, phase: u32) -> Vec<Job> {
    (0..TASKS)
        .map(|i| Job {
            i,
            marker: chosen(i).then(|| dir.file(&format!("p{phase}-{i}"))),
        })
        .collect()
}

/// Submits every job with `retries`, waits for all (within PHASE) and
/// returns each outcome, after checking that each resolved exactly once.
fn run_phase(pool: &Pool, jobs: &[Job], retries: u32) -> Result<Vec<Result<u64, Error>>, String> {
    let resolved: Arc<Vec<AtomicU32>> =
        Arc::new((0..jobs.len()).map(|_| AtomicU32::new(0)).collect());
    let mut pending = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (ok, err) = (resolved.clone(), resolved.clone());
        let i = job.i as usize;
        let opts = TaskOptions::new()
            .retries(retries)
            .on_success(move |_: &u64| {
                ok[i].fetch_add(1, Ordering::SeqCst);
            })
            .on_error(move |_| {
                err[i].fetch_add(1, Ordering::SeqCst);
            });
        pending.push(
            pool.apply_async_with(chaos, job.clone(), opts)
                .map_err(|e| format!("submitting task {i}: {e}"))?,
        );
    }
    let deadline = Instant::now() + PHASE;
    let mut out = Vec::with_capacity(jobs.len());
    for (i, r) in pending.into_iter().enumerate() {
        if !r.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
            let done = resolved
                .iter()
                .filter(|n| n.load(Ordering::SeqCst) > 0)
                .count();
            return Err(format!(
                "task {i} had not resolved after {PHASE:?} ({done} of {} had)",
                jobs.len()
            ));
        }
        out.push(r.get());
    }
    // A late second resolution would show here.
    std::thread::sleep(Duration::from_millis(200));
    let wrong: Vec<_> = resolved
        .iter()
        .enumerate()
        .map(|(i, n)| (i, n.load(Ordering::SeqCst)))
        .filter(|&(_, n)| n != 1)
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "tasks must resolve exactly once; (task, times): {:?}",
            &wrong[..wrong.len().min(10)]
        ));
    }
    Ok(out)
}

/// Fails with the first few of `bad`, if any.
fn report(phase: &str, bad: &[String]) -> Result<(), String> {
    if bad.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{phase}: {} tasks went wrong; the first: {}",
        bad.len(),
        bad[..bad.len().min(8)].join("; ")
    ))
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let (pool, ranks) = mpi_pool()?;
    let dir = MarkerDir::new("mpi_chaos")?;
    let n_chosen = (0..TASKS).filter(|&i| chosen(i)).count();
    println!(
        "{TASKS} tasks, {n_chosen} of them chosen to SIGKILL their worker on their first attempt; \
         workers: {}",
        census(&pool, ranks, SETTLE)?.describe()
    );

    // Phase 1: no retries. Exactly the chosen tasks fail, each with the
    // WorkerLost of the worker that its marker names.
    let t = Instant::now();
    let p1 = jobs(&dir, 1);
    let out = run_phase(&pool, &p1, 0)?;
    let mut bad = Vec::new();
    let mut lost_by_rank = BTreeMap::<usize, usize>::new();
    let mut lost = Vec::new();
    for (job, res) in p1.iter().zip(out) {
        let i = job.i;
        match (&job.marker, res) {
            (None, Ok(v)) if v == value(i) => {}
            (
                Some(path),
                Err(Error::WorkerLost {
                    pid, status, rank, ..
                }),
            ) => {
                let marked = read_marker(path);
                match (marked, rank) {
                    (Some((mrank, mpid, _)), Some(r))
                        if mrank == r && mpid == pid && status.signal() == Some(libc::SIGKILL) =>
                    {
                        *lost_by_rank.entry(r).or_default() += 1;
                        lost.push(pid);
                    }
                    (marked, rank) => bad.push(format!(
                        "task {i}: WorkerLost {{ pid: {pid}, rank: {rank:?}, status: {status} }}, \
                         but its marker says (rank, pid, host) = {marked:?} and the status must \
                         be SIGKILL"
                    )),
                }
            }
            (marker, res) => bad.push(format!(
                "task {i} ({}): {res:?}",
                if marker.is_some() {
                    "chosen"
                } else {
                    "not chosen"
                }
            )),
        }
    }
    report("phase 1 (no retries)", &bad)?;
    println!(
        "phase 1, no retries: {} right, {} WorkerLost (per rank {lost_by_rank:?}) in {:.2?}",
        TASKS as usize - lost.len(),
        lost.len(),
        t.elapsed()
    );
    wait_replaced(&pool, &lost, SETTLE)?;

    // Phase 2: one retry each. Every task gives its value, and every
    // chosen one did die once (its marker is there).
    let t = Instant::now();
    let p2 = jobs(&dir, 2);
    let out = run_phase(&pool, &p2, 1)?;
    let mut bad = Vec::new();
    for (job, res) in p2.iter().zip(out) {
        match res {
            Ok(v) if v == value(job.i) => {}
            other => bad.push(format!("task {}: {other:?}", job.i)),
        }
        if let Some(path) = &job.marker
            && read_marker(path).is_none()
        {
            bad.push(format!(
                "task {} was chosen but did not die first (no marker)",
                job.i
            ));
        }
    }
    report("phase 2 (retries(1))", &bad)?;
    println!(
        "phase 2, retries(1): all {TASKS} right, {n_chosen} after a retry, in {:.2?}",
        t.elapsed()
    );

    // Phase 3: a map, one item per chunk, one retry per chunk.
    let t = Instant::now();
    let p3 = jobs(&dir, 3);
    let m = pool
        .map_async_with(chaos, p3.clone(), MapOptions::new().chunksize(1).retries(1))
        .map_err(|e| e.to_string())?;
    if !m.wait_timeout(PHASE) {
        return Err(format!(
            "phase 3: the map had not finished after {PHASE:?} (progress {:?})",
            m.progress()
        ));
    }
    let values = m
        .get()
        .map_err(|e| format!("phase 3: the map failed: {e}"))?;
    let wrong: Vec<_> = values
        .iter()
        .zip(&p3)
        .filter(|(v, job)| **v != value(job.i))
        .map(|(_, job)| job.i)
        .collect();
    let undied: Vec<_> = p3
        .iter()
        .filter(|job| {
            job.marker
                .as_deref()
                .is_some_and(|p| read_marker(p).is_none())
        })
        .map(|job| job.i)
        .collect();
    if values.len() != p3.len() || !wrong.is_empty() || !undied.is_empty() {
        return Err(format!(
            "phase 3: {} values for {} items; wrong: {wrong:?}; chosen but never died: {undied:?}",
            values.len(),
            p3.len()
        ));
    }
    println!(
        "phase 3, map with chunksize(1).retries(1): all {TASKS} right in {:.2?}",
        t.elapsed()
    );

    // Every rank still serves, with all its workers.
    let c = census(&pool, ranks, SETTLE)?;
    c.expect_full(ranks, WORKERS_PER_RANK, "the chaos")?;
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    drop(dir);
    println!("mpi_chaos: ok");
    Ok(())
}

fn main() {
    exit_with("mpi_chaos", run)
}
