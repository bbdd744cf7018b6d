#![doc = include_str!("tutorial.md")]
#![warn(missing_docs)]

mod codec;
mod error;
#[cfg(feature = "mpi")]
mod mpi;
mod pool;
mod result;
mod server;
mod shared_buf;
mod shm;
mod start;
mod supervisor;
mod sys;
mod task;
mod wire;
mod worker;

/// The `bytemuck` crate, whose [`bytemuck::Pod`] is the bound on a
/// [`SharedSlice`]'s elements (to derive `Pod` for your own `#[repr(C)]`
/// types, depend on `bytemuck` with its `derive` feature).
pub use bytemuck;
pub use error::{CodecError, Error, Result};
pub use pool::{Data, MapOptions, Pool, PoolBuilder, TaskOptions};
pub use result::{AsyncResult, Imap, ImapUnordered, MapResult};
pub use shared_buf::{SharedBuf, SharedSlice};
pub use start::StartMethod;
