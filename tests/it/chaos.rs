//! Chaos: many tiny tasks while another thread SIGKILLs a random worker
//! every few milliseconds. Every task must resolve exactly once, with its
//! value or (without retries) `WorkerLost`; with retries, with its value.

use crate::common;

use procpool::{Error, Pool, TaskOptions};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

const TASKS: u64 = 20_000;
const WORKERS: usize = 3;

fn double(x: u64) -> u64 {
    // A little work, so that kills land while tasks run.
    std::thread::sleep(Duration::from_micros(20));
    x * 2
}

/// A small xorshift generator: the crate has no `rand`, and the pid chosen
/// need not be unpredictable.
fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn sigkill(pid: u32) -> bool {
    // SAFETY: kill has no memory-safety preconditions; every pid passed here
    // is one of this test's pools' workers.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
}

/// Sets the flag when dropped: the killer stops even if the thread that
/// submits tasks panics.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Kills a random worker of `pool` every few milliseconds until `done` is
/// set (or a bound on attempts is reached); returns the pids it killed.
fn killer(pool: &Pool, done: &AtomicBool) -> HashSet<u32> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    let mut kills = HashSet::new();
    for _ in 0..5_000 {
        if done.load(Ordering::SeqCst) {
            break;
        }
        let pids = pool.worker_pids();
        if !pids.is_empty() {
            let pid = pids[(xorshift(&mut seed) % pids.len() as u64) as usize];
            if sigkill(pid) {
                kills.insert(pid);
            }
        }
        // Pacing between kills, not synchronisation.
        std::thread::sleep(Duration::from_millis(3));
    }
    kills
}

#[test]
fn every_task_resolves_once_while_workers_are_killed() {
    common::bounded(|| {
        let pool = Pool::builder().processes(WORKERS).build().unwrap();
        let done = AtomicBool::new(false);
        // How many times each task's callbacks ran: a result delivered twice (or
        // never) shows here even though `get` can only be called once.
        let calls: Arc<Vec<AtomicU32>> = Arc::new((0..TASKS).map(|_| AtomicU32::new(0)).collect());
        // The tasks each dead worker took down with it.
        let mut lost: HashMap<u32, Vec<usize>> = HashMap::new();
        let (kills, results) = std::thread::scope(|s| {
            let k = s.spawn(|| killer(&pool, &done));
            let stop = SetOnDrop(&done);
            let rs: Vec<_> = (0..TASKS)
                .map(|i| {
                    let (c1, c2) = (calls.clone(), calls.clone());
                    let opts = TaskOptions::new()
                        .on_success(move |_: &u64| {
                            c1[i as usize].fetch_add(1, Ordering::SeqCst);
                        })
                        .on_error(move |_: &Error| {
                            c2[i as usize].fetch_add(1, Ordering::SeqCst);
                        });
                    pool.apply_async_with(double, i, opts).expect("submitting")
                })
                .collect();
            let results: Vec<_> = rs.into_iter().map(|r| r.get()).collect();
            drop(stop);
            (k.join().unwrap(), results)
        });
        assert_eq!(results.len() as u64, TASKS);
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(v) => assert_eq!(*v, 2 * i as u64, "task {i}"),
                Err(Error::WorkerLost { pid, status, .. }) => {
                    assert_eq!(status.signal(), Some(libc::SIGKILL), "task {i}: {status}");
                    assert!(kills.contains(pid), "task {i}: lost to {pid}, never killed");
                    lost.entry(*pid).or_default().push(i);
                }
                Err(e) => panic!("task {i}: unexpected error {e:?}"),
            }
        }
        // The callbacks ran before each result became ready, so the counts are
        // final once every get() has returned.
        let wrong: Vec<(usize, u32)> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::SeqCst)))
            .filter(|&(_, n)| n != 1)
            .collect();
        assert!(
            wrong.is_empty(),
            "tasks whose callbacks did not run exactly once (index, count): {:?}",
            &wrong[..wrong.len().min(20)]
        );
        assert!(!kills.is_empty(), "the killer never killed a worker");
        let nlost: usize = lost.values().map(Vec::len).sum();
        eprintln!("chaos: {} kills, {nlost} tasks lost", kills.len());
        // A worker that dies fails only the task it was running: the others it
        // held (sent but not started, or finished) must not be lost with it.
        let multi: Vec<_> = lost.iter().filter(|(_, v)| v.len() > 1).take(10).collect();
        assert!(
            multi.is_empty(),
            "{nlost} tasks lost to {} dead workers; workers that took several tasks \
         down with them (pid: task indexes): {multi:?}",
            lost.len()
        );
        // The pool recovers: full strength, and correct.
        assert!(common::eventually(|| pool.worker_pids().len() == WORKERS));
        assert_eq!(
            pool.map(double, 0..100u64).unwrap(),
            (0..100u64).map(|x| 2 * x).collect::<Vec<_>>()
        );
    })
}

#[test]
fn with_retries_every_task_succeeds_while_workers_are_killed() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(WORKERS)
            .retries(100)
            .build()
            .unwrap();
        let done = AtomicBool::new(false);
        let (kills, results) = std::thread::scope(|s| {
            let k = s.spawn(|| killer(&pool, &done));
            let stop = SetOnDrop(&done);
            let rs: Vec<_> = (0..TASKS)
                .map(|i| pool.apply_async(double, i).expect("submitting"))
                .collect();
            let results: Vec<_> = rs.into_iter().map(|r| r.get()).collect();
            drop(stop);
            (k.join().unwrap(), results)
        });
        let wrong: Vec<_> = results
            .iter()
            .enumerate()
            .filter(|(i, r)| !matches!(r, Ok(v) if *v == 2 * *i as u64))
            .take(20)
            .collect();
        assert!(wrong.is_empty(), "tasks without their value: {wrong:?}");
        assert!(!kills.is_empty(), "the killer never killed a worker");
        eprintln!("chaos with retries: {} kills", kills.len());
        assert!(common::eventually(|| pool.worker_pids().len() == WORKERS));
    })
}

/// A worker killed while it starts (listed in `worker_pids`, not yet ready)
/// is replaced like any other: the pool has no initializer that could have
/// failed.
#[test]
fn workers_killed_as_they_start_are_replaced() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let mut killed = HashSet::new();
        // Kill every worker the moment it is listed, 100 of them: many of these
        // kills land before the new worker has said it is ready. (Bounded: if no
        // new worker shows up, the loop ends after a million looks.)
        let mut looks = 0;
        while killed.len() < 100 && looks < 1_000_000 {
            looks += 1;
            for pid in pool.worker_pids() {
                if killed.insert(pid) {
                    sigkill(pid);
                }
            }
        }
        // A task waits for a replacement; a pool that gave up fails it at once.
        let r = pool.apply(double, 21);
        assert!(
            matches!(r, Ok(42)),
            "after {} kills, a task gives {r:?}; workers: {:?}",
            killed.len(),
            pool.worker_pids()
        );
        assert!(
            common::eventually(|| {
                let now = pool.worker_pids();
                now.len() == 2 && now.iter().all(|p| !killed.contains(p))
            }),
            "after {} kills the pool has workers {:?}",
            killed.len(),
            pool.worker_pids()
        );
        assert_eq!(
            pool.map(double, 0..100u64).unwrap(),
            (0..100u64).map(|x| 2 * x).collect::<Vec<_>>()
        );
    })
}
