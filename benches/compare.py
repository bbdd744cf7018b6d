#!/usr/bin/env python3
"""Side-by-side figures: procpool's bench report against CPython's
multiprocessing.Pool on the same workloads, run alternately on this machine.

Usage (from anywhere in a clone; cargo runs in the repository's root):
    python3 benches/compare.py [--rounds 3] [--workers N] [--targets]
                               [--only NAME,NAME]

It runs `cargo run --release --example bench_report` (examples/bench_report.rs)
and benches/python/pool_bench.py alternately; both print `name: value` lines
with the same metric names (same workloads, same meaning). Ratios are 'times
better than CPython'. With --targets the exit status is 1 when a figure falls
below its floor. --only runs only the named figures on both sides (as
BENCH_ONLY=NAME,NAME does for each program), for a quick look.
START=forkserver in the environment runs CPython's side under its forkserver
start method (default: fork); WORKERS is set from --workers.
"""
import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
POOL_BENCH = os.path.join(HERE, "python", "pool_bench.py")

# metric: (higher_is_better, floor: the ratio over CPython this figure must
# not fall below; set a little under what the crate has reached, so that a
# regression shows through the noise of alternating runs)
METRICS = {
    "startup_s": (False, 2.0),
    "startup_fork_s": (False, 4.0),
    "apply_sync_us_per_task": (False, 10.0),
    "apply_async_tasks_per_s": (True, 12.0),
    "map_1M_items_per_s": (True, 3.0),
    "imap_unordered_1M_chunk1000_items_per_s": (True, 2.5),
    "echo_64MiB_GBps": (True, 3.0),
    "echo_64MiB_shared_GBps": (True, 20.0),
    "cpu_bound_speedup": (True, 0.95),
    "pool_map_100_incl_startup_s": (False, 4.0),
}

# Rows of ours that compare with another row of CPython's: the same work as
# a Python Pool user does it today (startup under the fork method; bytes
# echoed through the pool, which is how CPython moves them).
CPYTHON_ROW = {
    "startup_fork_s": "startup_s",
    "echo_64MiB_shared_GBps": "echo_64MiB_GBps",
}


def parse(text):
    out = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            try:
                out[k.strip()] = float(v.strip())
            except ValueError:
                pass
    return out


def run(cmd, env):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return parse(p.stdout)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--targets", action="store_true")
    ap.add_argument("--only", help="comma-separated metric names (default: all)")
    a = ap.parse_args()
    env = dict(os.environ, WORKERS=str(a.workers))
    metrics = METRICS
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            sys.exit(f"unknown metric(s): {', '.join(unknown)}; known: {', '.join(METRICS)}")
        metrics = {k: v for k, v in METRICS.items() if k in names}
        # Each side runs only what is compared (CPython's row for a row of ours
        # that compares with another, and the bare-process limit for the CPU row).
        wanted = set(names) | {CPYTHON_ROW.get(n, n) for n in names}
        if "cpu_bound_speedup" in names:
            wanted.add("cpu_bound_limit_speedup")
        env["BENCH_ONLY"] = ",".join(sorted(wanted))
    build = subprocess.run(["cargo", "build", "--release", "--example", "bench_report"], cwd=ROOT)
    if build.returncode != 0:
        sys.exit("cannot build the bench_report example")
    ours, py = [], []
    for _ in range(a.rounds):
        ours.append(run(["cargo", "run", "-q", "--release", "--example", "bench_report"], env))
        py.append(run([sys.executable, POOL_BENCH], env))
    short = 0
    print(f"{'metric':44} {'procpool':>12} {'CPython':>12} {'x better':>9} {'floor':>7}")
    for k, (higher, target) in metrics.items():
        o = [r[k] for r in ours if k in r]
        p = [r[CPYTHON_ROW.get(k, k)] for r in py if CPYTHON_ROW.get(k, k) in r]
        if not o or not p:
            print(f"{k:44} {'missing':>12}")
            short += 1
            continue
        mo, mp = statistics.median(o), statistics.median(p)
        ratio = (mo / mp if higher else mp / mo) if mo and mp else float("nan")
        if k == "cpu_bound_speedup":
            # Parallel efficiency, not a ratio over CPython: against the speedup
            # of N bare processes spinning the same work in the same run (the
            # machine's own limit) where the report gives it, else against N.
            lim = [r["cpu_bound_limit_speedup"] for r in ours if "cpu_bound_limit_speedup" in r]
            ratio = mo / statistics.median(lim) if lim else mo / a.workers
            if lim:
                print(f"{'  (limit: N bare processes)':44} {statistics.median(lim):12.4g}"
                      f" {'':12} {mo / a.workers:9.2f}  of N")
        ok = ratio >= target
        short += not ok
        print(f"{k:44} {mo:12.4g} {mp:12.4g} {ratio:9.2f} {target:7.2f}{'' if ok else '  <-'}")
    print(f"{short} of {len(metrics)} figures fall below their floor")
    if a.targets and short:
        sys.exit(1)


if __name__ == "__main__":
    main()
