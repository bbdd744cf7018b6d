//! The pool's size and its slot table: how many workers it keeps, and the
//! slots their status words live in.
//!
//! A worker lives in a slot; a slot's status words (`proto::words`) are
//! made before the fork server, which every worker is forked from, so the
//! backend reserves room for every slot the pool may ever use when the
//! pool is built (memory it never touches costs nothing). The table hands
//! out `2 × size` slots (a replacement may start before the worker it
//! replaces is gone) and grows, never shrinks, as the pool does: a slot
//! freed by a shrink is simply free.
//!
//! Shrinking retires the workers the pool no longer needs, the idle ones
//! first: an idle worker goes at once, a busy one once the tasks it holds
//! are done (a sandboxed worker is killed, never waited for, as everywhere
//! it retires). A worker still being started when the pool shrinks is
//! retired as it arrives. (`State::trim` and `Engine::resize`, in
//! `core.rs`, apply these rules.)

/// The slots a pool may use.
pub(crate) struct SlotTable {
    /// Slots handed out so far: `0..in_use`.
    pub(crate) in_use: usize,
    /// How many slots the backend made room for; `None`: the backend's
    /// workers are fixed at launch (MPI ranks) and the pool cannot resize.
    capacity: Option<usize>,
}

impl SlotTable {
    /// The table of a pool of `processes` workers whose backend has room
    /// for `capacity` slots (`None`: no more than it starts with).
    pub(crate) fn new(processes: usize, capacity: Option<usize>) -> SlotTable {
        SlotTable {
            in_use: slots_for(processes),
            capacity,
        }
    }

    /// The most workers the pool may have; `None` if it cannot resize.
    pub(crate) fn max_workers(&self) -> Option<usize> {
        self.capacity.map(|c| c / 2)
    }

    /// Hands out the slots a pool of `workers` workers needs beyond those
    /// it has, into `free`.
    pub(crate) fn grow(&mut self, workers: usize, free: &mut Vec<usize>) {
        let want = slots_for(workers);
        while self.in_use < want {
            free.push(self.in_use);
            self.in_use += 1;
        }
    }
}

/// The slots a pool of `workers` workers uses.
pub(crate) fn slots_for(workers: usize) -> usize {
    2 * workers
}

/// A worker, as the choice of which to retire sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    /// It counts towards the pool's size: not retiring, ended or being
    /// killed.
    pub(crate) active: bool,
    /// How many tasks it holds.
    pub(crate) held: usize,
}

/// Which of `members` to retire so that `excess` fewer stay active: the
/// ones holding fewest tasks first (idle ones before busy ones), by index.
pub(crate) fn retirees(members: &[Member], excess: usize) -> Vec<usize> {
    let mut active: Vec<usize> = (0..members.len()).filter(|&i| members[i].active).collect();
    active.sort_by_key(|&i| members[i].held);
    active.truncate(excess);
    active
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(active: bool, held: usize) -> Member {
        Member { active, held }
    }

    #[test]
    fn idle_workers_are_retired_before_busy_ones() {
        let ms = [m(true, 2), m(true, 0), m(false, 0), m(true, 1), m(true, 0)];
        let mut r = retirees(&ms, 3);
        r.sort();
        assert_eq!(r, vec![1, 3, 4]);
    }

    #[test]
    fn inactive_workers_are_never_chosen() {
        let ms = [m(false, 0), m(false, 0), m(true, 5)];
        assert_eq!(retirees(&ms, 3), vec![2]);
        assert!(retirees(&ms, 0).is_empty());
    }

    #[test]
    fn the_table_grows_to_twice_the_size_and_never_shrinks() {
        let mut t = SlotTable::new(2, Some(64));
        assert_eq!(t.in_use, 4);
        assert_eq!(t.max_workers(), Some(32));
        let mut free = Vec::new();
        t.grow(1, &mut free);
        assert!(free.is_empty());
        t.grow(3, &mut free);
        assert_eq!(free, vec![4, 5]);
        assert_eq!(t.in_use, 6);
        assert_eq!(SlotTable::new(2, None).max_workers(), None);
    }
}
