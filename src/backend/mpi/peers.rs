//! Which ranks live, as one rank sees it: when each was last heard from,
//! when to say "I live" again, and which count as lost.
//!
//! Rank 0 watches every worker rank; a worker rank watches rank 0 only.
//! Each side sends a BEAT to the other [`BEATS`] times per rank timeout
//! (the shortest of the job's, should its ranks set different ones), and
//! any message counts as a sign of life. A rank silent for the whole
//! timeout is lost: rank 0 fails what it held and fences it off (it never
//! hears from it again), and a worker rank that loses rank 0 ends its
//! workers and exits. Rank 0 also learns of a rank whose process died
//! sooner, from its workers' streams (`root.rs`).

use std::time::{Duration, Instant};

/// The default rank timeout.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(4);
/// The shortest rank timeout allowed: below it, a loaded host's scheduling
/// alone could make a rank look lost.
pub(super) const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How many BEATs each side sends per rank timeout.
pub(super) const BEATS: u32 = 8;

pub(super) struct Peers {
    timeout: Duration,
    /// How often to send a BEAT.
    beat: Duration,
    /// Per rank: when it was last heard from; `None` once lost (and for
    /// this rank, and the ranks this one does not watch).
    heard: Vec<Option<Instant>>,
    /// The ranks watched and not lost, in order.
    live: Vec<usize>,
    /// Some rank was lost.
    lost: bool,
    last_beat: Instant,
    /// Each rank's host name (empty where unknown).
    hosts: Vec<&'static str>,
}

impl Peers {
    /// What `me` watches: every other rank (rank 0), or rank 0.
    pub(super) fn new(me: usize, size: usize, timeout: Duration) -> Self {
        let now = Instant::now();
        let watched = |r: usize| r != me && (me == 0 || r == 0);
        Peers {
            timeout,
            beat: timeout / BEATS,
            heard: (0..size).map(|r| watched(r).then_some(now)).collect(),
            live: (0..size).filter(|&r| watched(r)).collect(),
            lost: false,
            last_beat: now,
            hosts: vec![""; size],
        }
    }

    /// The job's shortest rank timeout is `shortest`: BEATs go often
    /// enough for the rank that waits least.
    pub(super) fn set_shortest(&mut self, shortest: Duration) {
        self.beat = shortest.min(self.timeout) / BEATS;
    }

    /// The host names the ranks reported (kept for the rest of the process:
    /// an MPI pool is built once per process).
    pub(super) fn set_hosts(&mut self, hosts: Vec<String>) {
        self.hosts = hosts
            .into_iter()
            .map(|h| &*Box::leak(h.into_boxed_str()))
            .collect();
    }

    pub(super) fn host(&self, rank: usize) -> &'static str {
        self.hosts.get(rank).copied().unwrap_or("")
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn live(&self) -> &[usize] {
        &self.live
    }

    pub(super) fn is_live(&self, rank: usize) -> bool {
        self.heard.get(rank).is_some_and(Option::is_some)
    }

    pub(super) fn any_lost(&self) -> bool {
        self.lost
    }

    /// A message came from `rank`.
    pub(super) fn heard(&mut self, rank: usize) {
        if let Some(Some(t)) = self.heard.get_mut(rank) {
            *t = Instant::now();
        }
    }

    /// Whether it is time to send the watched ranks a BEAT (and, if so,
    /// the clock starts again).
    pub(super) fn beat_due(&mut self) -> bool {
        let due = self.last_beat.elapsed() >= self.beat;
        if due {
            self.last_beat = Instant::now();
        }
        due
    }

    /// A live rank silent for the whole timeout, if any.
    pub(super) fn silent(&self) -> Option<usize> {
        let now = Instant::now();
        self.live.iter().copied().find(|&r| {
            self.heard[r].is_some_and(|t| now.saturating_duration_since(t) > self.timeout)
        })
    }

    /// Counts `rank` as lost. Returns whether it was live until now.
    pub(super) fn lose(&mut self, rank: usize) -> bool {
        let Some(h) = self.heard.get_mut(rank).filter(|h| h.is_some()) else {
            return false;
        };
        *h = None;
        self.live.retain(|&r| r != rank);
        self.lost = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_0_watches_every_other_rank_and_a_worker_rank_only_rank_0() {
        let root = Peers::new(0, 4, DEFAULT_TIMEOUT);
        assert_eq!(root.live(), &[1, 2, 3]);
        let worker = Peers::new(2, 4, DEFAULT_TIMEOUT);
        assert_eq!(worker.live(), &[0]);
        assert!(!worker.is_live(1));
    }

    #[test]
    fn a_lost_rank_is_lost_once_and_no_longer_watched() {
        let mut p = Peers::new(0, 3, DEFAULT_TIMEOUT);
        assert!(p.lose(2));
        assert!(!p.lose(2));
        assert!(!p.is_live(2));
        assert_eq!(p.live(), &[1]);
        assert!(p.any_lost());
        // Hearing from it again changes nothing: it is fenced off.
        p.heard(2);
        assert!(!p.is_live(2));
    }

    #[test]
    fn beats_go_as_often_as_the_shortest_timeout_of_the_job_needs() {
        let mut p = Peers::new(2, 4, Duration::from_secs(60));
        assert_eq!(p.beat, Duration::from_secs(60) / BEATS);
        p.set_shortest(Duration::from_secs(4));
        assert_eq!(p.beat, Duration::from_millis(500));
        // Never less often than its own timeout needs.
        p.set_shortest(Duration::from_secs(600));
        assert_eq!(p.beat, Duration::from_secs(60) / BEATS);
        // Its own silence threshold stays its own.
        assert_eq!(p.timeout(), Duration::from_secs(60));
    }

    #[test]
    fn a_rank_is_silent_only_past_the_timeout() {
        let hour = Duration::from_secs(3600);
        assert_eq!(Peers::new(0, 2, hour).silent(), None);
        let mut p = Peers::new(0, 2, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(p.silent(), Some(1));
        // Heard from again: the clock starts again (a long timeout now, so
        // that the check cannot race it).
        p.timeout = hour;
        p.heard(1);
        assert_eq!(p.silent(), None);
    }
}
