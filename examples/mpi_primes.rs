//! Counts the primes below a bound in chunks over MPI ranks, and checks the
//! sum against a sequential count (feature `mpi`).
//!
//! ```text
//! cargo build --release --features mpi --example mpi_primes
//! mpirun -n 3 target/release/examples/mpi_primes [BOUND]
//! ```
//!
//! Every rank runs `main`. Rank 0 gets the pool, and ranks 1 and 2 serve
//! its tasks from inside `build()`, which they never leave. They exit when
//! rank 0's pool is dropped.
use procpool::{Error, Pool};
use std::time::Instant;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The task: how many primes are in `lo..hi`.
fn count_primes((lo, hi): (u64, u64)) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

fn run() -> Result<bool, Error> {
    // First thing in main: the other ranks stop here and serve.
    let pool = Pool::builder().mpi().build()?;
    let bound: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let step = (bound / 64).max(1);
    let chunks: Vec<(u64, u64)> = (0..bound)
        .step_by(step as usize)
        .map(|lo| (lo, (lo + step).min(bound)))
        .collect();
    let t = Instant::now();
    let counts = pool.map(count_primes, chunks.clone())?;
    let parallel: u64 = counts.iter().sum();
    let took = t.elapsed();
    let t = Instant::now();
    let sequential = count_primes((0, bound));
    let seq_took = t.elapsed();
    println!(
        "primes below {bound}: {parallel} in {} chunks over workers (pids on their ranks' hosts) {:?} in {took:.2?}; \
         sequential count on rank 0: {sequential} in {seq_took:.2?}",
        chunks.len(),
        pool.worker_pids(),
    );
    pool.close();
    pool.join()?;
    Ok(parallel == sequential)
}

fn main() {
    // The pool is dropped inside run(), so MPI is finalised before exit.
    let code = match run() {
        Ok(true) => {
            println!("mpi_primes: ok");
            0
        }
        Ok(false) => {
            eprintln!("mpi_primes: the counts differ");
            1
        }
        Err(e) => {
            eprintln!("mpi_primes: {e}");
            2
        }
    };
    std::process::exit(code)
}
