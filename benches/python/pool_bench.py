"""Reference figures for CPython's multiprocessing.Pool on the workloads that
procpool's examples/bench_report.rs runs too; benches/compare.py runs both.

    python3 benches/python/pool_bench.py

WORKERS sets the worker count (default: the CPU count), START the start
method (default: fork), and BENCH_ONLY=name,name runs only the named
figures (as bench_report does).

Each figure, as both programs must compute it (WORKERS workers, default the
CPU count; medians over repetitions):
  startup_s               create a pool, run one task, close, join
  apply_sync_us_per_task  10,000 sequential apply(inc, i)
  apply_async_tasks_per_s 100,000 apply_async(inc, i), then get every result
  map_1M_items_per_s      map(inc, range(1_000_000)), default chunk size
  imap_unordered_1M_chunk1000_items_per_s   imap_unordered, chunk size 1000
  echo_64MiB_GBps         apply(echo, 64 MiB of bytes): 2 x 64 MiB / time
                          (Rust carries them as serde's byte string,
                          serde_bytes::ByteBuf, as Python carries bytes)
  cpu_bound_speedup       32 tasks of about 20 ms of CPU each: time run
                          sequentially in the caller / time through map with
                          chunk size 1 (the Rust program calibrates its spin
                          count so that one task takes about 20 ms)
  spawn_per_task_100_s    100 trivial tasks, one new process each
  pool_map_100_incl_startup_s   a new pool, map over 100, close, join
"""
import multiprocessing as mp
import os
import statistics
import sys
import time


def inc(x):
    return x + 1


def echo(b):
    return b


def spin(n):
    # ~CPU-bound work: n iterations of integer arithmetic
    s = 0
    for i in range(n):
        s = (s * 31 + i) & 0xFFFFFFFF
    return s


def noop():
    pass


def med(f, reps=5):
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def main():
    n = int(os.environ.get("WORKERS", os.cpu_count()))
    ctx = mp.get_context(os.environ.get("START", "fork"))
    only = os.environ.get("BENCH_ONLY")
    only = {x.strip() for x in only.split(",")} if only else None

    def want(name):
        return only is None or name in only

    out = {}

    def startup():
        p = ctx.Pool(n)
        p.apply(inc, (1,))
        p.close()
        p.join()

    if want("startup_s"):
        out["startup_s"] = med(startup)

    with ctx.Pool(n) as p:
        if want("apply_sync_us_per_task"):
            K = 10_000
            t = med(lambda: [p.apply(inc, (i,)) for i in range(K)], 3)
            out["apply_sync_us_per_task"] = t / K * 1e6

        if want("apply_async_tasks_per_s"):
            K = 100_000

            def asyncall():
                rs = [p.apply_async(inc, (i,)) for i in range(K)]
                [r.get() for r in rs]
            t = med(asyncall, 3)
            out["apply_async_tasks_per_s"] = K / t

        K = 1_000_000
        if want("map_1M_items_per_s"):
            t = med(lambda: p.map(inc, range(K)), 3)
            out["map_1M_items_per_s"] = K / t

        if want("imap_unordered_1M_chunk1000_items_per_s"):
            t = med(lambda: sum(1 for _ in p.imap_unordered(inc, range(K), chunksize=1000)), 3)
            out["imap_unordered_1M_chunk1000_items_per_s"] = K / t

        if want("echo_64MiB_GBps"):
            payload = b"x" * (64 << 20)
            t = med(lambda: p.apply(echo, (payload,)), 3)
            out["echo_64MiB_GBps"] = 2 * len(payload) / t / 1e9

        if want("cpu_bound_speedup"):
            work = [200_000] * 32
            t_seq = med(lambda: [spin(w) for w in work], 3)
            t_par = med(lambda: p.map(spin, work, chunksize=1), 3)
            out["cpu_bound_speedup"] = t_seq / t_par

    def per_task_process():
        ps = [ctx.Process(target=noop) for _ in range(100)]
        for q in ps:
            q.start()
        for q in ps:
            q.join()

    def pool_100():
        with ctx.Pool(n) as p:
            p.map(inc, range(100))

    if want("spawn_per_task_100_s"):
        out["spawn_per_task_100_s"] = med(per_task_process)
    if want("pool_map_100_incl_startup_s"):
        out["pool_map_100_incl_startup_s"] = med(pool_100)
    print(f"python {sys.version.split()[0]} workers={n} start={ctx.get_start_method()}")
    for k, v in out.items():
        print(f"{k}: {v:.4g}")


if __name__ == "__main__":
    main()
