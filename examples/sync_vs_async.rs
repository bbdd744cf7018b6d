//! 10,000 tasks through `apply` (one round trip each, the caller waiting)
//! against 10,000 through `apply_async` (all submitted, then collected).
//!
//!     cargo run --release --example sync_vs_async
use procpool::{AsyncResult, Pool};
use std::time::Instant;

const N: u64 = 10_000;

fn square(x: u64) -> u64 {
    x * x
}

fn main() -> Result<(), procpool::Error> {
    let pool = Pool::new()?;
    println!("a pool of {} workers, {N} tasks each way", pool.processes());

    let t = Instant::now();
    let mut sync_sum = 0;
    for i in 0..N {
        sync_sum += pool.apply(square, i)?;
    }
    let sync_time = t.elapsed();

    let t = Instant::now();
    let pending: Vec<AsyncResult<u64>> = (0..N)
        .map(|i| pool.apply_async(square, i))
        .collect::<Result<_, _>>()?;
    let mut async_sum = 0;
    for r in pending {
        async_sum += r.get()?;
    }
    let async_time = t.elapsed();

    assert_eq!(sync_sum, async_sum);
    println!(
        "  apply:       {sync_time:>10.3?}  ({:.1} µs a task)",
        sync_time.as_secs_f64() * 1e6 / N as f64
    );
    println!(
        "  apply_async: {async_time:>10.3?}  ({:.1} µs a task)",
        async_time.as_secs_f64() * 1e6 / N as f64
    );
    println!(
        "  apply_async was {:.1}x faster (sum of squares {sync_sum} both ways)",
        sync_time.as_secs_f64() / async_time.as_secs_f64()
    );
    Ok(())
}
