//! Completion: where a task's outcome lands ([`Slot`]), what runs when it
//! does ([`Hook`]: nothing, a callback on the result-handler thread, an
//! `imap_unordered` notice, a map chunk's count), the notifier that many
//! slots can signal ([`Hub`]), and the result-handler thread itself
//! ([`Handler`]). The public result types in `api::result` and
//! `api::wait` wait on these.

use crate::error::{Error, Result};
use crate::proto::shared_buf::Supply;
use crate::proto::task;
use crossbeam_channel::Sender;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The output bytes of a task.
pub(crate) enum Buf {
    /// `vec[start..]`.
    Heap { vec: Vec<u8>, start: usize },
    /// A shared-memory block, back to the cache when dropped.
    Block(crate::proto::shm::Lent),
}

impl Buf {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Buf::Heap { vec, start } => &vec[*start..],
            Buf::Block(l) => l.bytes(),
        }
    }
}

/// A finished task's value before the caller takes it.
pub(crate) enum Payload {
    /// The encoded output, decoded by whoever takes it, and the
    /// `SharedBuf`s that came with it.
    Bytes(Buf, Supply),
    /// A split chunk's output (see `Job::split`): the items that ran, as
    /// in `Bytes`, and the items that failed with their workers, by their
    /// places in the chunk (ascending), to be put back there.
    Items(Buf, Supply, Vec<(u32, Error)>),
    /// A value already decoded (by the result-handler thread, for callbacks).
    Value(Box<dyn Any + Send>),
    /// Nothing: the value lives elsewhere (a map's chunks).
    Unit,
}

pub(crate) type Outcome = Result<Payload>;

/// A split chunk's outcome: the result of the items that ran last, with
/// `lost`, the items that failed before, to join it in their places. A
/// failure of the whole chunk (cancelled, terminated) stays one.
pub(crate) fn with_lost(o: Outcome, lost: Vec<(u32, Error)>) -> Outcome {
    if lost.is_empty() {
        return o;
    }
    match o {
        Ok(Payload::Bytes(b, s)) => Ok(Payload::Items(b, s, lost)),
        other => other,
    }
}

/// The outcome of a split chunk none of whose items is left to run: each
/// failed with its worker.
pub(crate) fn all_lost(lost: Vec<(u32, Error)>) -> Outcome {
    let none = Buf::Heap {
        vec: Vec::new(),
        start: 0,
    };
    with_lost(Ok(Payload::Bytes(none, Supply::default())), lost)
}

/// What to do when a task finishes, besides storing its outcome.
pub(crate) enum Hook {
    None,
    /// Run on the result-handler thread; its return value is stored.
    Handler(Box<dyn FnOnce(Outcome) -> Outcome + Send>),
    /// Signal this token on the hub once stored (imap_unordered).
    Notify(Arc<Hub>, usize),
    /// One chunk (of this many items) of a map.
    Group(Arc<Group>, usize),
}

/// Where one task's outcome lands.
pub(crate) struct Slot {
    pub(crate) id: u64,
    m: Mutex<SlotState>,
    cv: Condvar,
}

struct SlotState {
    outcome: Option<Outcome>,
    taken: bool,
    /// Whether a thread waits on the condvar (notifying costs a syscall).
    waiting: bool,
    waker: Option<Waker>,
    /// Hubs to signal, each with its token, when the outcome is stored
    /// (`as_completed`, `wait`).
    watchers: Vec<(Arc<Hub>, usize)>,
}

impl Slot {
    pub(crate) fn new(id: u64) -> Arc<Slot> {
        Arc::new(Slot {
            id,
            m: Mutex::new(SlotState {
                outcome: None,
                taken: false,
                waiting: false,
                waker: None,
                watchers: Vec::new(),
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the outcome (the first one wins) and wakes every waiter: a
    /// thread on the condvar, a future's waker, the hubs that watch it.
    pub(crate) fn set(&self, o: Outcome) {
        let (waker, waiting, watchers) = {
            let mut s = self.lock();
            if s.outcome.is_some() || s.taken {
                return;
            }
            s.outcome = Some(o);
            (s.waker.take(), s.waiting, std::mem::take(&mut s.watchers))
        };
        if waiting {
            self.cv.notify_all();
        }
        if let Some(w) = waker {
            w.wake();
        }
        for (hub, token) in watchers {
            hub.signal(token);
        }
    }

    /// Has `hub` signalled with `token` once the outcome is in: at once if
    /// it is in already. Each call signals once.
    pub(crate) fn watch(&self, hub: &Arc<Hub>, token: usize) {
        {
            let mut s = self.lock();
            if s.outcome.is_none() && !s.taken {
                s.watchers.push((hub.clone(), token));
                return;
            }
        }
        hub.signal(token);
    }

    /// Forgets every watch of `hub` on this slot (its waiter gave up).
    pub(crate) fn unwatch(&self, hub: &Arc<Hub>) {
        self.lock().watchers.retain(|(h, _)| !Arc::ptr_eq(h, hub));
    }

    pub(crate) fn is_ready(&self) -> bool {
        let s = self.lock();
        s.outcome.is_some() || s.taken
    }

    pub(crate) fn successful(&self) -> Option<bool> {
        let s = self.lock();
        s.outcome.as_ref().map(|o| o.is_ok())
    }

    /// For a finished chunk of a map: whether it and every item in it
    /// succeeded (false while it is not finished, or once it was taken).
    pub(crate) fn all_items_ok(&self) -> bool {
        let s = self.lock();
        match &s.outcome {
            Some(Ok(Payload::Bytes(b, _))) => task::chunk_all_ok(b.bytes()),
            Some(Ok(Payload::Items(..))) => false,
            Some(Ok(_)) => true,
            Some(Err(_)) => false,
            None => s.taken,
        }
    }

    pub(crate) fn wait(&self) {
        let mut s = self.lock();
        while s.outcome.is_none() && !s.taken {
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn wait_timeout(&self, d: Duration) -> bool {
        match Instant::now().checked_add(d) {
            Some(end) => self.wait_deadline(end),
            None => {
                self.wait();
                true
            }
        }
    }

    /// Waits until the outcome is in or `end` has passed; returns whether
    /// it is in.
    pub(crate) fn wait_deadline(&self, end: Instant) -> bool {
        let mut s = self.lock();
        while s.outcome.is_none() && !s.taken {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            s.waiting = true;
            s = self
                .cv
                .wait_timeout(s, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits, then takes the outcome out.
    pub(crate) fn take(&self) -> Outcome {
        let mut s = self.lock();
        while s.outcome.is_none() && !s.taken {
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.taken = true;
        s.outcome.take().unwrap_or(Err(Error::Broken {
            reason: "the result was already taken".into(),
        }))
    }

    /// Ready once the outcome is in (without taking it); else registers the
    /// task's waker.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.outcome.is_some() || s.taken {
            return Poll::Ready(());
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut s = self.lock();
        if let Some(o) = s.outcome.take() {
            s.taken = true;
            return Poll::Ready(o);
        }
        if s.taken {
            return Poll::Ready(Err(Error::Broken {
                reason: "the result was already taken".into(),
            }));
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// A notifier that many slots signal: each completion queues its token,
/// and one consumer takes the tokens in completion order, blocking its
/// thread or registering its task's waker. One thread can so wait for
/// whichever of N results finishes first, without polling them.
pub(crate) struct Hub {
    m: Mutex<HubState>,
    cv: Condvar,
}

struct HubState {
    tokens: VecDeque<usize>,
    /// How many threads wait on the condvar (notifying costs a syscall).
    waiting: usize,
    waker: Option<Waker>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            m: Mutex::new(HubState {
                tokens: VecDeque::new(),
                waiting: 0,
                waker: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `token` and wakes the consumer.
    pub(crate) fn signal(&self, token: usize) {
        let (waker, waiting) = {
            let mut s = self.lock();
            s.tokens.push_back(token);
            (s.waker.take(), s.waiting > 0)
        };
        if waiting {
            self.cv.notify_all();
        }
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next token, waiting until `end` (for ever if None); None if
    /// `end` passed first.
    pub(crate) fn pop_until(&self, end: Option<Instant>) -> Option<usize> {
        let mut s = self.lock();
        loop {
            if let Some(t) = s.tokens.pop_front() {
                return Some(t);
            }
            let left = match end {
                None => None,
                Some(end) => Some(
                    end.checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())?,
                ),
            };
            s.waiting += 1;
            s = match left {
                None => self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    self.cv
                        .wait_timeout(s, d)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            s.waiting -= 1;
        }
    }

    /// The next token, if one is queued: never waits.
    pub(crate) fn try_pop(&self) -> Option<usize> {
        self.lock().tokens.pop_front()
    }

    /// The next token, or Pending with the task's waker registered.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        if let Some(t) = s.tokens.pop_front() {
            return Poll::Ready(t);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// A flag set once, that futures can wait for.
pub(crate) struct Signal {
    state: Mutex<(bool, Vec<Waker>)>,
}

impl Signal {
    pub(crate) fn new() -> Arc<Signal> {
        Arc::new(Signal {
            state: Mutex::new((false, Vec::new())),
        })
    }

    /// Sets the flag and wakes every waiting future.
    pub(crate) fn set(&self) {
        let wakers = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = true;
            std::mem::take(&mut s.1)
        };
        for w in wakers {
            w.wake();
        }
    }

    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 {
            return Poll::Ready(());
        }
        if !s.1.iter().any(|w| w.will_wake(cx.waker())) {
            s.1.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The pool's one result-handler thread, started on first use: callbacks
/// run there, one at a time, in completion order.
pub(crate) struct Handler {
    tx: OnceLock<Sender<Box<dyn FnOnce() + Send>>>,
}

impl Handler {
    pub(crate) fn new() -> Self {
        Handler {
            tx: OnceLock::new(),
        }
    }

    /// Waits until every handler queued so far has run (unless called from
    /// the handler thread itself, which cannot wait for itself).
    pub(crate) fn drain(&self) {
        let Some(tx) = self.tx.get() else { return };
        if std::thread::current().name() == Some("procpool-results") {
            return;
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        if tx
            .send(Box::new(move || {
                let _ = done_tx.send(());
            }))
            .is_ok()
        {
            let _ = done_rx.recv();
        }
    }

    /// As [`drain`](Self::drain), without blocking: a signal set once every
    /// handler queued so far has run, or None if there is nothing to wait
    /// for (no handler thread, or this is it).
    pub(crate) fn drained_signal(&self) -> Option<Arc<Signal>> {
        let tx = self.tx.get()?;
        if std::thread::current().name() == Some("procpool-results") {
            return None;
        }
        let signal = Signal::new();
        let s = signal.clone();
        tx.send(Box::new(move || s.set())).ok()?;
        Some(signal)
    }

    pub(crate) fn run(&self, f: Box<dyn FnOnce() + Send>) {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
            let spawned = std::thread::Builder::new()
                .name("procpool-results".into())
                .spawn(move || {
                    for f in rx {
                        // Each job resolves its own slot; a panic that
                        // escaped one must not end the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                    }
                });
            if spawned.is_err() {
                // No thread: run handlers inline on the thread that completes them.
                let (tx2, _) = crossbeam_channel::bounded(0);
                return tx2;
            }
            tx
        });
        if let Err(e) = tx.send(f) {
            (e.into_inner())();
        }
    }
}

/// The chunks of one map: counts them down and completes the map's own slot
/// when the last one is in.
pub(crate) struct Group {
    remaining: AtomicUsize,
    pub(crate) items_done: AtomicUsize,
    pub(crate) done: Arc<Slot>,
    on_done: Mutex<Option<Box<dyn FnOnce() -> Outcome + Send>>>,
}

impl Group {
    pub(crate) fn new(chunks: usize, done: Arc<Slot>) -> Arc<Group> {
        Arc::new(Group {
            remaining: AtomicUsize::new(chunks),
            items_done: AtomicUsize::new(0),
            done,
            on_done: Mutex::new(None),
        })
    }

    pub(crate) fn set_on_done(&self, f: Box<dyn FnOnce() -> Outcome + Send>) {
        *self.on_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn chunk_done(self: &Arc<Self>, items: usize, handler: &Handler) {
        self.items_done.fetch_add(items, Ordering::SeqCst);
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.finish(handler);
        }
    }

    /// Completes the map's own slot: through its callbacks on the
    /// result-handler thread, if it has any.
    pub(crate) fn finish(&self, handler: &Handler) {
        let f = self
            .on_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match f {
            Some(f) => {
                let done = self.done.clone();
                handler.run(Box::new(move || done.set(guarded(f))));
            }
            None => self.done.set(Ok(Payload::Unit)),
        }
    }
}

/// Runs work of the result-handler thread (decoding with the user's
/// `Deserialize`, callbacks): a panic there becomes the result's error, so
/// the result still resolves and the thread lives on.
pub(crate) fn guarded(f: impl FnOnce() -> Outcome) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::CallbackPanicked {
            message: task::panic_message(&*p),
        })
    })
}

/// Stores a finished task's outcome, running its hook.
pub(crate) fn complete(slot: Arc<Slot>, hook: Hook, outcome: Outcome, handler: &Handler) {
    match hook {
        Hook::None => slot.set(outcome),
        Hook::Notify(hub, i) => {
            slot.set(outcome);
            hub.signal(i);
        }
        Hook::Group(g, n) => {
            slot.set(outcome);
            g.chunk_done(n, handler);
        }
        Hook::Handler(f) => handler.run(Box::new(move || slot.set(guarded(|| f(outcome))))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound on a wait that should end at once, so that a bug fails the
    /// test rather than hanging it.
    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_hub_hears_each_watched_slot_once_in_completion_order() {
        let hub = Hub::new();
        let (a, b, c) = (Slot::new(1), Slot::new(2), Slot::new(3));
        c.set(Ok(Payload::Unit));
        a.watch(&hub, 0);
        b.watch(&hub, 1);
        // Already finished: signalled at once.
        c.watch(&hub, 2);
        assert_eq!(hub.pop_until(Some(Instant::now())), Some(2));
        assert_eq!(hub.pop_until(Some(Instant::now())), None);
        b.set(Ok(Payload::Unit));
        a.set(Ok(Payload::Unit));
        b.set(Ok(Payload::Unit)); // a second outcome is ignored
        assert_eq!(hub.pop_until(Some(soon())), Some(1));
        assert_eq!(hub.try_pop(), Some(0));
        assert_eq!(hub.try_pop(), None);
        assert_eq!(hub.pop_until(Some(Instant::now())), None);
    }

    #[test]
    fn an_unwatched_slot_signals_nothing() {
        let (hub, other) = (Hub::new(), Hub::new());
        let s = Slot::new(1);
        s.watch(&hub, 0);
        s.watch(&other, 7);
        s.unwatch(&hub);
        s.set(Ok(Payload::Unit));
        assert_eq!(hub.pop_until(Some(Instant::now())), None);
        assert_eq!(other.pop_until(Some(Instant::now())), Some(7));
    }

    #[test]
    fn a_blocked_thread_wakes_when_any_slot_completes() {
        let hub = Hub::new();
        let slots: Vec<_> = (0..4).map(Slot::new).collect();
        for (i, s) in slots.iter().enumerate() {
            s.watch(&hub, i);
        }
        let h = hub.clone();
        let waiter = std::thread::spawn(move || h.pop_until(Some(soon())));
        slots[2].set(Err(Error::Cancelled));
        assert_eq!(waiter.join().unwrap(), Some(2));
        assert_eq!(slots[2].successful(), Some(false));
    }
}
