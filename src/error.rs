//! The one error type of the crate.

use crate::traceback::{PanicLocation, RemoteBacktrace};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// Why a serialization step failed: the message of the underlying format
/// (for a hand-written `Serialize` or `Deserialize`, the message it gave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    message: String,
}

impl CodecError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        CodecError {
            message: message.into(),
        }
    }

    /// The message of the underlying format.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CodecError {}

/// Everything that can go wrong with a pool or one of its tasks.
///
/// Every submitted task resolves exactly once, with its value or with one of
/// these. `Error` is `Clone`, so that a failure shared by several results
/// (every item of a chunk whose worker died, say) can be given to each.
///
/// The enum and each of its variants with named fields are
/// `#[non_exhaustive]` (`Config`'s one message stays as it is):
/// later versions may add variants, and fields to a variant (as
/// `TaskPanicked` gained its location and backtrace), without breaking
/// code that matches with `_` and `..`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pool was closed: it takes no new tasks.
    #[error("the pool is closed and takes no new tasks")]
    Closed,
    /// The pool was terminated (or dropped) before this task finished.
    #[error("the pool was terminated")]
    Terminated,
    /// `join` was called on a pool that is still running: call `close` or
    /// `terminate` first.
    #[error("join needs a closed or terminated pool; call close() or terminate() first")]
    StillRunning,
    /// The task panicked in its worker; the worker goes on serving.
    ///
    /// `Display` shows where, and the worker's backtrace when there is one,
    /// as CPython shows a worker's traceback (`RemoteTraceback`):
    ///
    /// ```text
    /// the task panicked at src/main.rs:4:5: negative: -1
    ///
    /// worker backtrace:
    ///    0: core::panicking::panic_fmt
    ///              at /rustc/.../library/core/src/panicking.rs:75:14
    ///    1: demo::check
    ///              at src/main.rs:4:5
    /// ```
    #[error("the task panicked{}: {message}{}{}", crate::traceback::at(.location), crate::traceback::shown(.backtrace), shown(.last_words))]
    #[non_exhaustive]
    TaskPanicked {
        /// The panic's message. A payload of another type than a string
        /// (`std::panic::panic_any`) is shown if it is an error or a number,
        /// else described.
        message: String,
        /// Where it panicked: the file, line and column of the `panic!`
        /// (or of the `unwrap`, the index out of bounds...).
        location: Option<PanicLocation>,
        /// The worker's stack at the panic, when the pool was built with
        /// [`PoolBuilder::backtraces`](crate::PoolBuilder::backtraces) or
        /// with `RUST_BACKTRACE` set.
        backtrace: Option<RemoteBacktrace>,
        /// The worker's crash report: see [`Error::last_words`].
        last_words: Option<Arc<str>>,
    },
    /// The worker running the task died (a signal, `abort`, a segfault,
    /// `exit` inside the task, the out-of-memory killer). It has been replaced.
    #[error("worker {pid}{} was lost while running the task ({status}){}", on_rank(*rank), shown(.last_words))]
    #[non_exhaustive]
    WorkerLost {
        /// The pid of the worker that died (on its rank's host, over MPI).
        pid: u32,
        /// How it ended, as its reaper saw it.
        status: ExitStatus,
        /// The MPI rank it ran on (`None` in a local pool).
        rank: Option<usize>,
        /// The worker's crash report: see [`Error::last_words`].
        last_words: Option<Arc<str>>,
    },
    /// The worker running a task whose argument held [`SharedBuf`]s died
    /// part-way (as [`WorkerLost`](Error::WorkerLost)). The buffers were
    /// released with the task, and it was not run again even if it had
    /// retries: the dead worker may have half written them.
    /// [`TaskOptions::retries_with_shared`] asks for a retry anyway.
    ///
    /// [`SharedBuf`]: crate::SharedBuf
    /// [`TaskOptions::retries_with_shared`]: crate::TaskOptions::retries_with_shared
    #[error(
        "worker {pid} was lost while running a task that held {buffers} SharedBuf(s) ({status}); \
         the buffers were released with the task, which was not run again since the worker may \
         have half written them (TaskOptions::retries_with_shared allows a retry that sees them \
         as it left them){}",
        shown(.last_words)
    )]
    #[non_exhaustive]
    WorkerLostShared {
        /// The pid of the worker that died.
        pid: u32,
        /// How it ended, as its reaper saw it.
        status: ExitStatus,
        /// How many buffers the task held.
        buffers: usize,
        /// The worker's crash report: see [`Error::last_words`].
        last_words: Option<Arc<str>>,
    },
    /// The task ran longer than its timeout; its worker was killed and replaced.
    #[error("the task timed out after {timeout:?}; worker {pid}{} was killed{}", on_rank(*rank), shown(.last_words))]
    #[non_exhaustive]
    Timeout {
        /// The timeout that was exceeded.
        timeout: Duration,
        /// The pid of the worker that was killed (on its rank's host, over
        /// MPI).
        pid: u32,
        /// The MPI rank it ran on (`None` in a local pool).
        rank: Option<usize>,
        /// The worker's crash report: see [`Error::last_words`].
        last_words: Option<Arc<str>>,
    },
    /// The task was cancelled before it finished.
    #[error("the task was cancelled")]
    Cancelled,
    /// The initializer failed in a worker (it panicked, or the worker died
    /// while running it). A pool never respawns a worker whose initializer failed.
    #[error("the worker initializer failed: {message}")]
    #[non_exhaustive]
    InitializerFailed {
        /// The panic message, or how the worker died.
        message: String,
    },
    /// A value could not be serialized (an argument in the caller, a result in
    /// the worker).
    #[error("could not encode the {what}: {source}")]
    #[non_exhaustive]
    Encode {
        /// What was being encoded: "argument", "result", or "task" (a
        /// [`Task`](crate::Task)'s state, for the map family).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: CodecError,
    },
    /// A value could not be deserialized (an argument in the worker, a result
    /// in the caller).
    #[error("could not decode the {what}: {source}")]
    #[non_exhaustive]
    Decode {
        /// What was being decoded: "argument" or "result".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: CodecError,
    },
    /// A callback attached to the task panicked; the value is lost.
    #[error("a callback panicked: {message}")]
    #[non_exhaustive]
    CallbackPanicked {
        /// The panic's message.
        message: String,
    },
    /// A message was larger than this process could allocate.
    #[error("a message of {len} bytes is too large")]
    #[non_exhaustive]
    TooLarge {
        /// Its length.
        len: u64,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    #[non_exhaustive]
    Io {
        /// What the pool was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The fork server could not be started (for example, the program's
    /// executable cannot be exec'd for [`StartMethod::ForkServer`], or a
    /// task in a sandboxed worker, which may start no process, built a
    /// pool); the reason says what to do instead.
    ///
    /// [`StartMethod::ForkServer`]: crate::StartMethod::ForkServer
    #[error("could not start the fork server: {reason}")]
    #[non_exhaustive]
    ServerStart {
        /// What went wrong, and the way out.
        reason: String,
    },
    /// The pool can no longer run tasks (its fork server died, or no worker
    /// could be started).
    #[error("the pool is broken: {reason}")]
    #[non_exhaustive]
    Broken {
        /// What broke it.
        reason: String,
    },
    /// [`global`](crate::global) (or
    /// [`configure_global`](crate::configure_global)) was called inside a
    /// worker: a task cannot use the process-wide pool, and starting one
    /// per worker would multiply processes.
    #[error("the global pool cannot be used inside a worker process")]
    InWorker,
    /// The pool's configuration is invalid (zero processes, say).
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// Over MPI: the rank that held the task was lost as a whole (its
    /// process died, or its host failed or was cut off from rank 0), so
    /// the task's result will never come. No wait status exists for a
    /// rank, so none is given: `rank` and `host` say which was lost.
    ///
    /// A task with retries left runs again on another rank instead, and
    /// tasks not yet sent to the rank stay queued: only the tasks the rank
    /// held fail, each exactly once. The pool goes on with the other
    /// ranks (see [`Pool::processes`](crate::Pool::processes)).
    #[error(
        "MPI rank {rank} on host {host} was lost (its process died, or its host failed or was cut off) while it held the task"
    )]
    #[non_exhaustive]
    RankLost {
        /// The rank that was lost.
        rank: usize,
        /// Its host's name, as the rank reported it when the pool started.
        host: String,
    },
    /// The task went past a limit of the pool's [`Sandbox`]: its worker
    /// was killed (or ended itself) and has been replaced.
    ///
    /// [`Sandbox`]: crate::Sandbox
    #[error("the task went past the sandbox's {limit}; worker {pid} was replaced{}", shown(.last_words))]
    #[non_exhaustive]
    LimitExceeded {
        /// The limit it went past.
        limit: crate::limit::Limit,
        /// The pid of the worker that ran it.
        pid: u32,
        /// The worker's crash report: see [`Error::last_words`].
        last_words: Option<Arc<str>>,
    },
    /// A sandboxed worker sent what the pool's protocol does not allow: a
    /// frame or a result larger than the sandbox's
    /// [`result_limit`](crate::Sandbox::result_limit), file descriptors
    /// where none may come, a malformed frame, or an answer to a task it
    /// was not given. The pool believed none of it: it killed the worker
    /// (and replaced it), and the task it ran fails with this error. Only
    /// a sandboxed pool reports it (a task there is taken to be hostile);
    /// without a sandbox such a worker breaks the pool's protocol as
    /// [`Broken`](Error::Broken) says.
    ///
    /// [`Sandbox`]: crate::Sandbox
    #[error("worker {pid} broke the pool's protocol and was killed: {reason}")]
    #[non_exhaustive]
    ProtocolViolation {
        /// The pid of the worker that sent it.
        pid: u32,
        /// What it sent that the protocol does not allow.
        reason: String,
    },
    /// The pool's [`Sandbox`] cannot be had as asked: the kernel lacks a
    /// mechanism it needs (and the sandbox does not accept a weaker one),
    /// the start method cannot carry it, a listed path is missing, or a
    /// worker's initializer left threads running. The reason says which.
    ///
    /// [`Sandbox`]: crate::Sandbox
    #[error("the sandbox cannot be applied: {reason}")]
    #[non_exhaustive]
    Sandbox {
        /// What is missing or wrong, and the way out.
        reason: String,
    },
}

impl Error {
    /// The worker's crash report: the last bytes (at most 4 KiB) it wrote
    /// to its stderr before the failure, for [`WorkerLost`],
    /// [`WorkerLostShared`], [`TaskPanicked`], [`Timeout`] and
    /// [`LimitExceeded`]. `Display` shows them after the cause.
    ///
    /// There are some only where the workers' stderr goes through the
    /// pool ([`PoolBuilder::stderr`] with anything but
    /// [`Output::Inherit`], the default of an unsandboxed pool), and the
    /// worker wrote something. They are the worker's last words, not the
    /// task's: a worker that runs several tasks (a chunk of `map`, or
    /// tasks sent while it ran) may have written some of them for an
    /// earlier task, and a task's child that still holds the worker's
    /// stderr may have added to them. What a sandboxed worker wrote is
    /// shown with its control characters escaped (`\x1b`).
    ///
    /// [`WorkerLost`]: Error::WorkerLost
    /// [`WorkerLostShared`]: Error::WorkerLostShared
    /// [`TaskPanicked`]: Error::TaskPanicked
    /// [`Timeout`]: Error::Timeout
    /// [`LimitExceeded`]: Error::LimitExceeded
    /// [`PoolBuilder::stderr`]: crate::PoolBuilder::stderr
    /// [`Output::Inherit`]: crate::Output::Inherit
    ///
    /// ```
    /// use procpool::{Error, Output, Pool};
    /// fn check(x: i32) -> i32 {
    ///     if x <= 0 {
    ///         eprintln!("assertion failed: x > 0 (x = {x})");
    ///         std::process::abort();
    ///     }
    ///     x
    /// }
    /// let pool = Pool::builder().processes(1).stderr(Output::Null).build()?;
    /// let e = pool.apply(check, -1).unwrap_err();
    /// assert!(matches!(e, Error::WorkerLost { .. }));
    /// assert!(e.last_words().unwrap().contains("assertion failed: x > 0"));
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn last_words(&self) -> Option<&str> {
        match self {
            Error::WorkerLost { last_words, .. }
            | Error::WorkerLostShared { last_words, .. }
            | Error::TaskPanicked { last_words, .. }
            | Error::Timeout { last_words, .. }
            | Error::LimitExceeded { last_words, .. } => last_words.as_deref(),
            _ => None,
        }
    }

    /// Gives this error `words` as its crash report, if it is of a kind
    /// that carries one and has none yet.
    pub(crate) fn add_last_words(&mut self, words: Option<&Arc<str>>) {
        if let (
            Error::WorkerLost { last_words, .. }
            | Error::WorkerLostShared { last_words, .. }
            | Error::TaskPanicked { last_words, .. }
            | Error::Timeout { last_words, .. }
            | Error::LimitExceeded { last_words, .. },
            Some(w),
        ) = (self, words)
        {
            last_words.get_or_insert_with(|| w.clone());
        }
    }

    /// Whether this is an error that a crash report belongs to and that
    /// has none yet.
    pub(crate) fn wants_last_words(&self) -> bool {
        matches!(
            self,
            Error::WorkerLost {
                last_words: None,
                ..
            } | Error::WorkerLostShared {
                last_words: None,
                ..
            } | Error::TaskPanicked {
                last_words: None,
                ..
            } | Error::Timeout {
                last_words: None,
                ..
            } | Error::LimitExceeded {
                last_words: None,
                ..
            }
        )
    }

    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            context,
            source: Arc::new(source),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The crash report after the cause, as `Display` shows it: each line
/// indented under a heading.
fn shown(last_words: &Option<Arc<str>>) -> String {
    let Some(words) = last_words.as_deref() else {
        return String::new();
    };
    let mut s = String::from("\n\nthe worker's last words (stderr):");
    for line in words.lines() {
        s.push_str("\n    ");
        s.push_str(line);
    }
    s
}

/// " on MPI rank N" for a worker that ran on a rank; "" for a local one.
fn on_rank(rank: Option<usize>) -> String {
    rank.map(|r| format!(" on MPI rank {r}"))
        .unwrap_or_default()
}
