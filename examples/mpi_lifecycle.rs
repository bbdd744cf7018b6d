//! A pool's life over MPI (feature `mpi`), as on one machine: every worker
//! runs the initializer (replacements too), and none sees the MPI
//! launcher's variables; workers retire after `max_tasks_per_child` tasks
//! and are replaced on their rank, large items stream both ways through
//! `imap_unordered`, and `terminate` with tasks running fails them all at
//! once and ends the job cleanly.
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_lifecycle
//! ```
//!
//! It prints "mpi_lifecycle: ok" and exits 0, or says what went wrong and
//! exits 1.
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::{Error, Pool};
use ranks::{WORKERS_PER_RANK, Who, whoami};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Set by the initializer in each worker.
static INITIALISED: AtomicU64 = AtomicU64::new(0);

fn init(tag: u64) {
    INITIALISED.store(tag, Ordering::SeqCst);
}

/// What the initializer set in this worker, and the MPI launcher's
/// variables in its environment (there must be none: a worker must not look
/// like a rank to an MPI library that a task loads).
fn inspect(_: ()) -> (u64, Vec<String>) {
    let launcher = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| ["OMPI_", "PMIX_", "PMI_"].iter().any(|p| k.starts_with(p)))
        .collect();
    (INITIALISED.load(Ordering::SeqCst), launcher)
}

/// The initializer's tag.
const TAG: u64 = 0x5eed;

/// Each worker runs at most this many tasks.
const MAX_TASKS: u64 = 3;

fn echo_sum(v: Vec<u32>) -> (u64, Vec<u32>) {
    (v.iter().map(|&x| x as u64).sum(), v)
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Twenty tasks see the initializer's tag and no launcher variable.
fn inspected(pool: &Pool) -> Result<(), String> {
    let seen = pool.map(inspect, vec![(); 20]).map_err(|e| e.to_string())?;
    for (tag, launcher) in seen {
        if tag != TAG {
            return Err(format!(
                "a worker ran without the initializer (tag {tag:#x})"
            ));
        }
        if !launcher.is_empty() {
            return Err(format!(
                "a worker sees the launcher's variables {launcher:?}"
            ));
        }
    }
    println!("20 tasks saw the initializer's tag and no launcher variable");
    Ok(())
}

/// Every worker ran at most MAX_TASKS tasks, and retired workers were
/// replaced on every worker rank.
fn recycles(pool: &Pool, ranks: usize) -> Result<(), String> {
    let n: usize = 60;
    let rs: Vec<_> = (0..n)
        .map(|_| pool.apply_async(whoami, 5).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut per_pid: HashMap<(Option<usize>, u32, String), u64> = HashMap::new();
    for r in rs {
        let who: Who = r.get().map_err(|e| format!("a task failed: {e}"))?;
        *per_pid.entry(who).or_default() += 1;
    }
    if let Some((who, k)) = per_pid.iter().find(|(_, k)| **k > MAX_TASKS) {
        return Err(format!("worker {who:?} ran {k} tasks, past {MAX_TASKS}"));
    }
    let least = n.div_ceil(MAX_TASKS as usize);
    if per_pid.len() < least {
        return Err(format!("{} workers ran {n} tasks", per_pid.len()));
    }
    let ranks_seen: HashSet<_> = per_pid.keys().map(|w| w.0).collect();
    if ranks_seen.len() != ranks - 1 || ranks_seen.contains(&None) {
        return Err(format!("the tasks ran on ranks {ranks_seen:?}"));
    }
    println!(
        "{n} tasks ran on {} workers over ranks {ranks_seen:?}, none more than {MAX_TASKS}",
        per_pid.len()
    );
    Ok(())
}

/// 40 items of 256 KiB each, there and back, in any order.
fn streams(pool: &Pool) -> Result<(), String> {
    let items = (0..40u32).map(|i| vec![i; 64 << 10]);
    let mut seen = HashSet::new();
    for r in pool.imap_unordered(echo_sum, items) {
        let (sum, v) = r.map_err(|e| format!("an item failed: {e}"))?;
        let i = v[0];
        if v.len() != 64 << 10 || v.iter().any(|&x| x != i) || sum != i as u64 * (64 << 10) {
            return Err(format!("item {i} came back wrong"));
        }
        seen.insert(i);
    }
    if seen.len() != 40 {
        return Err(format!("{} of 40 items came back", seen.len()));
    }
    println!("40 items of 256 KiB came back whole");
    Ok(())
}

/// Tasks that run for a minute all fail with `Terminated` when the pool
/// is terminated, long before they would end.
fn terminates(pool: &Pool) -> Result<(), String> {
    let rs: Vec<_> = (0..6)
        .map(|_| {
            pool.apply_async(sleep_ms, 60_000)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(300));
    pool.terminate();
    for r in rs {
        if !r.wait_timeout(Duration::from_secs(30)) {
            return Err("a task was still pending 30 s after terminate".into());
        }
        match r.get() {
            Err(Error::Terminated) => {}
            other => return Err(format!("after terminate, a task gave {other:?}")),
        }
    }
    println!("terminate failed the 6 running tasks at once");
    Ok(())
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let pool = Pool::builder()
        .mpi()
        .workers_per_rank(WORKERS_PER_RANK)
        .max_tasks_per_child(MAX_TASKS)
        .initializer(init, TAG)
        .build()
        .map_err(|e| e.to_string())?;
    let ranks = ranks::world_size()?;
    inspected(&pool)?;
    recycles(&pool, ranks)?;
    // The workers that replaced the retired ones ran it too.
    inspected(&pool)?;
    streams(&pool)?;
    terminates(&pool)?;
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_lifecycle: ok");
    Ok(())
}

fn main() {
    ranks::exit_with("mpi_lifecycle", run)
}
