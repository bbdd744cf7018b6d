//! Criterion benchmarks for procpool: a pool against a process per task,
//! apply latency, apply_async / map / imap_unordered throughput, a 64 MiB
//! echo, and start-up by worker count.
//!
//!     cargo bench --bench pool
//!     cargo bench --bench pool -- echo      # one group
//!
//! The process-per-task baselines are what a Rust program without procpool
//! would do for the same trivial task (`x + 1` on a `u64`), with as many
//! processes at a time as the pool has workers:
//! - `command_per_task`: `std::process::Command` re-runs this bench binary
//!   in a helper mode (`PROCPOOL_BENCH_HELPER=inc`, handled first thing in
//!   `main`) that reads the argument from its command line and prints the
//!   result, which the parent reads from its stdout and parses;
//! - `procspawn_per_task`: `procspawn::spawn` per task (procspawn re-runs
//!   the binary too; `main` calls `procspawn::init()` for it);
//! - `fork_per_task`: a bare `fork()` and `_exit`, which returns no result:
//!   the floor of any process per task.
//!
//! Each against the same 100 and 10,000 tasks through a running pool.
//!
//! Sample sizes and measurement times are small so that the whole run takes
//! a few minutes on a 2-core machine; the figures are for spotting large
//! changes, not small ones. `examples/bench_report.rs` gives the figures that
//! compare against CPython's multiprocessing.Pool.
use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group};
use procpool::{MapOptions, Pool, SharedBuf};
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

/// Writes every byte and gives the buffer back.
fn fill_shared(mut b: SharedBuf) -> SharedBuf {
    b.as_mut_slice().fill(b'y');
    b
}

/// The environment variable that turns this binary into the helper of
/// `command_per_task`.
const HELPER: &str = "PROCPOOL_BENCH_HELPER";

/// In the helper mode: reads the argument, prints `inc(argument)`, exits.
fn helper_main() {
    let x: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("the helper's argument");
    println!("{}", inc(x));
}

/// `n` tasks, a process each, `width` at a time: `std::process::Command`
/// runs this binary as the helper and the result is parsed from its stdout.
fn command_per_task(n: u64, width: usize) {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().expect("current_exe");
    let mut running = std::collections::VecDeque::with_capacity(width);
    let finish = |c: (u64, std::process::Child)| {
        let (i, child) = c;
        let out = child.wait_with_output().expect("waiting for a helper");
        assert!(out.status.success());
        let v: u64 = std::str::from_utf8(&out.stdout)
            .expect("utf-8")
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(v, i + 1);
    };
    for i in 0..n {
        if running.len() == width {
            finish(running.pop_front().expect("one runs"));
        }
        let child = Command::new(&exe)
            .arg(i.to_string())
            .env(HELPER, "inc")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning a helper");
        running.push_back((i, child));
    }
    for c in running {
        finish(c);
    }
}

/// `n` tasks, a `procspawn::spawn` each, `width` at a time.
fn procspawn_per_task(n: u64, width: usize) {
    let mut running = std::collections::VecDeque::with_capacity(width);
    let finish = |(i, h): (u64, procspawn::JoinHandle<u64>)| {
        assert_eq!(h.join().expect("a procspawn result"), i + 1);
    };
    for i in 0..n {
        if running.len() == width {
            finish(running.pop_front().expect("one runs"));
        }
        running.push_back((i, procspawn::spawn(i, inc)));
    }
    for h in running {
        finish(h);
    }
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

/// 100 and 10,000 trivial tasks: a process each (three ways), through a
/// running pool, and (100 only) through a pool started, closed and joined
/// for them.
fn spawn_vs_pool(c: &mut Criterion) {
    spawn_vs_pool_n(c, 100);
    spawn_vs_pool_n(c, 10_000);
}

fn spawn_vs_pool_n(c: &mut Criterion, n: u64) {
    let mut g = c.benchmark_group(format!("tasks_{n}"));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(n));
    let w = workers();
    g.bench_function("command_per_task", |b| b.iter(|| command_per_task(n, w)));
    g.bench_function("procspawn_per_task", |b| {
        b.iter(|| procspawn_per_task(n, w))
    });
    g.bench_function("fork_per_task", |b| b.iter(|| fork_per_task(n as usize)));
    let p = pool();
    g.bench_function("existing_pool_apply_async", |b| {
        b.iter(|| {
            let rs = (0..n)
                .map(|i| p.apply_async(inc, i))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            for r in rs {
                black_box(r.get().unwrap());
            }
        })
    });
    g.bench_function("existing_pool_map", |b| {
        b.iter(|| black_box(p.map(inc, 0..n).unwrap()))
    });
    drop(p);
    if n <= 100 {
        g.bench_function("new_pool_map_close_join", |b| {
            b.iter(|| {
                let p = pool();
                black_box(p.map(inc, 0..n).unwrap());
                p.close();
                p.join().unwrap();
            })
        });
    }
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
    // A SharedBuf goes by reference: one buffer sent again and again (its
    // pages warm, as in a pipeline), and a new one each time. The worker
    // writes every byte.
    let mut buf = Some(p.apply(fill_shared, SharedBuf::new(LEN).unwrap()).unwrap());
    g.bench_function("SharedBuf_reused", |b| {
        b.iter(|| {
            let r = p.apply(fill_shared, buf.take().unwrap()).unwrap();
            assert_eq!(r.len(), LEN);
            buf = Some(r);
        })
    });
    drop(buf);
    g.bench_function("SharedBuf_fresh", |b| {
        b.iter(|| {
            let r = p.apply(fill_shared, SharedBuf::new(LEN).unwrap()).unwrap();
            assert_eq!(r.len(), LEN);
            r
        })
    });
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

// What `criterion_main!(benches)` expands to, after the two ways this
// binary runs as a child: the helper of `command_per_task`, and
// procspawn's (`init` runs the spawned function and exits in its children).
fn main() {
    if std::env::var_os(HELPER).is_some() {
        helper_main();
        return;
    }
    procspawn::init();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
