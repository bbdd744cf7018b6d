//! A process-wide pool for library code, built on first use: as loky's
//! `get_reusable_executor` and rayon's global thread pool.

use crate::api::builder::PoolBuilder;
use crate::api::pool::Pool;
use crate::error::{Error, Result};
use std::sync::{Mutex, OnceLock};

static POOL: OnceLock<Pool> = OnceLock::new();
/// The builder set by `configure_global`, and whether one was set.
static SETUP: Mutex<(Option<PoolBuilder>, bool)> = Mutex::new((None, false));

/// The process-wide pool, built on first use: for library code that wants
/// "a process pool" without making its callers pass one in, nor starting
/// one per call.
///
/// It has one worker per CPU and the default settings, with the safe
/// start method ([`StartMethod::ForkServer`](crate::StartMethod::ForkServer),
/// whatever `PROCPOOL_START_METHOD` says: library code cannot know whether
/// the program has threads), unless [`configure_global`] was called before
/// its first use. It is built by
/// the first call (other threads calling meanwhile wait for it) and lives
/// until the process exits: then its server and workers see end-of-file
/// and exit. If building it fails, the error is returned and the next call
/// tries again.
///
/// Inside a worker (a task that calls `global()`) it is
/// [`Error::InWorker`], not a pool per worker.
///
/// Prefer a pool of your own ([`Pool::builder`]) when you need its
/// lifecycle (`close`, `join`, `terminate`: do not call them on the
/// global pool, which every user shares), settings of your own (an
/// initializer, timeouts, `max_tasks_per_child`) that other users of the
/// global pool should not get, or work kept apart from other libraries'.
/// Applications, which know how many processes they can afford, should
/// usually build their own; libraries that need one now and then can
/// share this one.
///
/// ```
/// fn square(x: u64) -> u64 { x * x }
///
/// // Library code: no pool in its signature.
/// pub fn sum_of_squares(n: u64) -> Result<u64, procpool::Error> {
///     Ok(procpool::global()?.map(square, 0..n)?.iter().sum())
/// }
///
/// assert_eq!(sum_of_squares(4)?, 14);
/// assert!(std::ptr::eq(procpool::global()?, procpool::global()?));  // one pool
/// # Ok::<(), procpool::Error>(())
/// ```
pub fn global() -> Result<&'static Pool> {
    if crate::worker::in_worker() {
        return Err(Error::InWorker);
    }
    if let Some(p) = POOL.get() {
        return Ok(p);
    }
    let setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = POOL.get() {
        return Ok(p);
    }
    // The safe start method, whatever PROCPOOL_START_METHOD says: library
    // code cannot know whether the program has threads.
    let pool = setup
        .0
        .clone()
        .unwrap_or_else(|| Pool::builder().start_method(crate::StartMethod::ForkServer))
        .build()?;
    Ok(POOL.get_or_init(|| pool))
}

/// Sets how [`global`] builds the process-wide pool (say, fewer workers,
/// or an initializer). Allowed once, before the pool's first use; later it
/// is [`Error::Config`], since a pool in use cannot change.
///
/// ```
/// let ok = procpool::configure_global(procpool::Pool::builder().processes(2));
/// // Fails if something in this process already used the global pool.
/// if ok.is_ok() {
///     assert_eq!(procpool::global()?.processes(), 2);
/// }
/// assert!(procpool::configure_global(procpool::Pool::builder()).is_err()); // only once
/// # Ok::<(), procpool::Error>(())
/// ```
pub fn configure_global(builder: PoolBuilder) -> Result<()> {
    if crate::worker::in_worker() {
        return Err(Error::InWorker);
    }
    let mut setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if POOL.get().is_some() {
        return Err(Error::Config(
            "the global pool is already built; configure it before its first use",
        ));
    }
    if setup.1 {
        return Err(Error::Config("the global pool was already configured"));
    }
    *setup = (Some(builder), true);
    Ok(())
}
