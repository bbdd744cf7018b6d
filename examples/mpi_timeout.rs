//! A task that times out on an MPI rank costs that rank: the rank abandons
//! the task and serves no more. A spare rank replaces it, and the pool goes
//! on (feature `mpi`).
//!
//! ```text
//! mpirun -n 4 target/release/examples/mpi_timeout
//! ```
//!
//! There are two workers (ranks 1 and 2) and one spare (rank 3). The first
//! timeout is replaced by the spare. After the second there is no rank left
//! to replace it, and the pool goes on with one worker.
use procpool::{Error, Pool, TaskOptions};
use std::time::Duration;

fn sleepy(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn double(x: u64) -> u64 {
    x * 2
}

fn check_map(pool: &Pool) -> Result<(), String> {
    let v = pool.map(double, 0..500u64).map_err(|e| e.to_string())?;
    if v != (0..500u64).map(|x| x * 2).collect::<Vec<_>>() {
        return Err("map gave wrong values".into());
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let pool = Pool::builder()
        .mpi()
        .processes(2)
        .build()
        .map_err(|e| e.to_string())?;
    let before = pool.worker_pids();
    let opts = || TaskOptions::new().timeout(Duration::from_millis(300));
    match pool.apply_with(sleepy, 60_000, opts()) {
        Err(Error::Timeout { pid, .. }) => println!("first timeout cost rank {pid}"),
        other => return Err(format!("the first long task gave {other:?}")),
    }
    let after = pool.worker_pids();
    println!("workers: {before:?} -> {after:?}");
    if after.len() != 2 || !after.contains(&3) {
        return Err(format!(
            "the spare rank 3 did not replace the lost one: {after:?}"
        ));
    }
    check_map(&pool)?;
    match pool.apply_with(sleepy, 60_000, opts()) {
        Err(Error::Timeout { pid, .. }) => println!("second timeout cost rank {pid}"),
        other => return Err(format!("the second long task gave {other:?}")),
    }
    println!("workers left: {:?}", pool.worker_pids());
    if pool.worker_pids().len() != 1 {
        return Err("one worker should be left".into());
    }
    check_map(&pool)?;
    if !matches!(pool.apply(sleepy, 10), Ok(10)) {
        return Err("a short task failed".into());
    }
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_timeout: ok");
    Ok(())
}

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mpi_timeout: {e}");
            1
        }
    };
    std::process::exit(code)
}
