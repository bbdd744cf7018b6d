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
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Memory { bytes } => write!(f, "memory limit ({bytes} bytes)"),
            Limit::CpuTime { per_task } => write!(f, "CPU-time limit ({per_task:?} per task)"),
            Limit::OpenFiles { max } => write!(f, "open-files limit ({max})"),
            Limit::FileSize { bytes } => write!(f, "file-size limit ({bytes} bytes)"),
        }
    }
}
