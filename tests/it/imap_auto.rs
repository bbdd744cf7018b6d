//! `imap` and `imap_unordered` without a chunk size: the pool sizes the
//! chunks itself (issue 23). Every item comes back (in order, for `imap`);
//! a crash fails only the item that ran; with a timeout or retries, in a
//! sandboxed pool, and with an explicit chunk size, items are chunked as
//! before.
//!
//! Which items shared a chunk is seen through `max_tasks_per_child(1)`: each
//! chunk then runs in a process of its own, and a task that returns its
//! process's pid and how many items have run in that process tells the
//! chunks apart, with no clock.

use crate::common;

use procpool::{Error, MapOptions, Pool, Sandbox, StartMethod, Task};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(240);

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

static RUNS_HERE: AtomicU64 = AtomicU64::new(0);

/// This process's pid, and how many items have run in it (this one
/// included).
fn pid_and_runs(_: u64) -> (u32, u64) {
    (
        std::process::id(),
        RUNS_HERE.fetch_add(1, Ordering::SeqCst) + 1,
    )
}

/// Items that abort their worker.
const CRASHES: [u64; 2] = [60_001, 140_000];

fn abort_on_some(x: u64) -> u64 {
    if CRASHES.contains(&x) {
        // No core file for a crash on purpose.
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives
        // across the call.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
        std::process::abort();
    }
    x + 1
}

/// A pool of one worker that runs one task (one chunk) per process.
fn one_task_per_process() -> Pool {
    Pool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .build()
        .expect("building the pool")
}

/// The processes that ran `got` (one `pid_and_runs` per item, in input
/// order) and how many items each ran. Checks that each process ran a
/// run of consecutive items, counting from 1: one chunk each.
fn chunks(got: &[(u32, u64)]) -> BTreeMap<u32, u64> {
    let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
    let mut last: Option<u32> = None;
    for &(pid, runs) in got {
        let n = per_pid.entry(pid).or_default();
        *n += 1;
        assert_eq!(
            runs, *n,
            "process {pid} ran items out of one chunk: {got:?}"
        );
        if *n > 1 {
            assert_eq!(last, Some(pid), "a chunk's items were not consecutive");
        }
        last = Some(pid);
    }
    per_pid
}

/// Options for `pid_and_runs`, made afresh for each use.
type Opts = fn() -> MapOptions<(u32, u64)>;

fn imap_pids(pool: &Pool, n: u64, opts: MapOptions<(u32, u64)>) -> Vec<(u32, u64)> {
    pool.imap_with(pid_and_runs, 0..n, opts)
        .collect::<Result<_, _>>()
        .expect("every item")
}

#[test]
fn without_a_chunk_size_every_item_comes_back_in_order() {
    common::bounded_for(BOUND, || {
        let pool = common::pool(2);
        const N: u64 = 300_000;
        let want: Vec<u64> = (0..N).map(square).collect();
        for round in 0..2 {
            let got: Vec<u64> = pool.imap(square, 0..N).collect::<Result<_, _>>().unwrap();
            assert!(got == want, "round {round}: imap's values or order differ");
            let mut got: Vec<u64> = pool
                .imap_unordered(square, 0..N)
                .collect::<Result<_, _>>()
                .unwrap();
            got.sort_unstable();
            let mut sorted = want.clone();
            sorted.sort_unstable();
            assert!(
                got == sorted,
                "round {round}: imap_unordered lost or repeated items"
            );
        }
        // An endless input, taken in part, then the pool goes on.
        let got: Vec<u64> = pool
            .imap(square, 0u64..)
            .take(50_000)
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(got == want[..50_000]);
        assert_eq!(pool.apply(square, 9).unwrap(), 81);
    })
}

#[test]
fn without_a_chunk_size_chunks_grow_from_one_item() {
    common::bounded_for(BOUND, || {
        let pool = one_task_per_process();
        // The first item goes alone, before anything is known of the task.
        let first = imap_pids(&pool, 1, MapOptions::new());
        assert_eq!(first[0].1, 1);
        // Once its run time is known, tiny items share chunks.
        let got = imap_pids(&pool, 3000, MapOptions::new());
        assert_eq!(got.len(), 3000);
        let per_pid = chunks(&got);
        assert!(
            per_pid.len() < 3000 && per_pid.values().any(|&n| n > 1),
            "every item went alone"
        );
        assert_eq!(per_pid.values().sum::<u64>(), 3000);
    })
}

#[test]
fn with_a_timeout_or_retries_items_go_alone() {
    common::bounded_for(BOUND, || {
        let pool = one_task_per_process();
        // Teach the pool that the task is tiny (so chunks would grow).
        imap_pids(&pool, 200, MapOptions::new());
        let cases: [(&str, Opts); 4] = [
            ("timeout", || {
                MapOptions::new().timeout(Duration::from_secs(600))
            }),
            ("soft timeout", || {
                MapOptions::new().soft_timeout(Duration::from_secs(600))
            }),
            ("retries", || MapOptions::new().retries(1)),
            ("retries_with_shared", || {
                MapOptions::new().retries_with_shared(1)
            }),
        ];
        for (what, opts) in cases {
            let got = imap_pids(&pool, 40, opts());
            let per_pid = chunks(&got);
            assert_eq!(per_pid.len(), 40, "{what}: items shared a chunk");
            let got: Vec<(u32, u64)> = pool
                .imap_unordered_with(pid_and_runs, 0..40u64, opts())
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(got.iter().all(|&(_, runs)| runs == 1), "{what}, unordered");
        }
        // The pool's own defaults count too.
        for builder in [
            Pool::builder().timeout(Duration::from_secs(600)),
            Pool::builder().retries(2),
        ] {
            let pool = builder.processes(1).max_tasks_per_child(1).build().unwrap();
            imap_pids(&pool, 200, MapOptions::new());
            let per_pid = chunks(&imap_pids(&pool, 40, MapOptions::new()));
            assert_eq!(per_pid.len(), 40, "a pool default: items shared a chunk");
        }
    })
}

#[test]
fn an_explicit_chunk_size_keeps_its_meaning() {
    common::bounded_for(BOUND, || {
        let pool = one_task_per_process();
        imap_pids(&pool, 200, MapOptions::new());
        for size in [1usize, 5, 7] {
            let got = imap_pids(&pool, 40, MapOptions::new().chunksize(size));
            let per_pid = chunks(&got);
            let mut sizes: Vec<u64> = got
                .chunk_by(|a, b| a.0 == b.0)
                .map(|c| c.len() as u64)
                .collect();
            let last = sizes.pop().unwrap();
            assert!(
                sizes.iter().all(|&n| n == size as u64),
                "chunksize({size}): chunks of {sizes:?}"
            );
            assert_eq!(last, 40 - (size as u64) * (per_pid.len() as u64 - 1));
            assert_eq!(per_pid.len(), 40usize.div_ceil(size), "chunksize({size})");
        }
    })
}

/// One value or error per item, as `abort_on_some` gives them.
fn check_crash_outcomes(items: impl IntoIterator<Item = (u64, Result<u64, Error>)>) {
    let mut wrong = Vec::new();
    let mut seen = 0u64;
    for (x, r) in items {
        seen += 1;
        let ok = match &r {
            Err(Error::WorkerLost { status, .. }) if CRASHES.contains(&x) => {
                use std::os::unix::process::ExitStatusExt;
                status.signal() == Some(libc::SIGABRT)
            }
            Ok(v) => !CRASHES.contains(&x) && *v == x + 1,
            _ => false,
        };
        if !ok && wrong.len() < 10 {
            wrong.push((x, r));
        }
    }
    assert!(
        wrong.is_empty(),
        "each crashing item must fail with WorkerLost(SIGABRT) and every other \
         item give its value; wrong: {wrong:?}"
    );
    assert_eq!(seen, 200_000);
}

#[test]
fn a_crash_in_an_auto_sized_chunk_fails_only_that_item() {
    common::bounded_for(BOUND, || {
        let pool = common::pool(2);
        // Tiny items: by the crashing ones, chunks hold many items each, and
        // each crash ends its worker part-way through a chunk.
        let got = pool.imap(abort_on_some, 0..200_000u64);
        check_crash_outcomes((0..).zip(got));
        // Unordered: the values tell the items apart; the two failures are
        // the two crashes.
        let mut failed = 0;
        let mut values = HashSet::new();
        for r in pool.imap_unordered(abort_on_some, 0..200_000u64) {
            match r {
                Ok(v) => assert!(values.insert(v), "item {} came twice", v - 1),
                Err(Error::WorkerLost { .. }) => failed += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(failed, CRASHES.len());
        let want: HashSet<u64> = (0..200_000u64)
            .filter(|x| !CRASHES.contains(x))
            .map(|x| x + 1)
            .collect();
        assert!(values == want, "an item was lost");
        // The pool replaced its workers and goes on.
        assert!(common::eventually(|| pool.worker_pids().len() == 2));
        assert_eq!(pool.apply(square, 12).unwrap(), 144);
    })
}

/// A task with state: `abort_on_some`, plus its own offset (a name
/// beside it, so that the state does not decode as an item).
#[derive(Serialize, Deserialize)]
struct AbortOnSome {
    name: String,
    offset: u64,
}

impl Task for AbortOnSome {
    type Arg = u64;
    type Output = (String, u64);
    fn run(&self, x: u64) -> (String, u64) {
        (self.name.clone(), abort_on_some(x) - 1 + self.offset)
    }
}

#[test]
fn a_crash_in_an_auto_sized_task_chunk_fails_only_that_item() {
    common::bounded_for(BOUND, || {
        let pool = common::pool(2);
        let t = AbortOnSome {
            name: "state".into(),
            offset: 1_000_000,
        };
        // Each chunk carries the task's state before its items: the item a
        // crash takes out is the one that ran, and the state stays in front
        // of the rest, which run again with it.
        let want = |x: u64| ("state".to_string(), x + 1_000_000);
        let mut wrong = Vec::new();
        for (x, r) in (0..).zip(pool.imap_task(&t, 0..200_000u64)) {
            let ok = match &r {
                Err(Error::WorkerLost { .. }) => CRASHES.contains(&x),
                Ok(v) => !CRASHES.contains(&x) && *v == want(x),
                Err(_) => false,
            };
            if !ok && wrong.len() < 10 {
                wrong.push((x, r));
            }
        }
        assert!(wrong.is_empty(), "wrong: {wrong:?}");
        let mut failed = 0;
        let mut values = HashSet::new();
        for r in pool.imap_unordered_task(&t, 0..200_000u64) {
            match r {
                Ok((name, v)) => {
                    assert_eq!(name, "state");
                    assert!(values.insert(v), "item {} came twice", v - 1_000_000);
                }
                Err(Error::WorkerLost { .. }) => failed += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(failed, CRASHES.len());
        let want: HashSet<u64> = (0..200_000u64)
            .filter(|x| !CRASHES.contains(x))
            .map(|x| x + 1_000_000)
            .collect();
        assert!(values == want, "an item was lost or changed");
    })
}

#[test]
fn a_sandboxed_pool_keeps_one_item_per_chunk() {
    common::bounded_for(BOUND, || {
        let pool = Pool::builder()
            .processes(2)
            .start_method(StartMethod::ForkServer)
            .sandbox(Sandbox::new())
            .build()
            .expect("building a sandboxed pool");
        for _ in 0..2 {
            let got: Vec<(u32, u64)> = pool
                .imap(pid_and_runs, 0..30u64)
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(got.iter().all(|&(_, runs)| runs == 1), "{got:?}");
            let pids: HashSet<u32> = got.iter().map(|p| p.0).collect();
            assert_eq!(pids.len(), 30, "a process ran two items");
        }
    })
}
