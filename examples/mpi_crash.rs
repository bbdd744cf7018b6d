//! Crash isolation on every MPI rank (feature `mpi`): a task that aborts,
//! segfaults, calls `exit` or SIGKILLs its own worker on a rank fails alone
//! with `Error::WorkerLost`, naming the rank, the worker's pid on its host
//! and how it died; the rank replaces that worker and the job goes on.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_crash
//! mpirun -n 3 target/release/examples/mpi_crash
//! ```
//!
//! Each worker rank hosts two workers. First each kind of crash runs
//! alone: the error must name the pid and rank that a census (tasks that
//! say which rank and pid ran them) saw, with the right signal or exit
//! code, and the worker must be replaced on the same rank. Then crashes of
//! every kind run at once, mixed with ordinary tasks, and afterwards every
//! rank must still serve with all its workers. Prints `mpi_crash: ok`, or
//! one line saying what went wrong and exits with 1.
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::Error;
use ranks::*;
use serde::{Deserialize, Serialize};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// How long any one result may take before the example gives up on it.
const BOUND: Duration = Duration::from_secs(60);
/// How long a census or a replacement may take.
const SETTLE: Duration = Duration::from_secs(30);
/// What a crash task returns if it survived its crash (it must not).
const SURVIVED: u32 = 0xdead;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
enum Crash {
    Abort,
    Segfault,
    Exit3,
    Sigkill,
}

const ALL: [Crash; 4] = [Crash::Abort, Crash::Segfault, Crash::Exit3, Crash::Sigkill];

impl Crash {
    /// The wait status the worker must end with: (signal, exit code).
    fn expected(self) -> (Option<i32>, Option<i32>) {
        match self {
            Crash::Abort => (Some(libc::SIGABRT), None),
            Crash::Segfault => (Some(libc::SIGSEGV), None),
            Crash::Exit3 => (None, Some(3)),
            Crash::Sigkill => (Some(libc::SIGKILL), None),
        }
    }
}

/// The task: ends its own worker process the way `how` says.
fn crash(how: Crash) -> u32 {
    no_core_files();
    match how {
        Crash::Abort => std::process::abort(),
        Crash::Segfault => {
            // The standard library catches SIGSEGV (to report stack
            // overflows); its handler puts back the default action and
            // returns, which ends a process only when a faulting
            // instruction runs again. A raised signal has none, so set the
            // default action first: the raise then kills the worker.
            // SAFETY: signal and raise are plain libc calls; dying is the point.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
        }
        Crash::Exit3 => std::process::exit(3),
        Crash::Sigkill => {
            // SAFETY: kill on our own pid; SIGKILL cannot be caught.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    // Not reached when the crash worked. Give the signal time to land,
    // then say that it did not.
    std::thread::sleep(Duration::from_secs(2));
    SURVIVED
}

/// An ordinary task, run between and beside the crashes.
fn triple(x: u32) -> u32 {
    x * 3
}

/// Checks that `res` is the `WorkerLost` that a `how` crash must give,
/// with a rank among 1..`ranks`; returns the pid, rank and status it names.
fn expect_lost(
    how: Crash,
    res: Result<u32, Error>,
    ranks: usize,
) -> Result<(u32, usize, ExitStatus), String> {
    let (pid, status, rank) = match res {
        Err(Error::WorkerLost {
            pid, status, rank, ..
        }) => (pid, status, rank),
        Ok(SURVIVED) => return Err(format!("{how:?}: the task survived its crash")),
        other => return Err(format!("{how:?}: expected WorkerLost, got {other:?}")),
    };
    let rank = match rank {
        Some(r) if (1..ranks).contains(&r) => r,
        other => {
            return Err(format!(
                "{how:?}: WorkerLost names rank {other:?}; the worker ranks are 1..{ranks}"
            ));
        }
    };
    let (signal, code) = how.expected();
    if status.signal() != signal || status.code() != code {
        return Err(format!(
            "{how:?}: worker {pid} on rank {rank} ended with {status}; expected signal {signal:?}, \
             exit code {code:?}"
        ));
    }
    Ok((pid, rank, status))
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let (pool, ranks) = mpi_pool()?;
    if pool.processes() != (ranks - 1) * WORKERS_PER_RANK {
        return Err(format!(
            "{} worker ranks hosting {WORKERS_PER_RANK} workers each should make {} processes; \
             processes() = {}",
            ranks - 1,
            (ranks - 1) * WORKERS_PER_RANK,
            pool.processes()
        ));
    }
    let c = census(&pool, ranks, SETTLE)?;
    println!("workers: {}", c.describe());

    // Each kind of crash alone: the error names the worker and rank that
    // ran it, and the worker is replaced on that rank.
    for how in ALL {
        let c = census(&pool, ranks, SETTLE)?;
        let before = pool.worker_pids();
        let r = pool.apply_async(crash, how).map_err(|e| e.to_string())?;
        if !r.wait_timeout(BOUND) {
            return Err(format!("{how:?}: no result within {BOUND:?}"));
        }
        let (pid, rank, status) = expect_lost(how, r.get(), ranks)?;
        if !before.contains(&pid) {
            return Err(format!(
                "{how:?}: WorkerLost names pid {pid}, not a worker: {before:?}"
            ));
        }
        if !c.ran_on(pid, rank) {
            return Err(format!(
                "{how:?}: WorkerLost says worker {pid} was on rank {rank}; the census saw {}",
                c.describe()
            ));
        }
        wait_replaced(&pool, &[pid], SETTLE)?;
        let after = census(&pool, ranks, SETTLE)?;
        after.expect_replaced(rank, WORKERS_PER_RANK, pid, &format!("{how:?}"))?;
        let fresh: Vec<_> = pool
            .worker_pids()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        println!("{how:?} on rank {rank}: worker {pid} lost ({status}), replaced by {fresh:?}");
    }

    // Every kind at once, several of each, among ordinary tasks.
    let crashes = ALL.len() * pool.processes();
    let mut pending = Vec::new();
    for i in 0..crashes {
        let how = ALL[i % ALL.len()];
        pending.push((Some(how), i as u32, pool.apply_async(crash, how)));
        for k in 0..5 {
            let x = (i * 5 + k) as u32;
            pending.push((None, x, pool.apply_async(triple, x)));
        }
    }
    let mut lost = Vec::new();
    let mut by_rank = std::collections::BTreeMap::<usize, usize>::new();
    for (how, x, r) in pending {
        let r = r.map_err(|e| e.to_string())?;
        if !r.wait_timeout(BOUND) {
            return Err(format!(
                "a task among the crashes ({how:?}, {x}) gave no result within {BOUND:?}"
            ));
        }
        match how {
            Some(how) => {
                let (pid, rank, _) = expect_lost(how, r.get(), ranks)?;
                lost.push(pid);
                *by_rank.entry(rank).or_default() += 1;
            }
            None => match r.get() {
                Ok(v) if v == x * 3 => {}
                other => {
                    return Err(format!("triple({x}) beside the crashes gave {other:?}"));
                }
            },
        }
    }
    wait_replaced(&pool, &lost, SETTLE)?;
    let c = census(&pool, ranks, SETTLE)?;
    c.expect_full(ranks, WORKERS_PER_RANK, &format!("{crashes} crashes"))?;
    check_map(&pool)?;
    println!(
        "{crashes} crashes at once, lost workers per rank {by_rank:?}; every rank serves again: {}",
        c.describe()
    );
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_crash: ok");
    Ok(())
}

fn main() {
    exit_with("mpi_crash", run)
}
