//! Waiting on many [`AsyncResult`]s at once, as Python's
//! `concurrent.futures` does: [`as_completed`] yields them as they finish,
//! [`wait`] returns once some condition on them holds. Neither polls: each
//! result's slot signals one [`Hub`] when it completes, and the one waiting
//! thread (or task) sleeps on that hub.

use crate::api::result::{AsyncResult, Next};
use crate::engine::completion::Hub;
use crate::error::Result;
use serde::de::DeserializeOwned;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Yields each result, with its position in `results`, as soon as it
/// finishes: in completion order, not input order (as Python's
/// `concurrent.futures.as_completed`). Results already finished come first,
/// in input order.
///
/// The returned [`AsCompleted`] is an iterator whose `next` blocks until
/// the next result is in, without polling; [`AsCompleted::next_timeout`]
/// bounds that wait, and it is also an async
/// [`Stream`](futures_core::Stream) of the same items. Dropping it does not
/// stop the tasks not yet yielded (as dropping an [`AsyncResult`] does
/// not); cancel them first if they should stop.
///
/// ```
/// use std::time::Duration;
/// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
///
/// let pool = procpool::Pool::builder().processes(3).build()?;
/// let results = vec![
///     pool.apply_async(nap, 60_000)?,
///     pool.apply_async(nap, 1)?,
///     pool.apply_async(nap, 2)?,
/// ];
/// let mut done = procpool::as_completed(results);
/// let mut quick: Vec<(usize, u64)> = Vec::new();
/// for (i, r) in done.by_ref().take(2) {
///     quick.push((i, r?));
/// }
/// quick.sort();
/// assert_eq!(quick, [(1, 1), (2, 2)]);   // the slow one, submitted first, is still out
/// assert_eq!(done.len(), 1);
/// # Ok::<(), procpool::Error>(())
/// ```
pub fn as_completed<R: DeserializeOwned + 'static>(
    results: impl IntoIterator<Item = AsyncResult<R>>,
) -> AsCompleted<R> {
    let results: Vec<Option<AsyncResult<R>>> = results.into_iter().map(Some).collect();
    let hub = Hub::new();
    for (i, r) in results.iter().enumerate() {
        if let Some(r) = r {
            r.slot.watch(&hub, i);
        }
    }
    AsCompleted {
        left: results.len(),
        results,
        hub,
    }
}

/// The iterator of [`as_completed`]: `(index, result)` for each
/// [`AsyncResult`], in the order they finish, where `index` is the
/// result's position in the input.
///
/// Also a [`futures_core::Stream`] of the same items: `poll_next` never
/// blocks, the pool wakes the task when the next result is in.
#[must_use = "iterators are lazy: the results are lost unless it is iterated"]
pub struct AsCompleted<R> {
    /// The results not yet yielded, in input order.
    results: Vec<Option<AsyncResult<R>>>,
    /// Signalled with a result's index when it finishes.
    hub: Arc<Hub>,
    /// How many are still to be yielded.
    left: usize,
}

impl<R: DeserializeOwned + 'static> AsCompleted<R> {
    /// The next result to finish, waiting at most `timeout` for it:
    /// [`Next::Item`], [`Next::TimedOut`] if none has finished by then (the
    /// iterator goes on: ask again), or [`Next::Done`] once every result
    /// has been yielded.
    ///
    /// Python's `as_completed(fs, timeout)` raises `TimeoutError`; here,
    /// as for [`Imap::next_timeout`](crate::Imap::next_timeout), running
    /// out of time is not an error of any task, so it is a variant of its
    /// own, and the bound is per call rather than for the whole iteration.
    ///
    /// ```
    /// use procpool::Next;
    /// use std::time::Duration;
    /// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    ///
    /// let pool = procpool::Pool::builder().processes(1).build()?;
    /// let mut done = procpool::as_completed([pool.apply_async(nap, 300)?]);
    /// assert!(matches!(done.next_timeout(Duration::from_millis(10)), Next::TimedOut));
    /// let (i, r) = done.next_timeout(Duration::from_secs(60)).item().unwrap();
    /// assert_eq!((i, r?), (0, 300));
    /// assert!(matches!(done.next_timeout(Duration::ZERO), Next::Done));
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn next_timeout(&mut self, timeout: Duration) -> Next<(usize, Result<R>)> {
        self.next_until(Instant::now().checked_add(timeout))
    }

    fn next_until(&mut self, end: Option<Instant>) -> Next<(usize, Result<R>)> {
        while self.left > 0 {
            let Some(i) = self.hub.pop_until(end) else {
                return Next::TimedOut;
            };
            if let Some(item) = self.yield_index(i) {
                return Next::Item(item);
            }
        }
        Next::Done
    }

    /// The result at `i`, which has finished (None if it was yielded
    /// already, which each slot's single signal rules out).
    fn yield_index(&mut self, i: usize) -> Option<(usize, Result<R>)> {
        let r = self.results.get_mut(i)?.take()?;
        self.left -= 1;
        Some((i, r.get()))
    }
}

impl<R: DeserializeOwned + 'static> Iterator for AsCompleted<R> {
    type Item = (usize, Result<R>);

    /// The next result to finish, waiting as long as it takes.
    fn next(&mut self) -> Option<(usize, Result<R>)> {
        self.next_until(None).item()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<R: DeserializeOwned + 'static> ExactSizeIterator for AsCompleted<R> {}

impl<R: DeserializeOwned + 'static> futures_core::Stream for AsCompleted<R> {
    type Item = (usize, Result<R>);

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(usize, Result<R>)>> {
        while self.left > 0 {
            let Poll::Ready(i) = self.hub.poll_pop(cx) else {
                return Poll::Pending;
            };
            if let Some(item) = self.yield_index(i) {
                return Poll::Ready(Some(item));
            }
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<R> Drop for AsCompleted<R> {
    /// The results not yet yielded stop signalling this iterator's hub.
    fn drop(&mut self) {
        for r in self.results.iter().flatten() {
            r.slot.unwatch(&self.hub);
        }
    }
}

impl<R> std::fmt::Debug for AsCompleted<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("left", &self.left)
            .finish()
    }
}

/// When [`wait`] returns, besides when its timeout passes (Python's
/// `return_when`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitFor {
    /// As soon as any result has finished (Python's `FIRST_COMPLETED`).
    FirstCompleted,
    /// As soon as any result has failed, or once all have finished
    /// (Python's `FIRST_EXCEPTION`). Failed means what
    /// [`AsyncResult::successful`] calls failed: any [`Error`](crate::Error),
    /// [`Cancelled`](crate::Error::Cancelled) and
    /// [`Terminated`](crate::Error::Terminated) included (Python does not
    /// count a cancelled future as failed).
    FirstFailed,
    /// Once every result has finished (Python's `ALL_COMPLETED`).
    AllCompleted,
}

/// What [`wait`] found: the positions (in the slice it was given, in
/// increasing order) of the results that had finished when it returned,
/// and of those that had not. Python's `DoneAndNotDoneFutures`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Done {
    /// The results that had finished (with a value or an error).
    pub done: Vec<usize>,
    /// The results still running (or queued).
    pub pending: Vec<usize>,
}

/// Blocks until `until` holds for `results` or `timeout` has passed (for
/// ever if `None`), and tells which had finished by then, as Python's
/// `concurrent.futures.wait`. It does not poll: one completion wakes it.
/// It takes nothing out of the results: [`get`](AsyncResult::get) them
/// afterwards.
///
/// With no result pending it returns at once, whatever `until` says (an
/// empty slice included).
///
/// ```
/// use procpool::WaitFor;
/// use std::time::Duration;
/// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
///
/// let pool = procpool::Pool::builder().processes(2).build()?;
/// let results = [pool.apply_async(nap, 60_000)?, pool.apply_async(nap, 1)?];
/// let d = procpool::wait(&results, WaitFor::FirstCompleted, Some(Duration::from_secs(30)));
/// assert_eq!((d.done, d.pending), (vec![1], vec![0]));
///
/// let d = procpool::wait(&results[..1], WaitFor::AllCompleted, Some(Duration::from_millis(10)));
/// assert_eq!(d.pending, [0]);     // the timeout passed first
/// results[0].cancel();
/// # Ok::<(), procpool::Error>(())
/// ```
pub fn wait<R>(results: &[AsyncResult<R>], until: WaitFor, timeout: Option<Duration>) -> Done {
    let end = timeout.and_then(|t| Instant::now().checked_add(t));
    let hub = Hub::new();
    for (i, r) in results.iter().enumerate() {
        r.slot.watch(&hub, i);
    }
    let (mut finished, mut failed) = (0, false);
    while !met(until, finished, results.len(), failed) {
        let Some(i) = hub.pop_until(end) else {
            break;
        };
        finished += 1;
        failed |= results[i].slot.successful() == Some(false);
    }
    let mut d = Done::default();
    for (i, r) in results.iter().enumerate() {
        r.slot.unwatch(&hub);
        if r.slot.is_ready() {
            d.done.push(i);
        } else {
            d.pending.push(i);
        }
    }
    d
}

/// Whether [`wait`] may return, `finished` of `total` results being in.
fn met(until: WaitFor, finished: usize, total: usize, failed: bool) -> bool {
    finished == total
        || match until {
            WaitFor::FirstCompleted => finished > 0,
            WaitFor::FirstFailed => failed,
            WaitFor::AllCompleted => false,
        }
}
