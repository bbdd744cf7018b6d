#![doc = include_str!("tutorial.md")]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

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
mod api;
#[cfg(target_os = "linux")]
mod backend;
#[cfg(target_os = "linux")]
mod capture;
#[cfg(target_os = "linux")]
mod deadline;
#[cfg(target_os = "linux")]
mod engine;
#[cfg(target_os = "linux")]
mod error;
#[cfg(target_os = "linux")]
mod limit;
#[cfg(target_os = "linux")]
mod proto;
#[cfg(target_os = "linux")]
mod sandbox;
#[cfg(target_os = "linux")]
mod stats;
#[cfg(target_os = "linux")]
mod sys;
#[cfg(target_os = "linux")]
mod traceback;
#[cfg(target_os = "linux")]
mod worker;

#[cfg(target_os = "linux")]
pub use api::builder::PoolBuilder;
#[cfg(target_os = "linux")]
pub use api::global::{configure_global, global};
#[cfg(target_os = "linux")]
pub use api::join::JoinFuture;
#[cfg(target_os = "linux")]
pub use api::options::{Data, MapOptions, TaskOptions};
#[cfg(target_os = "linux")]
pub use api::pool::Pool;
#[cfg(target_os = "linux")]
pub use api::result::{AsyncResult, Imap, ImapUnordered, MapResult, Next};
#[cfg(target_os = "linux")]
pub use api::wait::{AsCompleted, Done, WaitFor, as_completed, wait};
#[cfg(target_os = "linux")]
pub use backend::local::output::Output;
#[cfg(target_os = "linux")]
pub use backend::local::start::StartMethod;
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
pub use limit::Limit;
#[cfg(target_os = "linux")]
pub use proto::shared_buf::{SharedBuf, SharedSlice};
#[cfg(target_os = "linux")]
pub use proto::task::Task;
#[cfg(target_os = "linux")]
pub use sandbox::Sandbox;
#[cfg(target_os = "linux")]
pub use stats::{Failed, Stats, WorkersEnded};
#[cfg(target_os = "linux")]
pub use traceback::{BacktraceFrame, PanicLocation, RemoteBacktrace};
