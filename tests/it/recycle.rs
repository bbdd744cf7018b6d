//! `max_tasks_per_child`: a worker exits after that many tasks and is
//! replaced; and the builder's refusal of zero counts.

use crate::common;

use procpool::{Error, Pool};
use std::collections::HashMap;

fn my_pid(_: u64) -> u32 {
    std::process::id()
}

fn counts(pids: &[u32]) -> HashMap<u32, usize> {
    let mut m = HashMap::new();
    for &p in pids {
        *m.entry(p).or_insert(0) += 1;
    }
    m
}

#[test]
fn one_worker_is_replaced_after_every_three_tasks() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(1)
            .max_tasks_per_child(3)
            .build()
            .unwrap();
        let first = pool.worker_pids();
        let pids: Vec<u32> = (0..9).map(|i| pool.apply(my_pid, i).unwrap()).collect();
        assert_eq!(pids[0], first[0], "the first task ran in the first worker");
        // Three workers, one after the other, three tasks each.
        for (n, group) in pids.chunks(3).enumerate() {
            assert!(
                group.iter().all(|&p| p == group[0]),
                "tasks {}..{} ran in more than one worker: {pids:?}",
                3 * n,
                3 * n + 3
            );
        }
        let c = counts(&pids);
        assert_eq!(c.len(), 3, "distinct workers: {pids:?}");
        assert!(c.values().all(|&n| n == 3), "tasks per worker: {c:?}");
        // The third worker has done its three and is being replaced.
        assert!(common::eventually(|| {
            let now = pool.worker_pids();
            now.len() == 1 && !pids.contains(&now[0])
        }));
        // A retired worker is really gone, not just out of the list.
        for p in c.keys() {
            assert!(
                common::eventually(|| !common::exists(*p)),
                "retired worker {p} is still there"
            );
        }
    })
}

/// The same with tasks submitted all at once: no worker runs more than its
/// share, whatever the batching.
#[test]
fn no_worker_runs_more_than_its_share_when_tasks_arrive_at_once() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(2)
            .max_tasks_per_child(2)
            .build()
            .unwrap();
        let rs: Vec<_> = (0..20)
            .map(|i| pool.apply_async(my_pid, i).unwrap())
            .collect();
        let pids: Vec<u32> = rs.into_iter().map(|r| r.get().unwrap()).collect();
        let c = counts(&pids);
        assert!(
            c.values().all(|&n| n <= 2),
            "tasks per worker (at most 2 each): {c:?}"
        );
        assert!(c.len() >= 10, "20 tasks, 2 per worker: {c:?}");
        // Map chunks count as tasks too.
        let pids = pool
            .map_with(my_pid, 0..12u64, procpool::MapOptions::new().chunksize(1))
            .unwrap();
        let c = counts(&pids);
        assert!(c.values().all(|&n| n <= 2), "map chunks per worker: {c:?}");
    })
}

#[test]
fn zero_max_tasks_per_child_is_a_config_error() {
    common::bounded(
        || match Pool::builder().processes(1).max_tasks_per_child(0).build() {
            Err(Error::Config(_)) => {}
            other => panic!("expected Err(Config), got {other:?}"),
        },
    )
}

#[test]
fn zero_processes_is_a_config_error() {
    common::bounded(|| match Pool::builder().processes(0).build() {
        Err(Error::Config(_)) => {}
        other => panic!("expected Err(Config), got {other:?}"),
    })
}
