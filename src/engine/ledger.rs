//! What becomes of a worker's tasks when it ends, as a pure rule: each task
//! it held is queued again, retried, or failed, and with which error (of a
//! chunk the pool sized itself, only the item that ran fails). And
//! whether a worker that died before it was ready puts the blame on the
//! initializer. No I/O: the supervisor gathers the facts (how it ended,
//! which task it had started, why the pool killed it) and applies the
//! verdict.

use crate::engine::job::{InFlight, Job, KillReason};
use crate::engine::seam::End;
use crate::error::Error;
use crate::proto::shm::Body;
use crate::proto::task;
use crate::sandbox::Limit;

/// The facts about a worker that ended.
pub(crate) struct Facts<'a> {
    pub(crate) pid: u32,
    /// The MPI rank it ran on, if it did.
    pub(crate) rank: Option<usize>,
    pub(crate) end: End,
    /// The last task it started (its sequence number; 0: none).
    pub(crate) started: u64,
    /// Which item of that task it ran (1 + its place; 0: none yet).
    pub(crate) item: u64,
    /// Why the pool killed it, if it did.
    pub(crate) kill: Option<&'a KillReason>,
    /// The sandbox limit it died of, if it did.
    pub(crate) limit: Option<Limit>,
}

/// The verdict on its tasks.
#[derive(Default)]
pub(crate) struct Verdict {
    /// Tasks to queue again, at the front, in this order: those it never
    /// started, and those that started and may run again (a retry, which
    /// counts).
    pub(crate) requeue: Vec<Job>,
    /// Tasks that fail, with their error.
    pub(crate) failed: Vec<(Job, Error)>,
    /// How many of the requeued tasks had started: each spends a retry.
    pub(crate) retried: u64,
    /// Split chunks whose every item has now failed, each with its own
    /// error (in `Job::lost`).
    pub(crate) finished: Vec<Job>,
}

/// Whether any task it held and had started is lost with it (cancelled
/// ones do not count: their callers have their answer).
pub(crate) fn lost_any(held: &[InFlight], started: u64) -> bool {
    held.iter().any(|f| f.seq <= started && !f.job.cancelled)
}

/// Decides the fate of each task a worker held when it ended. Tasks after
/// the one it started never started: they run elsewhere. Cancelled tasks
/// are dropped (their callers have `Cancelled`). Of a split chunk that
/// died with its worker, only the item that ran fails (see [`split`]).
pub(crate) fn settle(held: impl IntoIterator<Item = InFlight>, e: &Facts<'_>) -> Verdict {
    let mut v = Verdict::default();
    for f in held {
        if f.job.cancelled {
            continue;
        }
        if f.seq > e.started {
            v.requeue.push(f.job);
            continue;
        }
        let mut job = f.job;
        match started_task_error(&mut job, e) {
            Some(err @ (Error::WorkerLost { .. } | Error::WorkerLostShared { .. }))
                if job.split.is_some() && f.seq == e.started =>
            {
                split(job, e.item, err, &mut v)
            }
            Some(err) => v.failed.push((job, err)),
            None => {
                v.retried += 1;
                v.requeue.push(job);
            }
        }
    }
    v
}

/// A split chunk whose worker died while it ran item `item` (1 + its
/// place; 0: before its first item, which then counts as the one that
/// ran): that item leaves the chunk and fails with `err`; the rest run
/// again (those before it ran already, but their results died with the
/// worker; those after it never started). A chunk with no item left is
/// finished. Each loss takes an item out, so a chunk that keeps killing
/// its workers still ends.
fn split(mut job: Job, item: u64, err: Error, v: &mut Verdict) {
    let last = job.items.saturating_sub(1);
    let ran = u32::try_from(item.saturating_sub(1)).map_or(last, |i| i.min(last));
    let (Body::Heap(input), Some(lead)) = (&mut job.payload, job.split) else {
        v.failed.push((job, err));
        return;
    };
    if !task::remove_item(input, lead, ran as usize) {
        v.failed.push((job, err));
        return;
    }
    let at = submitted_place(&job.lost, ran);
    let i = job.lost.partition_point(|(p, _)| *p < at);
    job.lost.insert(i, (at, err));
    job.items -= 1;
    if job.items == 0 {
        v.finished.push(job);
    } else {
        v.requeue.push(job);
    }
}

/// The place, in a split chunk as it was submitted, of the item at `i`
/// among those it has left (`lost`: the places of those it has not,
/// ascending).
fn submitted_place(lost: &[(u32, Error)], i: u32) -> u32 {
    let mut at = i;
    for (p, _) in lost {
        if *p > at {
            break;
        }
        at += 1;
    }
    at
}

/// The error for a task the worker had started, or `None` if it runs again
/// (its retry is then spent).
fn started_task_error(job: &mut Job, e: &Facts<'_>) -> Option<Error> {
    let pid = e.pid;
    match e.kill {
        Some(KillReason::Timeout { id, timeout }) if *id == job.id => {
            return Some(Error::Timeout {
                timeout: *timeout,
                pid,
                rank: e.rank,
                last_words: None,
            });
        }
        Some(KillReason::Limit { id, limit }) if *id == job.id => {
            return Some(Error::LimitExceeded {
                limit: *limit,
                pid,
                last_words: None,
            });
        }
        Some(KillReason::Error(err)) => return Some(err.clone()),
        _ => {}
    }
    if let Some(limit) = e.limit {
        return Some(Error::LimitExceeded {
            limit,
            pid,
            last_words: None,
        });
    }
    // A task that started runs again only if it may (its input was kept
    // for that: KEEP_INPUT), and, if it holds SharedBufs, only if the
    // caller accepts that they may be half written.
    if job.retries > 0 && (job.shared.is_empty() || job.retry_shared) {
        job.retries -= 1;
        return None;
    }
    if let End::RankLost { rank, host } = e.end {
        return Some(Error::RankLost {
            rank,
            host: host.to_string(),
        });
    }
    let Some(status) = e.end.status() else {
        return Some(Error::Broken {
            reason: format!(
                "worker {pid} was lost with its MPI rank's fork server while it ran the task"
            ),
        });
    };
    if !job.shared.is_empty() {
        return Some(Error::WorkerLostShared {
            pid,
            status,
            buffers: job.shared.len(),
            last_words: None,
        });
    }
    Some(Error::WorkerLost {
        pid,
        status,
        rank: e.rank,
        last_words: None,
    })
}

/// What is known of a worker that died before it said it was ready.
pub(crate) struct Unready {
    /// The pool has an initializer.
    pub(crate) has_init: bool,
    /// The pool is being built (`build()` has not returned).
    pub(crate) building: bool,
    /// Workers with an initializer that died unready since one last was
    /// ready, this one included.
    pub(crate) deaths: u32,
    /// The worker said its initializer (or its sandbox) failed.
    pub(crate) said_so: bool,
}

/// Whether the initializer is at fault: it said it failed, or the worker
/// died in it while the pool was being built, or three replacements in a
/// row died in it. The pool then stops (it never respawns a failing
/// initializer). Otherwise (no initializer, or a kill from outside while
/// it ran) the worker is just replaced.
pub(crate) fn blames_initializer(u: &Unready) -> bool {
    u.said_so || (u.has_init && (u.building || u.deaths >= 3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::completion::{Hook, Slot};
    use crate::proto::shm::Body;
    use crate::proto::task::TaskFn;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::time::Duration;

    fn job(id: u64, retries: u32) -> Job {
        Job {
            id,
            f: TaskFn { tramp: 1, func: 2 },
            payload: Body::Heap(Vec::new()),
            slot: Slot::new(id),
            hook: Hook::None,
            timeout: None,
            soft_timeout: None,
            retries,
            cancelled: false,
            shared: Vec::new(),
            retry_shared: false,
            items: 1,
            wall_limit: false,
            split: None,
            lost: Vec::new(),
        }
    }

    fn held(jobs: Vec<Job>) -> Vec<InFlight> {
        jobs.into_iter()
            .enumerate()
            .map(|(i, job)| InFlight {
                seq: i as u64 + 1,
                job,
                charge: 0,
            })
            .collect()
    }

    fn killed(sig: i32) -> End {
        End::Exited(ExitStatus::from_raw(sig))
    }

    fn ended(started: u64, kill: Option<&KillReason>) -> Facts<'_> {
        Facts {
            pid: 42,
            rank: None,
            end: killed(9),
            started,
            item: 0,
            kill,
            limit: None,
        }
    }

    fn ids(jobs: &[Job]) -> Vec<u64> {
        jobs.iter().map(|j| j.id).collect()
    }

    #[test]
    fn only_the_started_task_is_lost_and_the_rest_run_elsewhere() {
        let tasks = held(vec![job(10, 0), job(11, 0), job(12, 0)]);
        assert!(lost_any(&tasks, 2));
        assert!(!lost_any(&tasks, 0));
        let v = settle(tasks, &ended(2, None));
        assert_eq!(ids(&v.requeue), vec![12]);
        let failed: Vec<u64> = v.failed.iter().map(|(j, _)| j.id).collect();
        assert_eq!(failed, vec![10, 11]);
        assert!(v.failed.iter().all(|(_, e)| matches!(
            e,
            Error::WorkerLost { pid: 42, status, .. } if status.signal() == Some(9)
        )));
    }

    /// A split chunk of `n` items (0, 1, ...).
    fn chunk(id: u64, n: u64) -> Job {
        let mut input = Vec::new();
        for x in 0..n {
            task::push_item(&mut input, &x).unwrap();
        }
        Job {
            payload: Body::Heap(input),
            items: n as u32,
            split: Some(0),
            ..job(id, 0)
        }
    }

    /// The items left in a split chunk's input, after its `lead` bytes.
    fn left(j: &Job, lead: usize) -> Vec<u64> {
        let Body::Heap(input) = &j.payload else {
            panic!("a chunk's input is on the heap")
        };
        let mut rest = &input[lead..];
        let mut out = Vec::new();
        while rest.len() >= 4 {
            let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push(
                crate::proto::codec::decode::<u64>(&rest[4..4 + n])
                    .unwrap()
                    .0,
            );
            rest = &rest[4 + n..];
        }
        out
    }

    fn places(j: &Job) -> Vec<u32> {
        j.lost.iter().map(|(p, _)| *p).collect()
    }

    #[test]
    fn a_split_chunk_loses_only_the_item_that_ran() {
        // The worker died in item 2 (of 0..5) of the chunk it started; the
        // chunk behind it never started.
        let mut e = ended(1, None);
        e.item = 3;
        let v = settle(held(vec![chunk(1, 5), chunk(2, 3)]), &e);
        assert!(v.failed.is_empty() && v.finished.is_empty());
        assert_eq!(ids(&v.requeue), vec![1, 2]);
        let first = &v.requeue[0];
        assert_eq!(places(first), vec![2]);
        assert!(matches!(first.lost[0].1, Error::WorkerLost { pid: 42, .. }));
        assert_eq!(first.items, 4);
        assert!(v.requeue[1].lost.is_empty() && v.requeue[1].items == 3);
        // Its next worker dies in its item 2 of what is left (0, 1, 3, 4):
        // the item submitted at 3.
        let mut again = v.requeue.into_iter().next().unwrap();
        again.lost.clear();
        again.lost.push((2, Error::Cancelled));
        let v = settle(held(vec![again]), &e);
        assert_eq!(places(&v.requeue[0]), vec![2, 3]);
        assert_eq!(v.requeue[0].items, 3);
        // Died before its first item: the first counts as the one that ran.
        e.item = 0;
        let v = settle(held(vec![chunk(1, 2)]), &e);
        assert_eq!(places(&v.requeue[0]), vec![0]);
        // The last item of a chunk: the chunk is finished.
        e.item = 1;
        let v = settle(held(vec![chunk(1, 1)]), &e);
        assert!(v.requeue.is_empty() && v.failed.is_empty());
        assert_eq!(places(&v.finished[0]), vec![0]);
        // A kill for the pool's own reason fails the whole chunk.
        let kill = KillReason::Error(Error::Broken {
            reason: "bad".into(),
        });
        let v = settle(held(vec![chunk(1, 4)]), &ended(1, Some(&kill)));
        assert_eq!(v.failed.len(), 1);
    }

    #[test]
    fn a_split_chunk_led_by_a_tasks_state_keeps_the_state() {
        // A task's chunk: its state (here the u64 99) leads its items, and
        // the worker counts items after it.
        let mut input = Vec::new();
        task::push_item(&mut input, &99u64).unwrap();
        let lead = input.len();
        for x in 0..4u64 {
            task::push_item(&mut input, &x).unwrap();
        }
        let j = Job {
            payload: Body::Heap(input),
            items: 4,
            split: Some(lead),
            ..job(1, 0)
        };
        let mut e = ended(1, None);
        e.item = 2;
        let v = settle(held(vec![j]), &e);
        let again = &v.requeue[0];
        assert_eq!(places(again), vec![1]);
        assert_eq!(left(again, lead), vec![0, 2, 3]);
        assert_eq!(left(again, 0)[0], 99, "the state still leads");
    }

    #[test]
    fn a_started_task_with_retries_runs_again_and_spends_one() {
        let v = settle(held(vec![job(1, 2)]), &ended(1, None));
        assert!(v.failed.is_empty());
        assert_eq!(v.requeue.len(), 1);
        assert_eq!(v.requeue[0].retries, 1);
    }

    #[test]
    fn cancelled_tasks_are_dropped() {
        let mut j = job(1, 0);
        j.cancelled = true;
        let tasks = held(vec![j, job(2, 0)]);
        assert!(!lost_any(&tasks[..1], 1));
        let v = settle(tasks, &ended(1, None));
        assert!(v.failed.is_empty());
        assert_eq!(ids(&v.requeue), vec![2]);
    }

    #[test]
    fn a_timeout_fails_its_task_even_with_retries() {
        let kill = KillReason::Timeout {
            id: 7,
            timeout: Duration::from_millis(5),
        };
        let v = settle(held(vec![job(7, 3)]), &ended(1, Some(&kill)));
        assert!(matches!(
            v.failed[0].1,
            Error::Timeout { pid: 42, timeout, .. } if timeout == Duration::from_millis(5)
        ));
    }

    #[test]
    fn the_pools_own_error_fails_every_started_task() {
        let kill = KillReason::Error(Error::Broken {
            reason: "bad".into(),
        });
        let v = settle(held(vec![job(1, 1), job(2, 1)]), &ended(2, Some(&kill)));
        assert_eq!(v.failed.len(), 2);
        assert!(v.requeue.is_empty());
    }

    #[test]
    fn a_sandbox_limit_names_the_limit() {
        let limit = Limit::CpuTime {
            per_task: Duration::from_secs(1),
        };
        let mut e = ended(1, None);
        e.limit = Some(limit);
        let v = settle(held(vec![job(1, 5)]), &e);
        assert!(matches!(
            v.failed[0].1,
            Error::LimitExceeded { pid: 42, .. }
        ));
    }

    #[test]
    fn an_abandoned_worker_is_not_reported_as_an_exit() {
        let mut e = ended(1, None);
        e.end = End::Abandoned;
        let v = settle(held(vec![job(1, 0)]), &e);
        assert!(matches!(v.failed[0].1, Error::Broken { .. }));
        // An exit says its code, and the rank it ran on.
        e.end = End::Exited(ExitStatus::from_raw(3 << 8));
        e.rank = Some(2);
        let v = settle(held(vec![job(1, 0)]), &e);
        assert!(matches!(
            v.failed[0].1,
            Error::WorkerLost { status, rank: Some(2), .. } if status.code() == Some(3)
        ));
    }

    #[test]
    fn the_initializer_is_blamed_only_with_cause() {
        let u = |has_init, building, deaths, said_so| Unready {
            has_init,
            building,
            deaths,
            said_so,
        };
        assert!(blames_initializer(&u(true, false, 1, true)));
        assert!(blames_initializer(&u(true, true, 1, false)));
        assert!(blames_initializer(&u(true, false, 3, false)));
        assert!(!blames_initializer(&u(true, false, 2, false)));
        assert!(!blames_initializer(&u(false, true, 0, false)));
    }
}
