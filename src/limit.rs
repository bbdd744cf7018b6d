//! The limits of a sandbox, as an error names the one a task went past.
//! A leaf: the error type carries a `Limit`, and the sandbox (which
//! imports much of the crate) sets and checks them.

use std::time::Duration;

/// A limit of a [`Sandbox`](crate::Sandbox) that a task went past (in
/// [`Error::LimitExceeded`](crate::Error::LimitExceeded)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// The worker's memory cap (see
    /// [`Sandbox::memory_limit`](crate::Sandbox::memory_limit)).
    Memory {
        /// The cap.
        bytes: u64,
    },
    /// The per-task CPU-time cap (see
    /// [`Sandbox::cpu_time_per_task`](crate::Sandbox::cpu_time_per_task)).
    CpuTime {
        /// The cap.
        per_task: Duration,
    },
    /// The open-files cap (see
    /// [`Sandbox::open_files`](crate::Sandbox::open_files)).
    OpenFiles {
        /// The cap.
        max: u64,
    },
    /// The file-size cap (see
    /// [`Sandbox::file_size_limit`](crate::Sandbox::file_size_limit)).
    FileSize {
        /// The cap.
        bytes: u64,
    },
    /// The cap on what a worker writes to its stdout and stderr together
    /// (see [`Sandbox::output_limit`](crate::Sandbox::output_limit)).
    Output {
        /// The cap.
        bytes: u64,
    },
    /// The wall-clock limit every sandboxed task has when neither it nor
    /// the pool sets a timeout: ten times the CPU-time cap, or 60 seconds
    /// without one. A chunk of a map may take it once per item. A timeout
    /// set on the task or the pool replaces it (and fails the task with
    /// [`Error::Timeout`](crate::Error::Timeout) instead).
    WallClock {
        /// The limit, per item.
        per_task: Duration,
    },
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Memory { bytes } => write!(f, "memory limit ({bytes} bytes)"),
            Limit::CpuTime { per_task } => write!(f, "CPU-time limit ({per_task:?} per task)"),
            Limit::OpenFiles { max } => write!(f, "open-files limit ({max})"),
            Limit::FileSize { bytes } => write!(f, "file-size limit ({bytes} bytes)"),
            Limit::Output { bytes } => write!(f, "output limit ({bytes} bytes)"),
            Limit::WallClock { per_task } => {
                write!(f, "wall-clock limit ({per_task:?} per task)")
            }
        }
    }
}
