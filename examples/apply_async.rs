//! `apply_async`: submit now, `get` later.
//!
//! First 100 increments submitted at once and then collected; then ten
//! `work` tasks (each reports its worker's pid and sleeps 100 ms) submitted
//! at once to a pool of five: they run five at a time. The pool is closed
//! and joined before the results are read, as in the Python original.
//!
//!     cargo run --release --example apply_async
use procpool::{AsyncResult, Pool};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set before the pool is built, so every worker (a fork of the program as
/// it was then) sees it too.
static START: OnceLock<Instant> = OnceLock::new();

fn ms() -> u128 {
    START.get().map_or(0, |t| t.elapsed().as_millis())
}

fn increment(x: i64) -> i64 {
    x + 1
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

    let pending: Vec<AsyncResult<i64>> = (0..100)
        .map(|i| pool.apply_async(increment, i))
        .collect::<Result<_, _>>()?;
    let values: Vec<i64> = pending
        .into_iter()
        .map(AsyncResult::get)
        .collect::<Result<_, _>>()?;
    println!("100 x apply_async(increment) then get: {values:?}");

    println!("ten work(n) tasks submitted at once to five workers:");
    let t = Instant::now();
    let pending: Vec<AsyncResult<u64>> = (0..10)
        .map(|n| pool.apply_async(work, n))
        .collect::<Result<_, _>>()?;
    println!("  {:>5} ms  all ten submitted", ms());
    pool.close(); // no more tasks...
    pool.join()?; // ...and wait for those queued, and for the workers to exit
    println!("  {:>5} ms  closed and joined", ms());
    let squares: Vec<u64> = pending
        .into_iter()
        .map(AsyncResult::get)
        .collect::<Result<_, _>>()?;
    println!(
        "squares {squares:?} in {:.2?} (10 x 100 ms on five workers: about 200 ms when they run five at a time)",
        t.elapsed()
    );
    Ok(())
}
