//! Criterion benchmarks for procpool: a pool against a process per task,
//! apply latency, apply_async / map / imap_unordered throughput, a 64 MiB
//! echo, and start-up by worker count.
//!
//!     cargo bench --bench pool
//!     cargo bench --bench pool -- echo      # one group
//!
//! Sample sizes and measurement times are small so that the whole run takes
//! a few minutes on a 2-core machine; the figures are for spotting large
//! changes, not small ones. `examples/bench_report.rs` gives the figures that
//! compare against CPython's multiprocessing.Pool.
use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use procpool::{MapOptions, Pool};
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn inc(x: u64) -> u64 {
    x + 1
}

fn echo_vec(b: Vec<u8>) -> Vec<u8> {
    b
}

fn echo_bytes(b: ByteBuf) -> ByteBuf {
    b
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pool() -> Pool {
    Pool::builder()
        .processes(workers())
        .build()
        .expect("starting a pool")
}

/// `n` trivial tasks, one process each: fork, the child `_exit`s at once,
/// the parent reaps every child (Python's fork start method: no exec).
fn fork_per_task(n: usize) {
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: the child only calls _exit (async-signal-safe), so the
        // threads this process may have do not matter.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            // SAFETY: _exit never returns and runs no atexit handlers.
            0 => unsafe { libc::_exit(0) },
            p => pids.push(p),
        }
    }
    for p in pids {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; p is our unreaped child.
        let r = unsafe { libc::waitpid(p, &mut status, 0) };
        assert_eq!(r, p, "waitpid");
    }
}

/// 100 trivial tasks: a process each, through a running pool, and through a
/// pool started (and closed and joined) for them.
fn spawn_vs_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("tasks_100");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(100));
    g.bench_function("fork_per_task", |b| b.iter(|| fork_per_task(100)));
    let p = pool();
    g.bench_function("existing_pool_apply_async", |b| {
        b.iter(|| {
            let rs = (0..100)
                .map(|i| p.apply_async(inc, i))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            for r in rs {
                black_box(r.get().unwrap());
            }
        })
    });
    g.bench_function("existing_pool_map", |b| {
        b.iter(|| black_box(p.map(inc, 0..100).unwrap()))
    });
    drop(p);
    g.bench_function("new_pool_map_close_join", |b| {
        b.iter(|| {
            let p = pool();
            black_box(p.map(inc, 0..100).unwrap());
            p.close();
            p.join().unwrap();
        })
    });
    g.finish();
}

fn apply_latency(c: &mut Criterion) {
    let p = pool();
    let mut g = c.benchmark_group("apply");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    g.bench_function("latency", |b| {
        b.iter(|| p.apply(inc, black_box(1)).unwrap())
    });
    g.finish();
}

fn apply_async_throughput(c: &mut Criterion) {
    const K: u64 = 10_000;
    let p = pool();
    let mut g = c.benchmark_group("apply_async");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(K));
    g.bench_function("10k_then_get", |b| {
        b.iter(|| {
            let rs = (0..K)
                .map(|i| p.apply_async(inc, i))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            for r in rs {
                black_box(r.get().unwrap());
            }
        })
    });
    g.finish();
}

fn map_family(c: &mut Criterion) {
    let p = pool();
    let mut g = c.benchmark_group("map");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat);
    const M: u64 = 1_000_000;
    g.throughput(Throughput::Elements(M));
    g.bench_function("map_1M_default_chunks", |b| {
        b.iter(|| black_box(p.map(inc, 0..M).unwrap()))
    });
    const K: u64 = 100_000;
    g.throughput(Throughput::Elements(K));
    g.bench_function("imap_unordered_100k_chunk1000", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for r in p.imap_unordered_with(inc, 0..K, MapOptions::new().chunksize(1000)) {
                black_box(r.unwrap());
                n += 1;
            }
            assert_eq!(n, K);
        })
    });
    g.finish();
}

fn echo_64mib(c: &mut Criterion) {
    const LEN: usize = 64 << 20;
    let p = pool();
    let mut g = c.benchmark_group("echo_64MiB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat);
    // Both ways: there and back.
    g.throughput(Throughput::Bytes(2 * LEN as u64));
    let bytes = ByteBuf::from(vec![b'x'; LEN]);
    g.bench_function("ByteBuf", |b| {
        b.iter_batched(
            || bytes.clone(),
            |arg| {
                let r = p.apply(echo_bytes, arg).unwrap();
                assert_eq!(r.len(), LEN);
                r
            },
            BatchSize::PerIteration,
        )
    });
    drop(bytes);
    g.finish();
    // A plain Vec<u8> goes through serde as a sequence of u8s, one call
    // per byte each way: the cost a caller pays without serde_bytes. About
    // a second an echo, hence the longer measurement time.
    let mut g = c.benchmark_group("echo_64MiB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(2 * LEN as u64));
    let vec = vec![b'x'; LEN];
    g.bench_function("Vec_u8", |b| {
        b.iter_batched(
            || vec.clone(),
            |arg| {
                let r = p.apply(echo_vec, arg).unwrap();
                assert_eq!(r.len(), LEN);
                r
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// From `build()` to a pool whose workers are all ready; the teardown
/// (close, join) is outside the timing.
fn startup(c: &mut Criterion) {
    let mut g = c.benchmark_group("startup");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    for n in [1usize, 2, 4] {
        g.bench_with_input(BenchmarkId::new("processes", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let p = Pool::builder().processes(n).build().unwrap();
                    total += t.elapsed();
                    p.close();
                    p.join().unwrap();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500));
    targets = spawn_vs_pool, apply_latency, apply_async_throughput, map_family, echo_64mib, startup
}
criterion_main!(benches);
