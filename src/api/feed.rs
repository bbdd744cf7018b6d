//! How an `imap` iterator feeds the pool: [`ChunkFeeder`] pulls the
//! caller's input a chunk at a time, encodes it and submits it,
//! [`Pending`] is what it hands back for each chunk, and [`Bound`] says
//! how much may be in flight.
//!
//! With a chunk size (`MapOptions::chunksize`) every chunk but the last
//! holds that many items, as in CPython. Without one the pool sizes each
//! chunk itself ([`Auto`]): it starts with one item and, as it learns how
//! long an item takes to run (the engine's estimate per task function,
//! from the run times workers report) and to pull from the input (timed
//! here), lets chunks grow, at most doubling from one to the next, towards
//! about [`CHUNK_NS`] of work each: tiny items go thousands to a chunk,
//! slow ones alone. A chunk also stops filling once pulling it has taken
//! longer than that, so that a slow input's items are not held back to
//! fill a chunk. Such a chunk is split if its worker dies (`Job::split`):
//! only the item that ran fails.
//!
//! Within an auto-sized chunk each item keeps its own fate: one that
//! cannot be encoded fails alone (the chunk is sent without it), and one
//! that holds `SharedBuf`s travels alone (they are numbered within their
//! frame, and a split chunk's frame is rebuilt without the lost item).
//!
//! Every chunk's input starts with the feeder's prefix (a
//! [`Task`](crate::Task)'s state, or nothing), then its items.

use crate::api::encode::{Encoded, check_shared, encode_error};
use crate::engine::completion::{Hook, Slot};
use crate::engine::core::Engine;
use crate::engine::job::JobOptions;
use crate::error::Error;
use crate::proto::shared_buf::{self, Mode, Region};
use crate::proto::shm::Body;
use crate::proto::task::{self, TaskFn};
use serde::Serialize;
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// About how much work (run and pull time, estimated) an auto-sized chunk
/// holds: far above a chunk's own cost in the pool, and long enough that
/// results come back slower than the supervisor's spin (`proto::idle`),
/// which then sleeps between results rather than spin through them (the
/// figures are in `docs/performance.md`, "Figures behind the code's
/// choices").
pub(crate) const CHUNK_NS: u64 = 1_000_000;
/// The most items in an auto-sized chunk.
pub(crate) const MAX_ITEMS: usize = 1 << 15;
/// An auto-sized chunk takes no item once its items' input is this large.
pub(crate) const MAX_BYTES: usize = 256 << 10;
/// By default, the most items of auto-sized chunks in flight at once ...
pub(crate) const ITEMS_IN_FLIGHT: usize = 8 * MAX_ITEMS;
/// ... and the most bytes of their items' input.
pub(crate) const BYTES_IN_FLIGHT: usize = 16 << 20;
/// An input whose last chunk took at least this long to pull (more than a
/// chunk's pull budget, [`CHUNK_NS`], allows) is slow: the consumer yields
/// a result that is in, or waits a little for one, before it pulls again
/// (see [`ChunkFeeder::slow`] and [`ChunkFeeder::patience`]).
const SLOW_PULL_NS: u64 = 2 * CHUNK_NS;

/// A chunk that an imap iterator has submitted (or failed to), or the
/// panic of its input iterator, in its place.
pub(crate) enum Pending {
    /// Its slot, its items and the bytes of its items' input.
    Chunk(Arc<Slot>, usize, usize),
    Failed(Error, usize),
    /// The input iterator panicked here; nothing was pulled after it.
    InputPanicked(Box<dyn Any + Send>),
}

impl Pending {
    /// How many items it stands for, and the bytes of their input.
    fn load(&self) -> (usize, usize) {
        match self {
            Pending::Chunk(_, n, bytes) => (*n, *bytes),
            Pending::Failed(_, n) => (*n, 0),
            Pending::InputPanicked(_) => (0, 0),
        }
    }

    /// Whether its items can be yielded now.
    pub(crate) fn is_ready(&self) -> bool {
        match self {
            Pending::Chunk(slot, ..) => slot.is_ready(),
            Pending::Failed(..) | Pending::InputPanicked(_) => true,
        }
    }
}

/// How much an imap iterator may have in flight (chunks, their items and
/// the bytes of their input), and how much it has.
#[derive(Debug)]
pub(crate) struct Bound {
    chunks: usize,
    items: usize,
    bytes: usize,
    /// With this many chunks in flight, a result that is in is yielded
    /// before more input is pulled (`usize::MAX`: the window is always
    /// topped up first).
    keep: usize,
    /// What it has: items and bytes (its chunks are counted where they are
    /// held).
    held: (usize, usize),
}

impl Bound {
    pub(crate) fn new(chunks: usize, items: usize, bytes: usize, keep: usize) -> Bound {
        Bound {
            chunks,
            items,
            bytes,
            keep,
            held: (0, 0),
        }
    }

    /// Whether `chunks` in flight keep the workers busy enough that a
    /// result which is in goes first.
    pub(crate) fn enough(&self, chunks: usize) -> bool {
        chunks >= self.keep
    }

    /// Whether one more chunk may go, with `chunks` in flight.
    pub(crate) fn has_room(&self, chunks: usize) -> bool {
        chunks < self.chunks && self.held.0 < self.items && self.held.1 < self.bytes
    }

    /// How many more items may go.
    pub(crate) fn room(&self) -> usize {
        self.items - self.held.0
    }

    pub(crate) fn add(&mut self, p: &Pending) {
        let (n, b) = p.load();
        self.held = (self.held.0 + n, self.held.1 + b);
    }

    pub(crate) fn remove(&mut self, p: &Pending) {
        let (n, b) = p.load();
        self.held = (self.held.0 - n, self.held.1 - b);
    }
}

/// How a feeder sizes its chunks.
pub(crate) enum Sizing {
    /// The caller's chunk size.
    Fixed(usize),
    /// The pool's.
    Auto(Auto),
}

/// What the pool knows to size the next chunk.
#[derive(Default)]
pub(crate) struct Auto {
    /// The size of the last chunk: the next is at most twice that.
    last: usize,
    /// The estimated run time of one item, when the last chunk was made.
    run_ns: Option<u64>,
    /// How long pulling (and encoding) one item took: a moving average.
    pull_ns: Option<u64>,
    /// How long pulling the last chunk took.
    last_pull_ns: u64,
    /// An item held over for a chunk of its own.
    carried: Option<Carried>,
}

/// An item pulled into a chunk where it could not stay.
enum Carried {
    /// It could not be encoded: it fails alone.
    Failed(Error),
    /// It holds `SharedBuf`s: its encoding and its buffers, sent alone.
    Alone(Vec<u8>, Vec<Region>),
}

impl Auto {
    /// How many items the next chunk may hold, with `room` more items
    /// allowed in flight.
    pub(crate) fn target(&self, room: usize) -> usize {
        let by_time = match self.run_ns {
            // Nothing learnt yet: items go alone.
            None => 1,
            Some(run) => {
                let per = run.saturating_add(self.pull_ns.unwrap_or(0)).max(1);
                usize::try_from(CHUNK_NS / per).unwrap_or(MAX_ITEMS)
            }
        };
        by_time
            .min(self.last.saturating_mul(2))
            .min(room)
            .clamp(1, MAX_ITEMS)
    }

    /// Whether a chunk of `n` items whose pulls took `pulled` so far is to
    /// be sent now: pulling took longer than its items' work, and than
    /// [`CHUNK_NS`].
    pub(crate) fn pulled_enough(&self, n: usize, pulled: Duration) -> bool {
        let work = self.run_ns.unwrap_or(0).saturating_mul(n as u64);
        pulled.as_nanos() > u128::from(work.max(CHUNK_NS))
    }

    /// A chunk of `n` items took `pulled` to pull and encode.
    pub(crate) fn pulled(&mut self, n: usize, pulled: Duration) {
        let total = u64::try_from(pulled.as_nanos()).unwrap_or(u64::MAX);
        let each = total / n.max(1) as u64;
        self.pull_ns = Some(match self.pull_ns {
            Some(p) => p.saturating_mul(3).saturating_add(each) / 4,
            None => each,
        });
        self.last_pull_ns = total;
        self.last = n;
    }

    /// Whether the input is slow: its last chunk took [`SLOW_PULL_NS`] or
    /// more to pull.
    pub(crate) fn slow(&self) -> bool {
        self.last_pull_ns >= SLOW_PULL_NS
    }

    /// How long to wait for a result of `items` items before pulling the
    /// next chunk: only from a slow input, and only when the result is
    /// expected sooner than a quarter of a pull (or nothing is known yet).
    pub(crate) fn patience(&self, items: usize) -> Option<Duration> {
        if !self.slow() {
            return None;
        }
        let wait = self.last_pull_ns / 4;
        match self.run_ns {
            Some(run) if run.saturating_mul(items as u64) > wait => None,
            _ => Some(Duration::from_nanos(wait)),
        }
    }
}

/// Pulls an imap iterator's input (`it`), one chunk at a time, on the
/// thread that asks for the next chunk.
pub(crate) struct ChunkFeeder<I> {
    pub(crate) it: I,
    pub(crate) f: TaskFn,
    /// What leads each chunk's input (a task's state, or nothing), or the
    /// error that fails every chunk.
    pub(crate) prefix: Result<Vec<u8>, Error>,
    pub(crate) sizing: Sizing,
    pub(crate) engine: Arc<Engine>,
    /// What goes with each chunk's job.
    pub(crate) opts: JobOptions,
    pub(crate) mode: Mode,
    /// The input is done (exhausted, or it panicked): it is not pulled again.
    pub(crate) ended: bool,
    /// The input's panic, to hand over after the chunk pulled before it.
    pub(crate) panicked: Option<Box<dyn Any + Send>>,
}

/// A chunk being filled (its `SharedBuf`s go to the encoder's list).
struct Filling {
    /// The prefix, then the items.
    payload: Vec<u8>,
    /// The length of the prefix.
    lead: usize,
    n: usize,
    /// The prefix's error, or an item that could not be encoded (with a
    /// chunk size: the chunk fails as a whole).
    err: Option<Error>,
}

impl<I> ChunkFeeder<I>
where
    I: Iterator,
    I::Item: Serialize,
{
    /// The next item of the input; `None` once it is done (its panic is
    /// kept, and resumed in the consumer in its place, after the items
    /// before it: see `Imap`).
    fn pull(&mut self) -> Option<I::Item> {
        if self.ended {
            return None;
        }
        match catch_unwind(AssertUnwindSafe(|| self.it.next())) {
            Ok(Some(a)) => Some(a),
            Ok(None) => {
                self.ended = true;
                None
            }
            Err(p) => {
                self.ended = true;
                self.panicked = Some(p);
                None
            }
        }
    }

    /// A chunk with the prefix in it and no item yet.
    fn start(&self) -> Filling {
        let (payload, err) = match &self.prefix {
            Ok(p) => (p.clone(), None),
            Err(e) => (Vec::new(), Some(e.clone())),
        };
        Filling {
            lead: payload.len(),
            payload,
            n: 0,
            err,
        }
    }

    /// Fills a chunk of `size` items (fewer at the input's end).
    fn fill_fixed(&mut self, size: usize, c: &mut Filling) {
        while c.n < size {
            let Some(a) = self.pull() else { break };
            if let Err(e) = task::push_item(&mut c.payload, &a) {
                c.err.get_or_insert(encode_error(e));
            }
            c.n += 1;
        }
    }

    /// Fills an auto-sized chunk of at most `size` items; an item that
    /// cannot stay in it is carried over.
    fn fill_auto(&mut self, size: usize, c: &mut Filling) {
        let t0 = Instant::now();
        while c.n < size {
            let Some(a) = self.pull() else { break };
            let (at, mark) = (c.payload.len(), shared_buf::encoded_len());
            if let Err(source) = task::push_item(&mut c.payload, &a) {
                shared_buf::truncate_encoded(mark);
                self.carry(Carried::Failed(encode_error(source)));
                break;
            }
            c.n += 1;
            if shared_buf::encoded_len() > mark {
                // It holds SharedBufs: it goes alone (a chunk's buffers are
                // then all its own, numbered from 0).
                if c.n > 1 {
                    let bytes = c.payload.split_off(at);
                    self.carry(Carried::Alone(bytes, shared_buf::split_encoded(mark)));
                    c.n -= 1;
                }
                break;
            }
            if c.payload.len() - c.lead >= MAX_BYTES {
                break;
            }
            // The clock costs about as much as pulling a tiny item: read
            // it for each of a chunk's first items, then every 64th.
            if (c.n <= 8 || c.n.is_multiple_of(64)) && self.auto().pulled_enough(c.n, t0.elapsed())
            {
                break;
            }
        }
        let n = c.n;
        if n > 0 {
            self.auto().pulled(n, t0.elapsed());
        }
    }

    fn auto(&mut self) -> &mut Auto {
        match &mut self.sizing {
            Sizing::Auto(a) => a,
            Sizing::Fixed(_) => unreachable!("only auto-sized chunks are timed"),
        }
    }

    fn carry(&mut self, c: Carried) {
        self.auto().carried = Some(c);
    }

    /// The item carried over from the last chunk, if any.
    fn take_carried(&mut self) -> Option<Carried> {
        match &mut self.sizing {
            Sizing::Auto(a) => a.carried.take(),
            Sizing::Fixed(_) => None,
        }
    }

    /// An item carried over, as a chunk of its own.
    fn send_carried(&self, c: Carried, hook: impl FnOnce(usize) -> Hook) -> Pending {
        match c {
            Carried::Failed(e) => Pending::Failed(e, 1),
            Carried::Alone(item, shared) => {
                let mut c = self.start();
                c.payload.extend_from_slice(&item);
                c.n = 1;
                self.submit(c, shared, true, hook)
            }
        }
    }

    /// Submits chunk `c` (`split`: auto-sized), unless it has failed.
    fn submit(
        &self,
        c: Filling,
        shared: Vec<Region>,
        split: bool,
        hook: impl FnOnce(usize) -> Hook,
    ) -> Pending {
        if let Some(e) = c.err {
            return Pending::Failed(e, c.n);
        }
        let slot = self.engine.new_slot();
        let bytes = c.payload.len() - c.lead;
        let input = Encoded {
            payload: Body::Heap(c.payload),
            shared,
        };
        let job = input.job(self.f, hook(c.n), c.n, split.then_some(c.lead), self.opts);
        match self.engine.submit(slot.clone(), job) {
            Ok(()) => Pending::Chunk(slot, c.n, bytes),
            Err(e) => Pending::Failed(e, c.n),
        }
    }

    /// Submits the next chunk, with the hook `hook` makes of its item
    /// count, of at most `room` items where the pool sizes its chunks;
    /// None when the input is exhausted.
    pub(crate) fn next_chunk(
        &mut self,
        hook: impl FnOnce(usize) -> Hook,
        room: usize,
    ) -> Option<Pending> {
        if let Some(c) = self.take_carried() {
            return Some(self.send_carried(c, hook));
        }
        let size = match &mut self.sizing {
            Sizing::Fixed(size) => Ok(*size),
            Sizing::Auto(a) => {
                a.run_ns = self.engine.item_estimate(self.f);
                Err(a.target(room))
            }
        };
        let mut c = self.start();
        let mut shared = Vec::new();
        shared_buf::encoding(self.mode, &mut shared, || match size {
            Ok(fixed) => self.fill_fixed(fixed, &mut c),
            Err(auto) => self.fill_auto(auto, &mut c),
        });
        if c.n == 0 {
            // Nothing pulled: an item that fails alone, or the input's end.
            if let Some(c) = self.take_carried() {
                return Some(self.send_carried(c, hook));
            }
            return self.panicked.take().map(Pending::InputPanicked);
        }
        if c.err.is_none() {
            c.err = check_shared(&shared).err();
        }
        Some(self.submit(c, shared, size.is_err(), hook))
    }

    /// Whether the input is slow (its last chunk took a couple of
    /// milliseconds or more to pull): the consumer then yields a result
    /// that is in before it pulls again, rather than keep its window full.
    pub(crate) fn slow(&self) -> bool {
        matches!(&self.sizing, Sizing::Auto(a) if a.slow())
    }

    /// How long the consumer may wait for a result (of a chunk of `items`
    /// items) before it pulls more input: `Some` only while the input is
    /// slow, so that a result expected soon is not held up by the next
    /// pull.
    pub(crate) fn patience(&self, items: usize) -> Option<Duration> {
        match &self.sizing {
            Sizing::Auto(a) => a.patience(items),
            Sizing::Fixed(_) => None,
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn learnt(run_ns: u64, pull_ns: u64, last: usize) -> Auto {
        Auto {
            last,
            run_ns: Some(run_ns),
            pull_ns: Some(pull_ns),
            ..Auto::default()
        }
    }

    #[test]
    fn chunks_start_alone_and_grow_at_most_doubling() {
        // Nothing learnt: alone, whatever came before.
        assert_eq!(Auto::default().target(usize::MAX), 1);
        assert_eq!(
            Auto {
                last: 100,
                ..Auto::default()
            }
            .target(usize::MAX),
            1
        );
        // Tiny items: doubling from the last chunk, up to MAX_ITEMS.
        let mut a = learnt(10, 10, 0);
        let mut sizes = Vec::new();
        for _ in 0..20 {
            let n = a.target(usize::MAX);
            sizes.push(n);
            a.last = n;
        }
        assert_eq!(&sizes[..5], [1, 2, 4, 8, 16]);
        assert_eq!(*sizes.last().unwrap(), MAX_ITEMS);
        // Never more than the room in flight.
        assert_eq!(learnt(10, 10, 1000).target(7), 7);
    }

    #[test]
    fn chunks_hold_about_chunk_ns_of_run_and_pull_time() {
        let per = CHUNK_NS / 100;
        assert_eq!(learnt(per / 2, per / 2, 1 << 20).target(usize::MAX), 100);
        // A slow item goes alone; so does one from a slow input.
        assert_eq!(learnt(CHUNK_NS, 0, 1 << 20).target(usize::MAX), 1);
        assert_eq!(learnt(1, 10 * CHUNK_NS, 1 << 20).target(usize::MAX), 1);
    }

    #[test]
    fn a_chunk_stops_filling_when_pulling_takes_longer_than_its_work() {
        let a = learnt(1_000, 0, 0);
        let ns = Duration::from_nanos;
        assert!(!a.pulled_enough(10, ns(CHUNK_NS)));
        assert!(a.pulled_enough(10, ns(CHUNK_NS + 1)));
        // More work than CHUNK_NS: pulling may take that long.
        assert!(!a.pulled_enough(10_000, ns(5 * CHUNK_NS)));
        assert!(a.pulled_enough(10_000, ns(10 * CHUNK_NS + 1)));
        // Nothing learnt: CHUNK_NS.
        assert!(Auto::default().pulled_enough(1, ns(CHUNK_NS + 1)));
    }

    #[test]
    fn pull_times_are_averaged_per_item() {
        let mut a = Auto::default();
        a.pulled(4, Duration::from_nanos(400));
        assert_eq!((a.pull_ns, a.last, a.last_pull_ns), (Some(100), 4, 400));
        a.pulled(1, Duration::from_nanos(500));
        assert_eq!(a.pull_ns, Some(200));
    }

    #[test]
    fn the_consumer_waits_only_for_a_slow_input_and_a_quick_result() {
        let slow = SLOW_PULL_NS * 4;
        let mut a = Auto {
            last_pull_ns: slow,
            ..Auto::default()
        };
        // Nothing learnt of the task: a quarter of a pull.
        assert_eq!(a.patience(1), Some(Duration::from_nanos(slow / 4)));
        // A result expected sooner than that: wait for it.
        a.run_ns = Some(1_000);
        assert_eq!(a.patience(3), Some(Duration::from_nanos(slow / 4)));
        // One expected later, or a quick input: pull on.
        a.run_ns = Some(slow);
        assert_eq!(a.patience(1), None);
        a.run_ns = Some(1_000);
        a.last_pull_ns = SLOW_PULL_NS - 1;
        assert_eq!(a.patience(1), None);
    }
}
