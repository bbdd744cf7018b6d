//! What a caller holds while a task runs: [`AsyncResult`], [`MapResult`] and
//! the `imap` iterators, and the slot each of them waits on.

use crate::api::feed::{Bound, ChunkFeeder, Pending};
use crate::engine::completion::{Buf, Group, Hook, Hub, Outcome, Payload, Slot};
use crate::engine::core::Engine;
use crate::error::{Error, Result};
use crate::proto::shared_buf::Supply;
use crate::proto::task;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub(crate) fn decode_payload<R: DeserializeOwned + 'static>(o: Outcome) -> Result<R> {
    match o? {
        Payload::Bytes(b, mut engine) => {
            engine.decoding(|| task::decode_outcome(task::code::OK, b.bytes()))
        }
        Payload::Value(v) => v.downcast::<R>().map(|b| *b).map_err(|_| Error::Broken {
            reason: "a stored value had an unexpected type".into(),
        }),
        Payload::Unit | Payload::Items(..) => Err(Error::Broken {
            reason: "a result had no value".into(),
        }),
    }
}

/// The items of a chunk's output `b`, in order, with the items `lost`
/// (of a split chunk: see `Job::split`) put back in their places.
fn chunk_items<R: DeserializeOwned>(
    b: &[u8],
    lost: Vec<(u32, Error)>,
) -> impl Iterator<Item = Result<R>> {
    let mut ran = task::decode_chunk::<R>(b);
    let mut lost = lost.into_iter().peekable();
    let mut at = 0u32;
    std::iter::from_fn(move || {
        let next = match lost.next_if(|(p, _)| *p == at) {
            Some((_, e)) => Some(Err(e)),
            None => ran.next().or_else(|| lost.next().map(|(_, e)| Err(e))),
        };
        at += 1;
        next
    })
}

/// A chunk's items, whether it was split or not (see [`chunk_items`]).
fn decode_items<R: DeserializeOwned>(p: Payload, into: &mut impl Extend<Result<R>>) -> bool {
    match p {
        Payload::Bytes(b, mut engine) => {
            engine.decoding(|| into.extend(task::decode_chunk::<R>(b.bytes())))
        }
        Payload::Items(b, mut engine, lost) => {
            engine.decoding(|| into.extend(chunk_items::<R>(b.bytes(), lost)))
        }
        _ => return false,
    }
    true
}

/// The result of [`Pool::apply_async`](crate::Pool::apply_async): a task
/// that runs in a worker while the caller goes on.
///
/// It resolves exactly once, to the task's value or an [`Error`]. It is
/// also a [`Future`] with the same output, woken when the task finishes, so
/// it can be awaited in any async runtime (the crate depends on none).
///
/// ```
/// fn square(x: u64) -> u64 { x * x }
/// let pool = procpool::Pool::builder().processes(2).build()?;
/// let r = pool.apply_async(square, 7)?;
/// r.wait();
/// assert!(r.ready());
/// assert_eq!(r.successful(), Some(true));
/// assert_eq!(r.get()?, 49);
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "the task's result is lost unless you get() or await it"]
pub struct AsyncResult<R> {
    pub(crate) slot: Arc<Slot>,
    pub(crate) pool: Weak<Engine>,
    pub(crate) _r: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned + 'static> AsyncResult<R> {
    /// Whether the task has finished (with a value or an error).
    pub fn ready(&self) -> bool {
        self.slot.is_ready()
    }

    /// `None` until the task has finished; then whether it succeeded.
    pub fn successful(&self) -> Option<bool> {
        self.slot.successful()
    }

    /// Blocks until the task has finished.
    pub fn wait(&self) {
        self.slot.wait()
    }

    /// Blocks until the task has finished or `timeout` has passed; returns
    /// whether it finished.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.slot.wait_timeout(timeout)
    }

    /// Waits for the task and returns its value or its error.
    pub fn get(self) -> Result<R> {
        decode_payload(self.slot.take())
    }

    /// Cancels the task: a task still queued is removed; a task that a
    /// worker runs, or starts later, has its worker killed (and replaced).
    /// The result then resolves with [`Error::Cancelled`], even if the task
    /// had finished but its value had not reached this process yet.
    /// Returns false if the result had already arrived (or the pool is gone).
    pub fn cancel(&self) -> bool {
        match self.pool.upgrade() {
            Some(p) => p.cancel(&[self.slot.id]),
            None => false,
        }
    }
}

impl<R: DeserializeOwned + 'static> Future for AsyncResult<R> {
    type Output = Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        self.slot.poll_take(cx).map(decode_payload)
    }
}

impl<R> std::fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("id", &self.slot.id)
            .field("ready", &self.slot.is_ready())
            .finish()
    }
}

/// The result of [`Pool::map_async`](crate::Pool::map_async): the values of
/// every item, in input order, once all chunks have finished.
///
/// ```
/// fn double(x: i32) -> i32 { 2 * x }
/// let pool = procpool::Pool::builder().processes(2).build()?;
/// let r = pool.map_async(double, 0..100)?;
/// let v = r.get()?;
/// assert_eq!(v[99], 198);
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "the map's results are lost unless you get() or await it"]
pub struct MapResult<R> {
    pub(crate) chunks: Vec<Arc<Slot>>,
    pub(crate) group: Arc<Group>,
    pub(crate) total: usize,
    pub(crate) pool: Weak<Engine>,
    pub(crate) early: Option<Error>,
    /// Whether callbacks run when the map is done (then the value is
    /// decoded once, on the result-handler thread).
    pub(crate) callbacks: bool,
    pub(crate) _r: PhantomData<fn() -> R>,
}

pub(crate) fn assemble<R: DeserializeOwned>(chunks: &[Arc<Slot>], total: usize) -> Result<Vec<R>> {
    let mut out = Assembled {
        values: Vec::with_capacity(total),
        first: None,
    };
    for c in chunks {
        match c.take() {
            Ok(p) => {
                if !decode_items::<R>(p, &mut out) {
                    out.first.get_or_insert(Error::Broken {
                        reason: "a chunk had no value".into(),
                    });
                }
            }
            Err(e) => {
                out.first.get_or_insert(e);
            }
        }
    }
    match out.first {
        Some(e) => Err(e),
        None => Ok(out.values),
    }
}

/// A map's values as its chunks are decoded, until the first error in
/// input order.
struct Assembled<R> {
    values: Vec<R>,
    first: Option<Error>,
}

impl<R> Extend<Result<R>> for Assembled<R> {
    fn extend<I: IntoIterator<Item = Result<R>>>(&mut self, items: I) {
        for item in items {
            match item {
                Ok(v) if self.first.is_none() => self.values.push(v),
                Ok(_) => {}
                Err(e) => {
                    self.first.get_or_insert(e);
                }
            }
        }
    }
}

impl<R: DeserializeOwned + 'static> MapResult<R> {
    /// Whether every chunk has finished.
    pub fn ready(&self) -> bool {
        self.early.is_some() || self.group.done.is_ready()
    }

    /// Blocks until every chunk has finished.
    pub fn wait(&self) {
        if self.early.is_none() {
            self.group.done.wait()
        }
    }

    /// Blocks until every chunk has finished or `timeout` has passed.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.early.is_some() || self.group.done.wait_timeout(timeout)
    }

    /// `None` until every chunk has finished; then whether all succeeded.
    pub fn successful(&self) -> Option<bool> {
        if self.early.is_some() {
            return Some(false);
        }
        if !self.group.done.is_ready() {
            return None;
        }
        if self.group.done.successful() == Some(false) {
            return Some(false);
        }
        // A chunk can succeed as a whole while some of its items failed.
        Some(self.chunks.iter().all(|c| c.all_items_ok()))
    }

    /// How many items have finished, out of how many.
    pub fn progress(&self) -> (usize, usize) {
        (self.group.items_done.load(Ordering::SeqCst), self.total)
    }

    /// Waits for every chunk and returns the values in input order, or the
    /// first error in input order.
    pub fn get(self) -> Result<Vec<R>> {
        if let Some(e) = self.early {
            return Err(e);
        }
        if !self.callbacks {
            // Decode each chunk as it arrives, while later ones still run.
            return assemble(&self.chunks, self.total);
        }
        match self.group.done.take()? {
            Payload::Value(v) => v
                .downcast::<Vec<R>>()
                .map(|b| *b)
                .map_err(|_| Error::Broken {
                    reason: "a stored value had an unexpected type".into(),
                }),
            _ => assemble(&self.chunks, self.total),
        }
    }

    /// Cancels every chunk that has not finished (see [`AsyncResult::cancel`]).
    /// Returns whether any was cancelled.
    pub fn cancel(&self) -> bool {
        let ids: Vec<u64> = self.chunks.iter().map(|c| c.id).collect();
        match self.pool.upgrade() {
            Some(p) => p.cancel(&ids),
            None => false,
        }
    }
}

impl<R: DeserializeOwned + 'static> Future for MapResult<R> {
    type Output = Result<Vec<R>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<R>>> {
        if let Some(e) = self.early.take() {
            return Poll::Ready(Err(e));
        }
        match self.group.done.poll_take(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(Payload::Value(v))) => Poll::Ready(
                v.downcast::<Vec<R>>()
                    .map(|b| *b)
                    .map_err(|_| Error::Broken {
                        reason: "a stored value had an unexpected type".into(),
                    }),
            ),
            Poll::Ready(Ok(_)) => Poll::Ready(assemble(&self.chunks, self.total)),
        }
    }
}

impl<R> std::fmt::Debug for MapResult<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapResult")
            .field("chunks", &self.chunks.len())
            .field("items", &self.total)
            .finish()
    }
}

/// What [`Imap::next_timeout`] or [`ImapUnordered::next_timeout`] found.
#[derive(Debug)]
#[must_use]
pub enum Next<T> {
    /// The next item.
    Item(T),
    /// Nothing came in time. The iterator goes on: ask again later.
    TimedOut,
    /// The iterator is done: every item has been yielded.
    Done,
}

impl<T> Next<T> {
    /// The item, if there was one.
    pub fn item(self) -> Option<T> {
        match self {
            Next::Item(x) => Some(x),
            Next::TimedOut | Next::Done => None,
        }
    }
}

/// Turns a chunk that is in into its items. The input's panic resumes
/// here, in the consumer, in its place.
fn unpack<R: DeserializeOwned>(p: Pending, into: &mut Ready<R>) {
    match p {
        Pending::InputPanicked(payload) => std::panic::resume_unwind(payload),
        Pending::Failed(e, n) => into.failed(e, n),
        Pending::Chunk(slot, n, _) => match slot.take() {
            Ok(p) => into.chunk(p),
            Err(e) => into.failed(e, n),
        },
    }
}

/// The items an imap iterator has ready to yield, in order: those already
/// decoded, then the rest of one chunk, decoded [`BATCH`] items at a time
/// as they are asked for. (Decoding a whole chunk of thousands of tiny
/// items ahead of the consumer cost more than the decoding: the values
/// were out of the cache by the time they were read. Decoding each alone
/// cost a setup of the decoder per item.)
pub(crate) struct Ready<R> {
    items: VecDeque<Result<R>>,
    chunk: Option<Cursor>,
}

impl<R> Default for Ready<R> {
    fn default() -> Self {
        Ready {
            items: VecDeque::new(),
            chunk: None,
        }
    }
}

/// How many items of a chunk are decoded at a time.
const BATCH: usize = 64;

/// The rest of a chunk's output.
struct Cursor {
    buf: Buf,
    supply: Supply,
    /// Where its next item starts in `buf`.
    at: usize,
    /// The place of its next item in the chunk as it was submitted.
    place: u32,
    /// Of a split chunk: its items that failed with their workers, by
    /// place (see `Job::split`).
    lost: VecDeque<(u32, Error)>,
}

impl Cursor {
    /// Decodes up to `max` more of its items into `into`; whether it has
    /// more.
    fn decode<R: DeserializeOwned>(&mut self, into: &mut VecDeque<Result<R>>, max: usize) -> bool {
        let Cursor {
            buf,
            supply,
            at,
            place,
            lost,
        } = self;
        let bytes = buf.bytes();
        supply.decoding(|| {
            for _ in 0..max {
                let item = if lost.front().is_some_and(|(p, _)| p == place) {
                    lost.pop_front().map(|(_, e)| Err(e))
                } else if let Some((st, body, next)) = task::chunk_item(bytes, *at) {
                    *at = next;
                    Some(task::decode_outcome(st, body))
                } else {
                    lost.pop_front().map(|(_, e)| Err(e))
                };
                let Some(item) = item else {
                    return false;
                };
                *place += 1;
                into.push_back(item);
            }
            true
        })
    }
}

impl<R: DeserializeOwned> Ready<R> {
    /// The next item, if one is ready.
    fn pop(&mut self) -> Option<Result<R>> {
        if self.items.is_empty()
            && let Some(c) = &mut self.chunk
            && !c.decode(&mut self.items, BATCH)
        {
            self.chunk = None;
        }
        self.items.pop_front()
    }

    fn is_empty(&self) -> bool {
        self.chunk.is_none() && self.items.is_empty()
    }

    /// Decodes the rest of the chunk, so that what comes next goes behind
    /// it.
    fn flush(&mut self) {
        if let Some(mut c) = self.chunk.take() {
            c.decode(&mut self.items, usize::MAX);
        }
    }

    /// `n` items that failed with `e`.
    fn failed(&mut self, e: Error, n: usize) {
        self.flush();
        self.items.extend(std::iter::repeat_n(e, n).map(Err));
    }

    /// A chunk's output, after what is ready already.
    fn chunk(&mut self, p: Payload) {
        let (buf, supply, lost) = match p {
            Payload::Bytes(b, s) => (b, s, Vec::new()),
            Payload::Items(b, s, lost) => (b, s, lost),
            _ => {
                return self.items.push_back(Err(Error::Broken {
                    reason: "a chunk had no value".into(),
                }));
            }
        };
        let mut c = Cursor {
            buf,
            supply,
            at: 0,
            place: 0,
            lost: lost.into(),
        };
        if self.is_empty() {
            self.chunk = Some(c);
        } else {
            // Behind other items: decoded now, in its place.
            self.flush();
            c.decode(&mut self.items, usize::MAX);
        }
    }
}

/// How a step of an imap iterator waits for a chunk: blocking the thread
/// (until a deadline, or for ever), or, for a stream, registering the
/// task's waker and returning at once.
enum Wait<'c, 'w> {
    Block(Option<Instant>),
    Poll(&'c mut Context<'w>),
}

/// What a step came to.
enum Step {
    /// Progress: items may be ready; step again if not.
    More,
    /// Every item has been yielded.
    Done,
    /// The deadline passed first (blocking).
    TimedOut,
    /// Nothing is in yet; the waker is registered (polling).
    Pending,
}

/// What the two imap iterators share: items ready to yield, and a step
/// that makes more ready (pulling input, then waiting for a chunk as told).
trait ChunkWindow<R> {
    fn ready(&mut self) -> &mut Ready<R>;
    /// One step towards the next item.
    fn step(&mut self, wait: Wait<'_, '_>) -> Step;
}

/// The next item of `s`, waiting until `deadline` (forever if None).
fn advance<R: DeserializeOwned>(
    s: &mut impl ChunkWindow<R>,
    deadline: Option<Instant>,
) -> Next<Result<R>> {
    loop {
        if let Some(x) = s.ready().pop() {
            return Next::Item(x);
        }
        match s.step(Wait::Block(deadline)) {
            Step::More => {}
            Step::Done => return Next::Done,
            Step::TimedOut | Step::Pending => return Next::TimedOut,
        }
    }
}

/// The next item of `s` as a stream's `poll_next`: never blocks on a
/// worker.
fn poll_advance<R: DeserializeOwned>(
    s: &mut impl ChunkWindow<R>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<R>>> {
    loop {
        if let Some(x) = s.ready().pop() {
            return Poll::Ready(Some(x));
        }
        match s.step(Wait::Poll(cx)) {
            Step::More => {}
            Step::Done => return Poll::Ready(None),
            Step::TimedOut | Step::Pending => return Poll::Pending,
        }
    }
}

/// `Iterator` and `Stream` for an imap iterator: `next` waits as long as
/// it takes; `poll_next` registers the task's waker instead.
macro_rules! imap_iterator {
    ($t:ident) => {
        impl<R: DeserializeOwned, I> Iterator for $t<R, I>
        where
            I: Iterator,
            I::Item: Serialize,
        {
            type Item = Result<R>;

            fn next(&mut self) -> Option<Result<R>> {
                advance(self, None).item()
            }
        }

        impl<R: DeserializeOwned, I> futures_core::Stream for $t<R, I>
        where
            I: Iterator,
            I::Item: Serialize,
        {
            type Item = Result<R>;

            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
                poll_advance(self.get_mut(), cx)
            }
        }

        // Nothing in it is pinned structurally: the stream is only ever
        // used through `&mut`, whatever its input iterator.
        impl<R, I> Unpin for $t<R, I> {}
    };
}

/// The iterator of [`Pool::imap`](crate::Pool::imap): each item's
/// `Result`, in input order. It pulls its input lazily and keeps a bounded
/// number of chunks in flight, so an endless input runs in bounded memory.
/// Dropping it cancels the chunks still in flight. `I` is the type of the
/// input iterator.
///
/// If the input iterator panics, the items before it are still yielded,
/// and then the panic resumes in the consumer, from the `next` call that
/// reaches its place (as CPython raises the iterable's exception there);
/// nothing after it is pulled, and no worker is stopped.
///
/// [`next_timeout`](Self::next_timeout) waits for the next item with a
/// bound, as CPython's `IMapIterator.next(timeout)`.
///
/// # As an async stream
///
/// It is also a [`futures_core::Stream`] of the same items, for async
/// code: `poll_next` never blocks its thread on a worker (the pool wakes
/// the task when the next chunk is in). The input iterator is still pulled
/// on the thread that polls, a chunk at a time as the window empties, so
/// an input that blocks (a file, a channel) blocks the runtime's thread
/// meanwhile. With a `Send + 'static` input (a range, a `Vec`'s
/// `IntoIter`) the stream is `Send + 'static` and can be spawned. Dropping
/// it cancels what is in flight, as dropping the iterator does; an input
/// panic resumes in `poll_next`.
///
/// ```
/// use futures_core::Stream;
/// use procpool::MapOptions;
/// use std::pin::Pin;
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let pool = procpool::Pool::builder().processes(2).build()?;
/// let mut squares = pool.imap_with(square, 0..1000u64, MapOptions::new().chunksize(100));
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let sum = rt.block_on(async {
///     let mut sum = 0;
///     // A `next` of one's own; `futures::StreamExt::next` does the same.
///     while let Some(x) = std::future::poll_fn(|cx| Pin::new(&mut squares).poll_next(cx)).await {
///         sum += x?;
///     }
///     Ok::<u64, procpool::Error>(sum)
/// })?;
/// assert_eq!(sum, (0..1000u64).map(|x| x * x).sum());
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "iterators are lazy: nothing runs until it is iterated"]
pub struct Imap<R, I> {
    pub(crate) feeder: ChunkFeeder<I>,
    pub(crate) window: VecDeque<Pending>,
    pub(crate) ready: Ready<R>,
    /// What it may have in flight, and has.
    pub(crate) bound: Bound,
    /// Whether it waited for the front (a slow input) since it last pulled.
    pub(crate) waited: bool,
    pub(crate) exhausted: bool,
    pub(crate) pool: Weak<Engine>,
}

impl<R: DeserializeOwned, I> Imap<R, I>
where
    I: Iterator,
    I::Item: Serialize,
{
    /// The next item, waiting at most `timeout` for it: [`Next::Item`],
    /// [`Next::TimedOut`] if it has not come by then (the iterator goes
    /// on: ask again), or [`Next::Done`] once every item has been yielded.
    /// As CPython's `IMapIterator.next(timeout)`.
    ///
    /// The bound is on waiting for workers; pulling the input itself (the
    /// caller's iterator) is not interrupted.
    ///
    /// ```
    /// use procpool::Next;
    /// use std::time::Duration;
    /// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    /// let pool = procpool::Pool::builder().processes(2).build()?;
    /// let mut it = pool.imap(nap, [300, 1]);
    /// assert!(matches!(it.next_timeout(Duration::from_millis(10)), Next::TimedOut));
    /// assert_eq!(it.next_timeout(Duration::from_secs(60)).item().unwrap()?, 300);
    /// assert_eq!(it.next_timeout(Duration::from_secs(60)).item().unwrap()?, 1);
    /// assert!(matches!(it.next_timeout(Duration::ZERO), Next::Done));
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn next_timeout(&mut self, timeout: Duration) -> Next<Result<R>> {
        advance(self, Instant::now().checked_add(timeout))
    }
}

impl<R: DeserializeOwned, I> ChunkWindow<R> for Imap<R, I>
where
    I: Iterator,
    I::Item: Serialize,
{
    fn ready(&mut self) -> &mut Ready<R> {
        &mut self.ready
    }

    /// Tops the window up from the input, then waits for its oldest chunk.
    /// Once that chunk is in and the window holds enough to keep the
    /// workers busy (or the input is slow), it stops topping up: the
    /// chunk's items are yielded first.
    fn step(&mut self, wait: Wait<'_, '_>) -> Step {
        while !self.exhausted && self.bound.has_room(self.window.len()) {
            if let Some(front) = self.window.front() {
                let enough = self.feeder.slow() || self.bound.enough(self.window.len());
                if enough && (front.is_ready() || self.waited_for_front(&wait)) {
                    break;
                }
            }
            match self.feeder.next_chunk(|_| Hook::None, self.bound.room()) {
                Some(p) => {
                    self.bound.add(&p);
                    self.window.push_back(p);
                    self.waited = false;
                }
                None => self.exhausted = true,
            }
        }
        let Some(front) = self.window.front() else {
            return Step::Done;
        };
        if let Pending::Chunk(slot, ..) = front {
            match wait {
                Wait::Block(None) => {}
                Wait::Block(Some(end)) => {
                    if !slot.wait_deadline(end) {
                        return Step::TimedOut;
                    }
                }
                Wait::Poll(cx) => {
                    if slot.poll_ready(cx).is_pending() {
                        return Step::Pending;
                    }
                }
            }
        }
        let front = self.window.pop_front().expect("front exists");
        self.bound.remove(&front);
        unpack(front, &mut self.ready);
        Step::More
    }
}

impl<R, I> Imap<R, I>
where
    I: Iterator,
    I::Item: Serialize,
{
    /// From a slow input, waits a little for the oldest chunk (once per
    /// pull) before pulling more; whether it came. Only where the caller
    /// blocks: a stream's poll never waits.
    fn waited_for_front(&mut self, wait: &Wait<'_, '_>) -> bool {
        let Wait::Block(deadline) = *wait else {
            return false;
        };
        let Some(Pending::Chunk(slot, n, _)) = self.window.front() else {
            return false;
        };
        if self.waited {
            return false;
        }
        let Some(patience) = self.feeder.patience(*n) else {
            return false;
        };
        self.waited = true;
        let until = Instant::now() + patience;
        slot.wait_deadline(deadline.map_or(until, |d| d.min(until)))
    }
}

imap_iterator!(Imap);

fn cancel_pending(pool: &Weak<Engine>, pending: impl Iterator<Item = u64>) {
    let ids: Vec<u64> = pending.collect();
    if ids.is_empty() {
        return;
    }
    if let Some(p) = pool.upgrade() {
        p.cancel(&ids);
    }
}

impl<R, I> Drop for Imap<R, I> {
    fn drop(&mut self) {
        cancel_pending(
            &self.pool,
            self.window.iter().filter_map(|p| match p {
                Pending::Chunk(s, ..) if !s.is_ready() => Some(s.id),
                _ => None,
            }),
        );
    }
}

/// The iterator of [`Pool::imap_unordered`](crate::Pool::imap_unordered):
/// each item's `Result`, in the order the chunks finish. Lazy and bounded
/// like [`Imap`], and like it an async [`futures_core::Stream`] too (see
/// [`Imap`]'s "As an async stream").
///
/// If the input iterator panics, the panic resumes in the consumer once
/// every item pulled before it has been yielded; nothing after it is
/// pulled, and no worker is stopped.
#[must_use = "iterators are lazy: nothing runs until it is iterated"]
pub struct ImapUnordered<R, I> {
    pub(crate) feeder: ChunkFeeder<I>,
    /// The input's panic, resumed once everything before it is yielded.
    pub(crate) input_panic: Option<Box<dyn Any + Send>>,
    pub(crate) in_flight: HashMap<usize, Pending>,
    pub(crate) ready: Ready<R>,
    /// What it may have in flight, and has.
    pub(crate) bound: Bound,
    /// Whether it waited for a result (a slow input) since it last pulled.
    pub(crate) waited: bool,
    pub(crate) exhausted: bool,
    pub(crate) next_index: usize,
    /// Signalled with a chunk's index in `in_flight` when it finishes.
    pub(crate) hub: Arc<Hub>,
    pub(crate) pool: Weak<Engine>,
}

impl<R: DeserializeOwned, I> ImapUnordered<R, I>
where
    I: Iterator,
    I::Item: Serialize,
{
    /// The next item to finish, waiting at most `timeout` for it (see
    /// [`Imap::next_timeout`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// fn wait_for(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    /// let pool = procpool::Pool::builder().processes(1).build()?;
    /// let mut results = pool.imap_unordered(wait_for, vec![300]);
    /// let soon = results.next_timeout(Duration::from_millis(10));
    /// assert!(soon.item().is_none(), "not finished after 10 ms");
    /// let later = results.next_timeout(Duration::from_secs(60));
    /// assert_eq!(later.item().expect("finished within a minute")?, 300);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn next_timeout(&mut self, timeout: Duration) -> Next<Result<R>> {
        advance(self, Instant::now().checked_add(timeout))
    }

    /// Tops the chunks in flight up from the input. Once a result is in
    /// and enough is in flight to keep the workers busy (or the input is
    /// slow), it stops: the result is yielded first.
    fn top_up(&mut self, wait: &Wait<'_, '_>) {
        while !self.exhausted && self.bound.has_room(self.in_flight.len()) {
            let enough = self.feeder.slow() || self.bound.enough(self.in_flight.len());
            if enough && (!self.ready.is_empty() || self.one_is_in() || self.waited_for_one(wait)) {
                break;
            }
            let i = self.next_index;
            let hub = self.hub.clone();
            let room = self.bound.room();
            match self.feeder.next_chunk(|_| Hook::Notify(hub, i), room) {
                Some(Pending::Failed(e, n)) => self.ready.failed(e, n),
                Some(Pending::InputPanicked(p)) => {
                    self.input_panic = Some(p);
                    self.exhausted = true;
                }
                Some(p) => {
                    self.bound.add(&p);
                    self.in_flight.insert(i, p);
                    self.next_index += 1;
                    self.waited = false;
                }
                None => self.exhausted = true,
            }
        }
    }

    /// Chunk `i` is in: its items are ready.
    fn take(&mut self, i: usize) {
        if let Some(p) = self.in_flight.remove(&i) {
            self.bound.remove(&p);
            unpack(p, &mut self.ready);
        }
    }

    /// Whether a chunk is in (its items are then ready), without waiting.
    fn one_is_in(&mut self) -> bool {
        match self.hub.try_pop() {
            Some(i) => {
                self.take(i);
                true
            }
            None => false,
        }
    }

    /// From a slow input, waits a little for a result (once per pull)
    /// before pulling more; whether one came. Only where the caller
    /// blocks: a stream's poll never waits.
    fn waited_for_one(&mut self, wait: &Wait<'_, '_>) -> bool {
        let Wait::Block(deadline) = *wait else {
            return false;
        };
        if self.waited || self.in_flight.is_empty() {
            return false;
        }
        let Some(patience) = self.feeder.patience(1) else {
            return false;
        };
        self.waited = true;
        let until = Instant::now() + patience;
        match self
            .hub
            .pop_until(Some(deadline.map_or(until, |d| d.min(until))))
        {
            Some(i) => {
                self.take(i);
                true
            }
            None => false,
        }
    }
}

impl<R: DeserializeOwned, I> ChunkWindow<R> for ImapUnordered<R, I>
where
    I: Iterator,
    I::Item: Serialize,
{
    fn ready(&mut self) -> &mut Ready<R> {
        &mut self.ready
    }

    /// Tops the chunks in flight up from the input, then waits for the
    /// next one to finish.
    fn step(&mut self, wait: Wait<'_, '_>) -> Step {
        self.top_up(&wait);
        if !self.ready.is_empty() {
            return Step::More;
        }
        if self.in_flight.is_empty() {
            if let Some(p) = self.input_panic.take() {
                std::panic::resume_unwind(p);
            }
            return Step::Done;
        }
        let i = match wait {
            Wait::Block(end) => match self.hub.pop_until(end) {
                Some(i) => i,
                None => return Step::TimedOut,
            },
            Wait::Poll(cx) => match self.hub.poll_pop(cx) {
                Poll::Ready(i) => i,
                Poll::Pending => return Step::Pending,
            },
        };
        self.take(i);
        Step::More
    }
}

imap_iterator!(ImapUnordered);

impl<R, I> Drop for ImapUnordered<R, I> {
    fn drop(&mut self) {
        cancel_pending(
            &self.pool,
            self.in_flight.values().filter_map(|p| match p {
                Pending::Chunk(s, ..) if !s.is_ready() => Some(s.id),
                _ => None,
            }),
        );
    }
}

impl<R, I> std::fmt::Debug for Imap<R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap")
            .field("in_flight", &self.window.len())
            .finish()
    }
}

impl<R, I> std::fmt::Debug for ImapUnordered<R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapUnordered")
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec;

    /// A chunk's output holding these values, each a success.
    fn output(values: impl IntoIterator<Item = u64>) -> Buf {
        let mut vec = Vec::new();
        for v in values {
            let mut body = Vec::new();
            codec::encode_into(&v, &mut body).unwrap();
            vec.push(task::code::OK);
            vec.extend_from_slice(&(body.len() as u32).to_le_bytes());
            vec.extend_from_slice(&body);
        }
        Buf::Heap { vec, start: 0 }
    }

    fn drain(r: &mut Ready<u64>) -> Vec<std::result::Result<u64, String>> {
        std::iter::from_fn(|| r.pop())
            .map(|x| x.map_err(|e| format!("{e:?}")))
            .collect()
    }

    #[test]
    fn a_split_chunks_lost_items_come_back_in_their_places() {
        let mut r = Ready::<u64>::default();
        let lost = vec![
            (0, Error::Cancelled),
            (2, Error::Terminated),
            (5, Error::Closed),
        ];
        r.chunk(Payload::Items(output([1, 3, 4]), Supply::default(), lost));
        let got = drain(&mut r);
        let want: Vec<std::result::Result<u64, String>> = vec![
            Err("Cancelled".into()),
            Ok(1),
            Err("Terminated".into()),
            Ok(3),
            Ok(4),
            Err("Closed".into()),
        ];
        assert_eq!(got, want);
        assert!(r.is_empty());
        // The same through a map's assembly: the first error in input order.
        let slot = Slot::new(1);
        let lost = vec![(1, Error::Cancelled)];
        slot.set(Ok(Payload::Items(output([7, 8]), Supply::default(), lost)));
        assert!(!slot.all_items_ok());
        assert!(matches!(assemble::<u64>(&[slot], 3), Err(Error::Cancelled)));
    }

    #[test]
    fn a_chunk_is_decoded_in_batches_and_what_comes_after_it_stays_after() {
        let n = 3 * BATCH as u64;
        let mut r = Ready::<u64>::default();
        r.chunk(Payload::Bytes(output(0..n), Supply::default()));
        assert_eq!(r.pop().unwrap().unwrap(), 0);
        // Only a batch is decoded ahead of the consumer.
        assert_eq!(r.items.len(), BATCH - 1);
        // Items that fail meanwhile go behind the rest of the chunk, and
        // so does another chunk.
        r.failed(Error::Cancelled, 2);
        r.chunk(Payload::Bytes(output([100]), Supply::default()));
        let got = drain(&mut r);
        assert_eq!(got.len() as u64, n - 1 + 3);
        assert!(
            got[..(n - 1) as usize]
                .iter()
                .zip(1..)
                .all(|(x, i)| x == &Ok(i))
        );
        assert_eq!(
            got[(n - 1) as usize..],
            [
                Err("Cancelled".to_string()),
                Err("Cancelled".to_string()),
                Ok(100)
            ]
        );
    }
}
