//! Apply latency and map throughput over MPI ranks, beside a local pool
//! with as many workers (feature `mpi`).
//!
//! ```text
//! cargo build --release --features mpi --example mpi_bench
//! mpirun -n 3 target/release/examples/mpi_bench
//! ```
//!
//! Rank 0 measures the MPI pool (the workers that ranks 1..N-1 host,
//! `workers_per_rank` each) and drops it. That stops the other ranks and
//! finalises MPI. It then measures a local pool of as many forked workers
//! on its own machine. Run without mpirun, it measures the local pool only
//! (two workers).
#[path = "support/mpi_ranks.rs"]
mod ranks;

use procpool::Pool;
use std::time::{Duration, Instant};

fn double(x: u64) -> u64 {
    x * 2
}

fn echo(v: Vec<u8>) -> Vec<u8> {
    v
}

struct Numbers {
    apply_us: f64,
    apply_async_per_s: f64,
    map_items_per_s: f64,
    map_mib_per_s: f64,
}

fn measure(pool: &Pool) -> Numbers {
    // Warm up: the first tasks pay for page faults and first dispatches.
    for i in 0..200 {
        pool.apply(double, i).unwrap();
    }
    // Long enough phases that a moment of the machine's noise does not
    // decide a figure.
    let n = 10_000;
    let t = Instant::now();
    for i in 0..n {
        assert_eq!(pool.apply(double, i).unwrap(), i * 2);
    }
    let apply_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let n = 100_000u64;
    let t = Instant::now();
    let rs: Vec<_> = (0..n)
        .map(|i| pool.apply_async(double, i).unwrap())
        .collect();
    for (i, r) in rs.into_iter().enumerate() {
        assert_eq!(r.get().unwrap(), i as u64 * 2);
    }
    let apply_async_per_s = n as f64 / t.elapsed().as_secs_f64();

    let n = 4_000_000u64;
    let t = Instant::now();
    let v = pool.map(double, 0..n).unwrap();
    let map_items_per_s = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(v[12345], 24690);

    // 1 MiB items travel in shared-memory blocks locally, inline over MPI.
    let items = 128;
    let t = Instant::now();
    let v = pool
        .map(echo, (0..items).map(|i| vec![i as u8; 1 << 20]))
        .unwrap();
    let took = t.elapsed();
    assert!(
        v.iter()
            .enumerate()
            .all(|(i, b)| b.len() == 1 << 20 && b[7] == i as u8)
    );
    // Each MiB goes there and back.
    let map_mib_per_s = (2 * items) as f64 / took.as_secs_f64();
    Numbers {
        apply_us,
        apply_async_per_s,
        map_items_per_s,
        map_mib_per_s,
    }
}

fn row(name: &str, n: &Numbers) {
    println!(
        "{name:<34} {:>10.1} {:>14.0} {:>16.0} {:>12.0}",
        n.apply_us, n.apply_async_per_s, n.map_items_per_s, n.map_mib_per_s
    );
}

fn main() {
    // PROCPOOL_BENCH_WORKERS_PER_RANK sets how many workers each rank
    // hosts (default: the CPUs of its affinity mask).
    let mut builder = Pool::builder().mpi();
    if let Some(n) = std::env::var("PROCPOOL_BENCH_WORKERS_PER_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.workers_per_rank(n);
    }
    // Start-up: from build() (MPI's initialisation included) to the first
    // result.
    let t0 = Instant::now();
    let mpi = match builder.build() {
        Ok(pool) => {
            pool.apply(double, 1).unwrap();
            let startup = t0.elapsed();
            // Each worker rank hosts workers of its own: the pool's size
            // is theirs together, not the number of ranks.
            let workers = pool.processes();
            let worker_ranks = ranks::world_size().map_or(0, |n| n - 1);
            let n = measure(&pool);
            drop(pool);
            Some((worker_ranks, workers, n, startup))
        }
        Err(e) => {
            println!("(no MPI pool: {e})");
            None
        }
    };
    let workers = mpi.as_ref().map_or(2, |m| m.1);
    let t0 = Instant::now();
    let local = Pool::builder().processes(workers).build().unwrap();
    local.apply(double, 1).unwrap();
    let local_startup = t0.elapsed();
    let l = measure(&local);
    drop(local);
    // Give the machine a moment between the runs' teardown and the report.
    std::thread::sleep(Duration::from_millis(10));
    println!(
        "{:<34} {:>10} {:>14} {:>16} {:>12}",
        "pool", "apply µs", "apply_async/s", "map items/s", "map MiB/s"
    );
    if let Some((r, w, m, _)) = &mpi {
        row(&format!("MPI, {r} worker ranks, {w} workers"), m);
    }
    row(&format!("local, {workers} processes"), &l);
    if let Some((_, _, _, startup)) = &mpi {
        println!(
            "start-up, build() to the first result: MPI {:.1} ms, local {:.1} ms",
            startup.as_secs_f64() * 1e3,
            local_startup.as_secs_f64() * 1e3
        );
    }
}
