//! The one error type of the crate.

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
    #[error("the task panicked: {message}")]
    TaskPanicked {
        /// The panic's message.
        message: String,
    },
    /// The worker running the task died (a signal, `abort`, a segfault,
    /// `exit` inside the task, the out-of-memory killer). It has been replaced.
    #[error("worker {pid} was lost while running the task ({status})")]
    WorkerLost {
        /// The pid of the worker that died.
        pid: u32,
        /// How it ended, as its reaper saw it.
        status: ExitStatus,
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
         as it left them)"
    )]
    #[non_exhaustive]
    WorkerLostShared {
        /// The pid of the worker that died.
        pid: u32,
        /// How it ended, as its reaper saw it.
        status: ExitStatus,
        /// How many buffers the task held.
        buffers: usize,
    },
    /// The task ran longer than its timeout; its worker was killed and replaced.
    #[error("the task timed out after {timeout:?}; worker {pid} was killed")]
    Timeout {
        /// The timeout that was exceeded.
        timeout: Duration,
        /// The pid of the worker that was killed.
        pid: u32,
    },
    /// The task was cancelled before it finished.
    #[error("the task was cancelled")]
    Cancelled,
    /// The initializer failed in a worker (it panicked, or the worker died
    /// while running it). A pool never respawns a worker whose initializer failed.
    #[error("the worker initializer failed: {message}")]
    InitializerFailed {
        /// The panic message, or how the worker died.
        message: String,
    },
    /// A value could not be serialized (an argument in the caller, a result in
    /// the worker).
    #[error("could not encode the {what}: {source}")]
    Encode {
        /// What was being encoded: "argument" or "result".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: CodecError,
    },
    /// A value could not be deserialized (an argument in the worker, a result
    /// in the caller).
    #[error("could not decode the {what}: {source}")]
    Decode {
        /// What was being decoded: "argument" or "result".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: CodecError,
    },
    /// A callback attached to the task panicked; the value is lost.
    #[error("a callback panicked: {message}")]
    CallbackPanicked {
        /// The panic's message.
        message: String,
    },
    /// A message was larger than this process could allocate.
    #[error("a message of {len} bytes is too large")]
    TooLarge {
        /// Its length.
        len: u64,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the pool was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The fork server could not be started (for example, the program's
    /// executable cannot be exec'd for [`StartMethod::ForkServer`]); the
    /// reason says what to do instead.
    ///
    /// [`StartMethod::ForkServer`]: crate::StartMethod::ForkServer
    #[error("could not start the fork server: {reason}")]
    ServerStart {
        /// What went wrong, and the way out.
        reason: String,
    },
    /// The pool can no longer run tasks (its fork server died, or no worker
    /// could be started).
    #[error("the pool is broken: {reason}")]
    Broken {
        /// What broke it.
        reason: String,
    },
    /// The pool's configuration is invalid (zero processes, say).
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

impl Error {
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            context,
            source: Arc::new(source),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
