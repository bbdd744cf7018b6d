//! The pool's methods for a [`Task`]: a task with state of its own, the
//! counterparts of the `fn` methods in `pool.rs` (same queues, options and
//! results; only what travels differs, as `proto/task.rs` says).

use crate::api::encode::encode_state;
use crate::api::options::{MapOptions, TaskOptions};
use crate::api::pool::Pool;
use crate::api::result::{AsyncResult, Imap, ImapUnordered, MapResult};
use crate::error::Result;
use crate::proto::task::{Task, TaskFn};

impl Pool {
    /// Runs `task.run(arg)` in a worker and waits for its value: as
    /// [`apply`](Self::apply), for a [`Task`] whose state travels with
    /// the argument.
    ///
    /// ```
    /// use procpool::{Pool, Task};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Greet { greeting: String }
    ///
    /// impl Task for Greet {
    ///     type Arg = String;
    ///     type Output = String;
    ///     fn run(&self, name: String) -> String { format!("{}, {name}", self.greeting) }
    /// }
    ///
    /// let pool = Pool::builder().processes(1).build()?;
    /// let hello = Greet { greeting: "hello".into() };
    /// assert_eq!(pool.apply_task(&hello, "world".into())?, "hello, world");
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn apply_task<T: Task>(&self, task: &T, arg: T::Arg) -> Result<T::Output> {
        self.apply_task_async(task, arg)?.get()
    }

    /// [`apply_task`](Self::apply_task) with per-task options.
    pub fn apply_task_with<T: Task>(
        &self,
        task: &T,
        arg: T::Arg,
        opts: TaskOptions<T::Output>,
    ) -> Result<T::Output> {
        self.apply_task_async_with(task, arg, opts)?.get()
    }

    /// Queues `task.run(arg)` and returns at once: as
    /// [`apply_async`](Self::apply_async). The task's state is encoded
    /// now, with the argument; [`Error::Encode`](crate::Error::Encode) if either cannot be.
    ///
    /// ```
    /// use procpool::{Pool, Task};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Dot { weights: Vec<f64> }
    ///
    /// impl Task for Dot {
    ///     type Arg = Vec<f64>;
    ///     type Output = f64;
    ///     fn run(&self, xs: Vec<f64>) -> f64 {
    ///         self.weights.iter().zip(xs).map(|(w, x)| w * x).sum()
    ///     }
    /// }
    ///
    /// let pool = Pool::builder().processes(1).build()?;
    /// let r = pool.apply_task_async(&Dot { weights: vec![1.0, 2.0] }, vec![3.0, 4.0])?;
    /// assert_eq!(r.get()?, 11.0);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn apply_task_async<T: Task>(
        &self,
        task: &T,
        arg: T::Arg,
    ) -> Result<AsyncResult<T::Output>> {
        self.apply_task_async_with(task, arg, TaskOptions::default())
    }

    /// [`apply_task_async`](Self::apply_task_async) with a timeout,
    /// retries and callbacks (see [`TaskOptions`]).
    pub fn apply_task_async_with<T: Task>(
        &self,
        task: &T,
        arg: T::Arg,
        opts: TaskOptions<T::Output>,
    ) -> Result<AsyncResult<T::Output>> {
        self.submit_one(TaskFn::of_task::<T>(), &(task, &arg), opts)
    }

    /// Runs `task.run(item)` for every item, in chunks, and returns the
    /// values in input order: as [`map`](Self::map). The task's state is
    /// encoded once, and decoded once per chunk in the worker that runs it.
    ///
    /// ```
    /// use procpool::{Pool, Task};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Offset(i64);
    ///
    /// impl Task for Offset {
    ///     type Arg = i64;
    ///     type Output = i64;
    ///     fn run(&self, x: i64) -> i64 { x + self.0 }
    /// }
    ///
    /// let pool = Pool::builder().processes(2).build()?;
    /// assert_eq!(pool.map_task(&Offset(10), 1..=3)?, vec![11, 12, 13]);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn map_task<T: Task>(
        &self,
        task: &T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> Result<Vec<T::Output>> {
        self.map_task_async(task, items)?.get()
    }

    /// [`map_task`](Self::map_task) with options (chunk size, timeout,
    /// retries).
    pub fn map_task_with<T: Task>(
        &self,
        task: &T,
        items: impl IntoIterator<Item = T::Arg>,
        opts: MapOptions<T::Output>,
    ) -> Result<Vec<T::Output>> {
        self.map_task_async_with(task, items, opts)?.get()
    }

    /// Queues a [`map_task`](Self::map_task) and returns at once; see
    /// [`MapResult`].
    pub fn map_task_async<T: Task>(
        &self,
        task: &T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> Result<MapResult<T::Output>> {
        self.map_task_async_with(task, items, MapOptions::default())
    }

    /// [`map_task_async`](Self::map_task_async) with options and
    /// callbacks (see [`MapOptions`]).
    pub fn map_task_async_with<T: Task>(
        &self,
        task: &T,
        items: impl IntoIterator<Item = T::Arg>,
        opts: MapOptions<T::Output>,
    ) -> Result<MapResult<T::Output>> {
        let state = encode_state(task)?;
        self.map_chunks(TaskFn::task_chunk::<T>(), &state, items, opts)
    }

    /// A lazy iterator of `task.run(item)` for every item, in input
    /// order: as [`imap`](Self::imap). The task's state is encoded once;
    /// if it cannot be, every item is that [`Error::Encode`](crate::Error::Encode).
    pub fn imap_task<T: Task, I: IntoIterator<Item = T::Arg>>(
        &self,
        task: &T,
        items: I,
    ) -> Imap<T::Output, I::IntoIter> {
        self.imap_task_with(task, items, MapOptions::default())
    }

    /// [`imap_task`](Self::imap_task) with options (chunk size, in-flight
    /// bound, ...).
    pub fn imap_task_with<T: Task, I: IntoIterator<Item = T::Arg>>(
        &self,
        task: &T,
        items: I,
        opts: MapOptions<T::Output>,
    ) -> Imap<T::Output, I::IntoIter> {
        self.imap_chunks(TaskFn::task_chunk::<T>(), encode_state(task), items, opts)
    }

    /// Like [`imap_task`](Self::imap_task), but yields results in the
    /// order they finish.
    pub fn imap_unordered_task<T: Task, I: IntoIterator<Item = T::Arg>>(
        &self,
        task: &T,
        items: I,
    ) -> ImapUnordered<T::Output, I::IntoIter> {
        self.imap_unordered_task_with(task, items, MapOptions::default())
    }

    /// [`imap_unordered_task`](Self::imap_unordered_task) with options.
    pub fn imap_unordered_task_with<T: Task, I: IntoIterator<Item = T::Arg>>(
        &self,
        task: &T,
        items: I,
        opts: MapOptions<T::Output>,
    ) -> ImapUnordered<T::Output, I::IntoIter> {
        let state = encode_state(task);
        self.imap_unordered_chunks(TaskFn::task_chunk::<T>(), state, items, opts)
    }
}
