//! The figures of `benches/python/pool_bench.py` (CPython's
//! `multiprocessing.Pool`) for procpool: the same workloads, sizes,
//! repetition counts and medians, printed as the same `name: value` lines so
//! that `benches/compare.py` can put the two side by side.
//!
//!     cargo run --release --example bench_report
//!
//! `WORKERS` sets the worker count (default: the CPU count). For profiling,
//! `BENCH_ONLY=name,name` runs only the named figures (the names printed
//! below; `imap_10M_peak_rss_mb` included).
//!
//! Each figure, as pool_bench.py computes it:
//!   startup_s                 new pool, one apply, close, join (median of 5),
//!                             with the default start method (an exec'd server)
//!   startup_fork_s            the same with StartMethod::Fork
//!   apply_sync_us_per_task    10,000 sequential apply(inc, i) (median of 3)
//!   apply_async_tasks_per_s   100,000 apply_async(inc, i), then get each
//!   map_1M_items_per_s        map(inc, 0..1_000_000), default chunk size
//!   imap_unordered_1M_chunk1000_items_per_s   chunk size 1000
//!
//! and figures that pool_bench.py lacks (compare.py ignores them):
//!   imap_1M_default_items_per_s   imap(inc, 0..1_000_000) with no chunk
//!                             size: chunks the pool sizes itself
//!   imap_unordered_1M_default_items_per_s   the same, imap_unordered
//!   imap_mixed_1000_default_over_chunk1   1,000 items of which every
//!                             tenth sleeps 10 ms: the time with no chunk
//!                             size over the time with chunk size 1
//!                             (medians of 3, run alternately)
//!   imap_slow_input_first_result_ms   an input that takes 10 ms to yield
//!                             each item: from imap() to its first result
//!                             (median of 5)
//!
//! and from pool_bench.py again:
//!   echo_64MiB_GBps           apply(echo, 64 MiB ByteBuf): 2 x 64 MiB / time
//!   echo_64MiB_shared_GBps    one 64 MiB SharedBuf, made and sent once
//!                             before the clock, then sent again and again
//!                             (as a pipeline reuses its buffers): the
//!                             worker writes every byte and returns it;
//!                             2 x 64 MiB / time (median of 5). compare.py
//!                             puts it beside CPython's echo of 64 MiB.
//!   echo_64MiB_shared_fresh_GBps   the same with a new buffer each time
//!                             (made and dropped inside the timing, so its
//!                             pages are faulted in fresh; median of 3)
//!   echo_64MiB_vec_GBps       apply(echo, 64 MiB Vec<u8>): serde sees a
//!                             sequence of u8s (median of 3)
//!   cpu_bound_speedup         32 tasks of ~20 ms of CPU: sequential in the
//!                             caller / through map_with(chunksize 1)
//!   cpu_bound_limit_speedup   the same 32 tasks in N bare forked processes
//!                             (no pool; each runs its share and _exits):
//!                             sequential / that time, the machine's own
//!                             limit in the same run, measured alternately
//!                             with the pool's (compare.py reports the
//!                             pool's speedup as a fraction of it)
//!   spawn_per_task_100_s      100 trivial tasks, one fork()ed process each
//!                             (fork + _exit + waitpid, as Python's fork start
//!                             method: no exec)
//!   pool_map_100_incl_startup_s   new pool, map over 100, close, join
//!
//! and figures that pool_bench.py lacks (compare.py ignores them):
//!   startup_sandbox_s         startup_s with a Sandbox (every cap set;
//!                             StartMethod::ForkServer)
//!   (the sandboxed rows use 2 workers, whatever WORKERS says; each task
//!   in a process of its own, as the sandbox's default is)
//!   apply_spare_sandbox_us    one apply after 20 ms idle, when a fresh
//!                             worker is ready for it (median of 200)
//!   apply_sync_sandbox_us_per_task   1,000 applies back to back (each
//!                             waits for a fresh worker)
//!   apply_async_sandbox_tasks_per_s  2,000 apply_async, then every get
//!   echo_64MiB_sandbox_GBps   echo_64MiB_GBps in that pool (fresh, sealed
//!                             blocks: none is reused)
//!   apply_sync_sandbox_reuse_us_per_task   10,000 applies back to back
//!                             with Sandbox::tasks_per_worker(u64::MAX)
//!   output_apply_{inherit,lines}_us_per_task   10,000 sequential apply of
//!                             a task that writes one line (40 bytes) to
//!                             stderr, in a pool whose stderr is
//!                             Output::Inherit, then Output::Lines (the
//!                             line through the pool), alternately (median
//!                             of 3 each); the program's stderr points at
//!                             /dev/null meanwhile
//!   output_map_100k_{inherit,lines}_items_per_s   map over 100,000 items,
//!                             one such line each, the same way
//!   imap_10M_peak_rss_mb      the caller's peak RSS (VmHWM, MiB) while a
//!                             fresh pool runs imap_unordered over 10 M items
//!                             (chunk 1000); the peak is reset first through
//!                             /proc/self/clear_refs, so it is that
//!                             workload's own peak (baseline RSS included).
//!                             Runs last.
use procpool::{MapOptions, Pool, SharedBuf};
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::{Duration, Instant};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn inc(x: u64) -> u64 {
    x + 1
}

/// Every tenth item sleeps 10 ms; the others are instant.
fn tenth_sleeps(x: u64) -> u64 {
    if x % 10 == 9 {
        std::thread::sleep(Duration::from_millis(10));
    }
    x
}

fn echo(b: ByteBuf) -> ByteBuf {
    b
}

/// `inc`, with a line of 40 bytes to stderr, in one write (as a logger
/// writes a record it has formatted: `eprintln!` itself may write a piece
/// at a time, a byte at a time for padding).
fn inc_say(x: u64) -> u64 {
    use std::io::Write;
    let line = format!("item {x:>12} done, all is well here\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    x + 1
}

fn echo_vec(b: Vec<u8>) -> Vec<u8> {
    b
}

/// Writes every byte of the buffer (a pass over it, as a task that fills
/// an output buffer does) and gives it back.
fn fill_shared(mut b: SharedBuf) -> SharedBuf {
    let n = b.len();
    let s = b.as_mut_slice();
    s.fill(b'y');
    s[n - 1] = b'z';
    b
}

/// The arithmetic of pool_bench.py's `spin`: n rounds of
/// `s = (s * 31 + i) & 0xFFFFFFFF`; black_box keeps every round.
fn spin(n: u64) -> u64 {
    let mut s: u64 = 0;
    for i in 0..n {
        s = black_box((s.wrapping_mul(31).wrapping_add(i)) & 0xFFFF_FFFF);
    }
    s
}

/// The median of `reps` timings of `f`, in seconds.
fn med(reps: usize, mut f: impl FnMut() -> BoxResult<()>) -> BoxResult<f64> {
    let mut xs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        xs.push(t.elapsed().as_secs_f64());
    }
    Ok(median(xs))
}

/// Python's statistics.median: the mean of the middle two for an even count.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Python's `format(v, ".4g")`.
fn g4(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.abs().log10().floor() as i32;
    // Rounding to 4 digits can carry into the next power of ten.
    let e = format!("{v:.3e}");
    let (mant, ex) = e.split_once('e').expect("{:e} has an exponent");
    let ex: i32 = ex.parse().unwrap_or(exp);
    let strip = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..4).contains(&ex) {
        let sign = if ex < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mant), ex.abs())
    } else {
        let decimals = (3 - ex).max(0) as usize;
        strip(&format!("{v:.decimals$}"))
    }
}

/// A spin count for about `target` of CPU in this process: the fastest of a
/// few timings (the machine is shared; the minimum is the least disturbed).
fn calibrate(target: Duration) -> u64 {
    let mut n: u64 = 100_000;
    loop {
        let t = Instant::now();
        black_box(spin(black_box(n)));
        if t.elapsed() >= Duration::from_millis(20) {
            break;
        }
        n *= 2;
    }
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            black_box(spin(black_box(n)));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    ((n as f64) * target.as_secs_f64() / best).round().max(1.0) as u64
}

/// `field` of /proc/self/status (a `kB` figure), in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// 100 children, one per trivial task, started all before any is waited
/// for (as pool_bench.py starts 100 `Process`es, then joins them). Each
/// runs the no-op task and `_exit`s: after a fork in a process that may
/// have threads, the child does only async-signal-safe work.
fn spawn_per_task(n: usize) -> BoxResult<()> {
    fn noop() {}
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: the child calls only a no-op and _exit, which is
        // async-signal-safe; the parent only records the pid.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => return Err(std::io::Error::last_os_error().into()),
            0 => {
                noop();
                // SAFETY: _exit never returns and runs no atexit handlers.
                unsafe { libc::_exit(0) }
            }
            p => pids.push(p),
        }
    }
    for p in pids {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; p is our unreaped child.
        let r = unsafe { libc::waitpid(p, &mut status, 0) };
        if r != p || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("child {p}: waitpid {r}, status {status:#x}").into());
        }
    }
    Ok(())
}

/// The 32 spinning tasks of `cpu_bound_speedup` in `n` bare processes: each
/// child runs every n-th task and `_exit`s; no pool, no result. The time
/// is the machine's limit for this work in parallel.
fn bare_parallel(work: &[u64], n: usize) -> BoxResult<()> {
    let mut pids = Vec::with_capacity(n);
    for k in 0..n {
        // SAFETY: the child only spins (pure arithmetic on its stack: no
        // allocation, no lock) and calls _exit, so the threads this process
        // may have do not matter.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => return Err(std::io::Error::last_os_error().into()),
            0 => {
                for &w in work.iter().skip(k).step_by(n) {
                    black_box(spin(black_box(w)));
                }
                // SAFETY: _exit never returns and runs no atexit handlers.
                unsafe { libc::_exit(0) }
            }
            p => pids.push(p),
        }
    }
    for p in pids {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; p is our unreaped child.
        let r = unsafe { libc::waitpid(p, &mut status, 0) };
        if r != p || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("child {p}: waitpid {r}, status {status:#x}").into());
        }
    }
    Ok(())
}

/// `k` synchronous applies back to back: microseconds per apply (median
/// of 3).
fn sync_apply_us(p: &Pool, k: u64) -> BoxResult<f64> {
    let t = med(3, || {
        for i in 0..k {
            black_box(p.apply(inc, i)?);
        }
        Ok(())
    })?;
    Ok(t / k as f64 * 1e6)
}

/// The sandboxed pool's rows, in a pinned configuration: 2 workers,
/// every cap set, no initializer, whatever WORKERS says.
fn sandbox_rows(want: &dyn Fn(&str) -> bool, out: &mut Vec<(&'static str, f64)>) -> BoxResult<()> {
    let sandbox = || {
        procpool::Sandbox::new()
            .memory_limit(1 << 30)
            .cpu_time_per_task(Duration::from_secs(10))
            .open_files(64)
            .file_size_limit(1 << 30)
    };
    let sandboxed = |s: procpool::Sandbox| {
        Pool::builder()
            .processes(2)
            .start_method(procpool::StartMethod::ForkServer)
            .sandbox(s)
            .build()
    };
    if want("startup_sandbox_s") {
        let t = med(5, || {
            let p = sandboxed(sandbox())?;
            assert_eq!(p.apply(inc, 1)?, 2);
            p.close();
            p.join()?;
            Ok(())
        })?;
        out.push(("startup_sandbox_s", t));
    }
    let p = sandboxed(sandbox())?;
    if want("apply_spare_sandbox_us") {
        // An apply that finds a worker ready: the pool is idle a moment
        // between calls, so the worker the last task used is replaced.
        let mut xs = Vec::new();
        for i in 0..200 {
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            black_box(p.apply(inc, i)?);
            xs.push(t.elapsed().as_secs_f64());
        }
        out.push(("apply_spare_sandbox_us", median(xs) * 1e6));
    }
    if want("apply_sync_sandbox_us_per_task") {
        out.push(("apply_sync_sandbox_us_per_task", sync_apply_us(&p, 1_000)?));
    }
    if want("apply_async_sandbox_tasks_per_s") {
        const K: u64 = 2_000;
        let t = med(3, || {
            let rs: Vec<_> = (0..K)
                .map(|i| p.apply_async(inc, i))
                .collect::<Result<_, _>>()?;
            for r in rs {
                black_box(r.get()?);
            }
            Ok(())
        })?;
        out.push(("apply_async_sandbox_tasks_per_s", K as f64 / t));
    }
    if want("echo_64MiB_sandbox_GBps") {
        let buf = ByteBuf::from(vec![7u8; 64 << 20]);
        let t = med(3, || {
            let r = p.apply(echo, buf.clone())?;
            assert_eq!(r.len(), 64 << 20);
            Ok(())
        })?;
        out.push(("echo_64MiB_sandbox_GBps", 2.0 * (64 << 20) as f64 / t / 1e9));
    }
    drop(p);
    if want("apply_sync_sandbox_reuse_us_per_task") {
        let p = sandboxed(sandbox().tasks_per_worker(u64::MAX))?;
        out.push((
            "apply_sync_sandbox_reuse_us_per_task",
            sync_apply_us(&p, 10_000)?,
        ));
    }
    Ok(())
}

/// The imap rows without a chunk size (see the module docs).
fn imap_default_rows(
    p: &Pool,
    want: &dyn Fn(&str) -> bool,
    out: &mut Vec<(&'static str, f64)>,
) -> BoxResult<()> {
    const M: u64 = 1_000_000;
    if want("imap_1M_default_items_per_s") {
        let t = med(3, || {
            let mut last = 0;
            for r in p.imap(inc, 0..M) {
                last = black_box(r?);
            }
            assert_eq!(last, M);
            Ok(())
        })?;
        out.push(("imap_1M_default_items_per_s", M as f64 / t));
    }
    if want("imap_unordered_1M_default_items_per_s") {
        let t = med(3, || {
            let mut count = 0u64;
            for r in p.imap_unordered(inc, 0..M) {
                black_box(r?);
                count += 1;
            }
            assert_eq!(count, M);
            Ok(())
        })?;
        out.push(("imap_unordered_1M_default_items_per_s", M as f64 / t));
    }
    if want("imap_mixed_1000_default_over_chunk1") {
        let run = |opts: MapOptions<u64>| -> BoxResult<f64> {
            let t = Instant::now();
            let mut count = 0;
            for r in p.imap_with(tenth_sleeps, 0..1000u64, opts) {
                black_box(r?);
                count += 1;
            }
            assert_eq!(count, 1000);
            Ok(t.elapsed().as_secs_f64())
        };
        let (mut auto, mut one) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            auto.push(run(MapOptions::new())?);
            one.push(run(MapOptions::new().chunksize(1))?);
        }
        out.push((
            "imap_mixed_1000_default_over_chunk1",
            median(auto) / median(one),
        ));
    }
    if want("imap_slow_input_first_result_ms") {
        let mut xs = Vec::new();
        for _ in 0..5 {
            let slow = (0..50u64).inspect(|_| std::thread::sleep(Duration::from_millis(10)));
            let t = Instant::now();
            let mut it = p.imap(inc, slow);
            black_box(it.next().ok_or("no first result")??);
            xs.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push(("imap_slow_input_first_result_ms", median(xs)));
    }
    Ok(())
}

/// The program's stderr pointed at `/dev/null` until dropped (the output
/// rows' workers write there, through the pool or not).
struct StderrToNull(libc::c_int);

impl StderrToNull {
    fn new() -> BoxResult<StderrToNull> {
        // SAFETY: dup of fd 2, open of a static NUL-terminated path, and
        // dup2 of that fd onto 2: plain fd calls on fds this process owns.
        unsafe {
            let saved = libc::dup(2);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if saved < 0 || null < 0 || libc::dup2(null, 2) < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            libc::close(null);
            Ok(StderrToNull(saved))
        }
    }
}

impl Drop for StderrToNull {
    fn drop(&mut self) {
        // SAFETY: puts back the fd saved by `new`, which this owns.
        unsafe {
            libc::dup2(self.0, 2);
            libc::close(self.0);
        }
    }
}

/// The output rows: `apply` latency and `map` throughput of a task that
/// writes a line to stderr, the line straight to the program's stderr
/// (Inherit) or through the pool (Lines), measured alternately.
fn output_rows(
    n: usize,
    want: &dyn Fn(&str) -> bool,
    out: &mut Vec<(&'static str, f64)>,
) -> BoxResult<()> {
    let (apply, map) = (
        want("output_apply_inherit_us_per_task") || want("output_apply_lines_us_per_task"),
        want("output_map_100k_inherit_items_per_s") || want("output_map_100k_lines_items_per_s"),
    );
    if !apply && !map {
        return Ok(());
    }
    let quiet = StderrToNull::new()?;
    let pools = [procpool::Output::Inherit, procpool::Output::Lines]
        .map(|o| Pool::builder().processes(n).stderr(o).build());
    let [inherit, lines] = pools;
    let pools = [inherit?, lines?];
    const K: u64 = 10_000;
    const M: u64 = 100_000;
    let (mut applies, mut maps) = ([vec![], vec![]], [vec![], vec![]]);
    for _ in 0..3 {
        for (i, p) in pools.iter().enumerate() {
            if apply {
                let t = Instant::now();
                for x in 0..K {
                    black_box(p.apply(inc_say, x)?);
                }
                applies[i].push(t.elapsed().as_secs_f64() / K as f64 * 1e6);
            }
            if map {
                let t = Instant::now();
                assert_eq!(p.map(inc_say, 0..M)?.len(), M as usize);
                maps[i].push(M as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    drop(pools);
    drop(quiet);
    let [ai, al] = applies;
    let [mi, ml] = maps;
    if apply {
        out.push(("output_apply_inherit_us_per_task", median(ai)));
        out.push(("output_apply_lines_us_per_task", median(al)));
    }
    if map {
        out.push(("output_map_100k_inherit_items_per_s", median(mi)));
        out.push(("output_map_100k_lines_items_per_s", median(ml)));
    }
    Ok(())
}

fn main() -> BoxResult<()> {
    let n: usize = match std::env::var("WORKERS") {
        Ok(v) => v.trim().parse()?,
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let mut out: Vec<(&str, f64)> = Vec::new();

    if want("startup_s") {
        let t = med(5, || {
            let p = Pool::builder().processes(n).build()?;
            assert_eq!(p.apply(inc, 1)?, 2);
            p.close();
            p.join()?;
            Ok(())
        })?;
        out.push(("startup_s", t));
    }

    if want("startup_fork_s") {
        let t = med(5, || {
            let p = Pool::builder()
                .processes(n)
                .start_method(procpool::StartMethod::Fork)
                .build()?;
            assert_eq!(p.apply(inc, 1)?, 2);
            p.close();
            p.join()?;
            Ok(())
        })?;
        out.push(("startup_fork_s", t));
    }

    sandbox_rows(&want, &mut out)?;

    {
        let p = Pool::builder().processes(n).build()?;

        if want("apply_sync_us_per_task") {
            out.push(("apply_sync_us_per_task", sync_apply_us(&p, 10_000)?));
        }

        if want("apply_async_tasks_per_s") {
            const K: u64 = 100_000;
            let t = med(3, || {
                let rs = (0..K)
                    .map(|i| p.apply_async(inc, i))
                    .collect::<Result<Vec<_>, _>>()?;
                for r in rs {
                    black_box(r.get()?);
                }
                Ok(())
            })?;
            out.push(("apply_async_tasks_per_s", K as f64 / t));
        }

        const M: u64 = 1_000_000;
        if want("map_1M_items_per_s") {
            let t = med(3, || {
                let v = p.map(inc, 0..M)?;
                assert_eq!((v.len(), v[v.len() - 1]), (M as usize, M));
                Ok(())
            })?;
            out.push(("map_1M_items_per_s", M as f64 / t));
        }

        if want("imap_unordered_1M_chunk1000_items_per_s") {
            let t = med(3, || {
                let mut count = 0u64;
                for r in p.imap_unordered_with(inc, 0..M, MapOptions::new().chunksize(1000)) {
                    black_box(r?);
                    count += 1;
                }
                assert_eq!(count, M);
                Ok(())
            })?;
            out.push(("imap_unordered_1M_chunk1000_items_per_s", M as f64 / t));
        }

        imap_default_rows(&p, &want, &mut out)?;

        if want("echo_64MiB_GBps") {
            let payload = ByteBuf::from(vec![b'x'; 64 << 20]);
            // `apply` takes its argument by value, where Python passes a
            // reference: the copy for each repetition is made before the
            // clock starts. Dropping the returned buffer is timed, as
            // Python frees its result inside the timing too.
            let mut xs = Vec::with_capacity(3);
            for _ in 0..3 {
                let arg = payload.clone();
                let t = Instant::now();
                let r = p.apply(echo, arg)?;
                assert_eq!(r.len(), payload.len());
                drop(r);
                xs.push(t.elapsed().as_secs_f64());
            }
            out.push((
                "echo_64MiB_GBps",
                2.0 * payload.len() as f64 / median(xs) / 1e9,
            ));
        }

        if want("echo_64MiB_shared_GBps") {
            const LEN: usize = 64 << 20;
            // Made once and sent once before the clock: its pages exist
            // and are mapped in the caller, as in a pipeline's steady state.
            let mut buf = Some(p.apply(fill_shared, SharedBuf::new(LEN)?)?);
            let mut xs = Vec::with_capacity(5);
            for _ in 0..5 {
                let arg = buf.take().expect("the buffer came back");
                let t = Instant::now();
                let r = p.apply(fill_shared, arg)?;
                xs.push(t.elapsed().as_secs_f64());
                assert_eq!(r.len(), LEN);
                assert_eq!(r.as_slice()[LEN - 1], b'z');
                buf = Some(r);
            }
            out.push((
                "echo_64MiB_shared_GBps",
                2.0 * LEN as f64 / median(xs) / 1e9,
            ));
        }

        if want("echo_64MiB_shared_fresh_GBps") {
            const LEN: usize = 64 << 20;
            let t = med(3, || {
                let r = p.apply(fill_shared, SharedBuf::new(LEN)?)?;
                assert_eq!(r.as_slice()[LEN - 1], b'z');
                drop(r);
                Ok(())
            })?;
            out.push(("echo_64MiB_shared_fresh_GBps", 2.0 * LEN as f64 / t / 1e9));
        }

        if want("echo_64MiB_vec_GBps") {
            let payload = vec![b'x'; 64 << 20];
            // As the ByteBuf echo: the copy for each repetition is made
            // before the clock starts; dropping the result is timed.
            let mut xs = Vec::with_capacity(3);
            for _ in 0..3 {
                let arg = payload.clone();
                let t = Instant::now();
                let r = p.apply(echo_vec, arg)?;
                assert_eq!(r.len(), payload.len());
                drop(r);
                xs.push(t.elapsed().as_secs_f64());
            }
            out.push((
                "echo_64MiB_vec_GBps",
                2.0 * payload.len() as f64 / median(xs) / 1e9,
            ));
        }

        if want("cpu_bound_speedup") || want("cpu_bound_limit_speedup") {
            let per_task = calibrate(Duration::from_millis(20));
            let work = vec![per_task; 32];
            let t_seq = med(3, || {
                black_box(work.iter().map(|&w| spin(w)).collect::<Vec<_>>());
                Ok(())
            })?;
            // The pool and the bare processes alternately, so that both
            // see the machine in the same state.
            let (mut pars, mut bares) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let t = Instant::now();
                bare_parallel(&work, n)?;
                bares.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let v = p.map_with(spin, work.iter().copied(), MapOptions::new().chunksize(1))?;
                pars.push(t.elapsed().as_secs_f64());
                assert_eq!(v.len(), work.len());
            }
            out.push(("cpu_bound_speedup", t_seq / median(pars)));
            out.push(("cpu_bound_limit_speedup", t_seq / median(bares)));
        }
        // As pool_bench.py's `with` block: the pool ends here.
    }

    output_rows(n, &want, &mut out)?;

    if want("spawn_per_task_100_s") {
        out.push(("spawn_per_task_100_s", med(5, || spawn_per_task(100))?));
    }

    if want("pool_map_100_incl_startup_s") {
        let t = med(5, || {
            let p = Pool::builder().processes(n).build()?;
            assert_eq!(p.map(inc, 0..100)?.len(), 100);
            p.close();
            p.join()?;
            Ok(())
        })?;
        out.push(("pool_map_100_incl_startup_s", t));
    }

    if want("imap_10M_peak_rss_mb") {
        // Reset VmHWM to the current RSS (Linux 4.0+), so the peak read
        // afterwards is this workload's, not the 64 MiB echo's.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let p = Pool::builder().processes(n).build()?;
        let mut count = 0u64;
        for r in p.imap_unordered_with(inc, 0..10_000_000u64, MapOptions::new().chunksize(1000)) {
            black_box(r?);
            count += 1;
        }
        assert_eq!(count, 10_000_000);
        drop(p);
        if !reset {
            eprintln!(
                "bench_report: could not reset VmHWM; imap_10M_peak_rss_mb is the run's peak"
            );
        }
        if let Some(hwm) = status_mib("VmHWM:") {
            out.push(("imap_10M_peak_rss_mb", hwm));
        }
    }

    // No colon in the header: compare.py reads only `name: number` lines.
    println!(
        "procpool {} workers={n} start={:?}",
        env!("CARGO_PKG_VERSION"),
        procpool::StartMethod::from_env()?
    );
    for (k, v) in out {
        println!("{k}: {}", g4(v));
    }
    Ok(())
}
