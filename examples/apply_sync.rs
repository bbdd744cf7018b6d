//! Synchronous `apply`: the caller waits for each task.
//!
//! First 100 pairs of calls of two functions; then a `work` that reports
//! its worker's pid and sleeps: called ten times with `apply`, the tasks
//! run one after another, although the pool has five workers.
//!
//!     cargo run --release --example apply_sync
use procpool::Pool;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// When the program started. It is set before the pool is built, and every
/// worker is a fork of the program as it was then, so the workers see it
/// too (a static set *after* the pool is built would not reach them).
static START: OnceLock<Instant> = OnceLock::new();

fn ms() -> u128 {
    START.get().map_or(0, |t| t.elapsed().as_millis())
}

fn increment(x: i64) -> i64 {
    x + 1
}

fn decrement(x: i64) -> i64 {
    x - 1
}

fn work(n: u64) -> u64 {
    println!(
        "  {:>5} ms  worker {} starts work({n})",
        ms(),
        std::process::id()
    );
    std::thread::sleep(Duration::from_millis(100));
    n * n
}

fn main() -> Result<(), procpool::Error> {
    START.get_or_init(Instant::now);
    let pool = Pool::builder().processes(5).build()?;
    println!("workers: {:?}", pool.worker_pids());

    for i in 0..100 {
        let up = pool.apply(increment, i)?;
        let down = pool.apply(decrement, i)?;
        println!("{i:>3}: increment = {up:>3}, decrement = {down:>3}");
    }

    println!("ten calls of work(n) with apply, each waiting for the last:");
    let t = Instant::now();
    let mut squares = Vec::new();
    for n in 0..10 {
        squares.push(pool.apply(work, n)?);
    }
    println!(
        "squares {squares:?} in {:.2?} (10 x 100 ms, one at a time)",
        t.elapsed()
    );

    pool.close();
    pool.join()
}
