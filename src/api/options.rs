//! The options of a call ([`TaskOptions`], [`MapOptions`]), what a task's
//! values must be ([`Data`]), and the `setters!` macro the option types
//! and the builder write their plain methods with.

use crate::engine::job::JobOptions;
use crate::error::Error;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Builder methods that store what they are given. Each entry is a
/// method's docs, its name and argument, and the fields it sets:
/// `fn timeout(t: Duration) { timeout = Some(t) }` becomes
/// `pub fn timeout(mut self, t: Duration) -> Self`.
macro_rules! setters {
    ($($(#[$doc:meta])* fn $name:ident($arg:ident: $t:ty) { $($field:ident = $val:expr),+ })*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $t) -> Self {
                $(self.$field = $val;)+
                self
            }
        )*
    };
}
pub(crate) use setters;

/// A value that can travel to a worker and back: anything serde can
/// serialize and deserialize into an owned value.
///
/// Arguments, map items and results must be **owned**: they are bytes in
/// another process, and a worker's value cannot borrow from the caller's
/// memory. So `String`, not `&str`; `Vec<u8>`, not `&[u8]`:
///
/// ```
/// fn shout(s: String) -> String { s.to_uppercase() }
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let words = ["a", "b"].map(String::from);          // owned items
/// assert_eq!(pool.map(shout, words)?, vec!["A", "B"]);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// Borrowed items do not compile. The compiler says "implementation of
/// `Deserialize` is not general enough" (`&str` implements `Deserialize`
/// only for one lifetime, the bytes it borrows from, where an owned value
/// is `for<'de> Deserialize<'de>`); that error has no code:
///
/// ```compile_fail
/// fn len(s: &str) -> usize { s.len() }
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let n = pool.map(len, vec!["a", "b"]); // error: `Deserialize` is not general enough
/// # Ok::<(), procpool::Error>(())
/// ```
pub trait Data: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Data for T {}

pub(crate) type OnSuccess<R> = Box<dyn FnOnce(&R) + Send>;
pub(crate) type OnError = Box<dyn FnOnce(&Error) + Send>;

/// Per-task settings for [`Pool::apply_async_with`](crate::Pool::apply_async_with): a timeout, retries and
/// callbacks. Callbacks run on the pool's result-handler thread, one at a
/// time, in completion order, before the result becomes ready; a callback
/// that panics turns the task's result into [`Error::CallbackPanicked`].
///
/// ```
/// use procpool::{Pool, TaskOptions};
/// use std::sync::mpsc;
/// fn square(x: u64) -> u64 { x * x }
/// let pool = Pool::builder().processes(2).build()?;
/// let (tx, rx) = mpsc::channel();
/// let r = pool.apply_async_with(square, 9, TaskOptions::new().on_success(move |v: &u64| {
///     tx.send(*v).unwrap();
/// }))?;
/// assert_eq!(r.get()?, 81);
/// assert_eq!(rx.recv().unwrap(), 81);
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "options apply only once given to an _with method"]
pub struct TaskOptions<R> {
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    pub(crate) retry_shared: bool,
    pub(crate) on_success: Option<OnSuccess<R>>,
    pub(crate) on_error: Option<OnError>,
}

impl<R> Default for TaskOptions<R> {
    fn default() -> Self {
        TaskOptions {
            timeout: None,
            soft_timeout: None,
            retries: None,
            retry_shared: false,
            on_success: None,
            on_error: None,
        }
    }
}

impl<R> TaskOptions<R> {
    /// No timeout beyond the pool's, no retries beyond the pool's, no callbacks.
    pub fn new() -> Self {
        Self::default()
    }

    /// What goes with the task's job.
    pub(crate) fn job_options(&self) -> JobOptions {
        JobOptions {
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            retry_shared: self.retry_shared,
        }
    }

    setters! {
        /// Kill the worker and fail the task with [`Error::Timeout`] if it runs
        /// longer than this (overrides the pool's default).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A soft time limit (overrides the pool's default): once the task has
        /// run this long, [`deadline_passed`](crate::deadline_passed) returns
        /// true in it, so that it can stop with a partial result or clean up.
        /// Nothing is killed at the soft limit; the hard
        /// [`timeout`](Self::timeout), if any, still kills the worker later.
        /// As billiard's (Celery's) `soft_time_limit`, but cooperative.
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Run the task again, up to `n` times, if its worker dies under it
        /// (overrides the pool's default). Only for idempotent work. A task
        /// whose argument holds [`SharedBuf`](crate::SharedBuf)s is not run
        /// again (it fails with [`Error::WorkerLostShared`]) unless
        /// [`retries_with_shared`](Self::retries_with_shared) asks for it.
        fn retries(n: u32) { retries = Some(n) }

        /// As [`retries`](Self::retries), and also for a task whose argument
        /// holds [`SharedBuf`](crate::SharedBuf)s: the retry gets the same
        /// buffers as the dead worker left them, possibly half written. Only
        /// for work that copes with that (it rewrites them whole, say).
        fn retries_with_shared(n: u32) { retries = Some(n), retry_shared = true }

        /// Called with the value on the result-handler thread.
        fn on_success(f: impl FnOnce(&R) + Send + 'static) { on_success = Some(Box::new(f)) }

        /// Called with the error on the result-handler thread.
        fn on_error(f: impl FnOnce(&Error) + Send + 'static) { on_error = Some(Box::new(f)) }
    }
}

impl<R> std::fmt::Debug for TaskOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskOptions")
            .field("timeout", &self.timeout)
            .field("soft_timeout", &self.soft_timeout)
            .field("retries", &self.retries)
            .field("retry_shared", &self.retry_shared)
            .field("on_success", &self.on_success.is_some())
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

/// Settings for the map family: chunk size, per-chunk timeout and retries,
/// how many chunks an `imap` keeps in flight, and (for `map_async_with`)
/// callbacks that receive the whole list.
///
/// ```
/// use procpool::{MapOptions, Pool};
/// fn inc(x: u32) -> u32 { x + 1 }
/// let pool = Pool::builder().processes(2).build()?;
/// let v = pool.map_with(inc, 0..10, MapOptions::new().chunksize(3))?;
/// assert_eq!(v, (1..11).collect::<Vec<_>>());
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "options apply only once given to an _with method"]
pub struct MapOptions<R> {
    pub(crate) chunksize: Option<usize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    pub(crate) retry_shared: bool,
    pub(crate) in_flight: Option<usize>,
    pub(crate) on_success: Option<OnSuccess<Vec<R>>>,
    pub(crate) on_error: Option<OnError>,
}

impl<R> Default for MapOptions<R> {
    fn default() -> Self {
        MapOptions {
            chunksize: None,
            timeout: None,
            soft_timeout: None,
            retries: None,
            retry_shared: false,
            in_flight: None,
            on_success: None,
            on_error: None,
        }
    }
}

impl<R> MapOptions<R> {
    /// The defaults: CPython's chunk size for `map`, chunks the pool sizes
    /// itself for `imap` (see [`Pool::imap`](crate::Pool::imap)), the pool's timeout and
    /// retries.
    pub fn new() -> Self {
        Self::default()
    }

    /// What goes with each chunk's job.
    pub(crate) fn job_options(&self) -> JobOptions {
        JobOptions {
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            retry_shared: self.retry_shared,
        }
    }

    setters! {
        /// Items per task, as in CPython: every chunk but the last holds
        /// exactly `n` items. Zero counts as 1. Without it, `map` uses
        /// ceil(n / (4 × workers)) as CPython does (over MPI ceil(n / (16 ×
        /// workers)): there a worker holds its next chunk while it runs
        /// one), and `imap` and
        /// `imap_unordered` size each chunk themselves, from what the pool
        /// learns of the task's run time and of the input's (see
        /// [`Pool::imap`](crate::Pool::imap)); `chunksize(1)` gives CPython's `imap`, one item
        /// per task.
        fn chunksize(n: usize) { chunksize = Some(n.max(1)) }

        /// A timeout for each chunk (see [`TaskOptions::timeout`]).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A soft time limit for each chunk (see [`TaskOptions::soft_timeout`]).
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Retries for each chunk whose worker dies (see [`TaskOptions::retries`]).
        fn retries(n: u32) { retries = Some(n) }

        /// Retries for each chunk, also for chunks that hold
        /// [`SharedBuf`](crate::SharedBuf)s (see
        /// [`TaskOptions::retries_with_shared`]).
        fn retries_with_shared(n: u32) { retries = Some(n), retry_shared = true }

        /// For `imap`: at most this many chunks in flight (default: enough to
        /// keep every worker busy, at least 4 per worker). Where `imap`
        /// sizes its chunks itself (no [`chunksize`](Self::chunksize)), at
        /// most this many items, as with chunks of one item.
        fn in_flight(chunks: usize) { in_flight = Some(chunks.max(1)) }

        /// For `map_async_with`: called with every value, in input order.
        fn on_success(f: impl FnOnce(&Vec<R>) + Send + 'static) { on_success = Some(Box::new(f)) }

        /// For `map_async_with`: called with the first error in input order.
        fn on_error(f: impl FnOnce(&Error) + Send + 'static) { on_error = Some(Box::new(f)) }
    }
}

impl<R> std::fmt::Debug for MapOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapOptions")
            .field("chunksize", &self.chunksize)
            .field("timeout", &self.timeout)
            .field("soft_timeout", &self.soft_timeout)
            .field("retries", &self.retries)
            .field("retry_shared", &self.retry_shared)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}
