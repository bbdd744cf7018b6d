#![doc = include_str!("tutorial.md")]
#![warn(missing_docs)]

// procpool is built on Linux interfaces (memfd, eventfd, signalfd,
// PR_SET_PDEATHSIG, /proc). On any other target the build stops here with
// this one message, rather than with pages of errors from inside libc
// calls: every module below is compiled for Linux only.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "procpool supports Linux only: it needs memfd_create, eventfd, signalfd, \
     prctl(PR_SET_PDEATHSIG) and /proc. A port to macOS would need other ways \
     to share memory blocks (shm_open), to wake a thread (a pipe or kqueue) and \
     to tie workers to their server's life (kqueue's NOTE_EXIT); see the \
     README's Platforms section."
);

#[cfg(target_os = "linux")]
mod capture;
#[cfg(target_os = "linux")]
mod codec;
#[cfg(target_os = "linux")]
mod deadline;
#[cfg(target_os = "linux")]
mod error;
#[cfg(target_os = "linux")]
mod global;
#[cfg(target_os = "linux")]
mod join;
#[cfg(all(target_os = "linux", feature = "mpi"))]
mod mpi;
#[cfg(target_os = "linux")]
mod pool;
#[cfg(target_os = "linux")]
mod result;
#[cfg(target_os = "linux")]
mod sandbox;
#[cfg(target_os = "linux")]
mod server;
#[cfg(target_os = "linux")]
mod shared_buf;
#[cfg(target_os = "linux")]
mod shm;
#[cfg(target_os = "linux")]
mod start;
#[cfg(target_os = "linux")]
mod supervisor;
#[cfg(target_os = "linux")]
mod sys;
#[cfg(target_os = "linux")]
mod sys_sandbox;
#[cfg(target_os = "linux")]
mod task;
#[cfg(target_os = "linux")]
mod traceback;
#[cfg(target_os = "linux")]
mod wire;
#[cfg(target_os = "linux")]
mod worker;

/// The `bytemuck` crate, whose [`bytemuck::Pod`] is the bound on a
/// [`SharedSlice`]'s elements (to derive `Pod` for your own `#[repr(C)]`
/// types, depend on `bytemuck` with its `derive` feature).
#[cfg(target_os = "linux")]
pub use bytemuck;
#[cfg(target_os = "linux")]
pub use deadline::{deadline_passed, time_left};
#[cfg(target_os = "linux")]
pub use error::{CodecError, Error, Result};
#[cfg(target_os = "linux")]
pub use global::{configure_global, global};
#[cfg(target_os = "linux")]
pub use join::JoinFuture;
#[cfg(target_os = "linux")]
pub use pool::{Data, MapOptions, Pool, PoolBuilder, TaskOptions};
#[cfg(target_os = "linux")]
pub use result::{AsyncResult, Imap, ImapUnordered, MapResult, Next};
#[cfg(target_os = "linux")]
pub use sandbox::{Limit, Sandbox};
#[cfg(target_os = "linux")]
pub use shared_buf::{SharedBuf, SharedSlice};
#[cfg(target_os = "linux")]
pub use start::StartMethod;
#[cfg(target_os = "linux")]
pub use traceback::{BacktraceFrame, PanicLocation, RemoteBacktrace};
