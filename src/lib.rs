#![doc = include_str!("tutorial.md")]
#![warn(missing_docs)]

mod codec;
mod error;
#[cfg(feature = "mpi")]
mod mpi;
mod pool;
mod result;
mod sandbox;
mod server;
mod shm;
mod start;
mod supervisor;
mod sys;
mod sys_sandbox;
mod task;
mod wire;
mod worker;

pub use error::{CodecError, Error, Result};
pub use pool::{Data, MapOptions, Pool, PoolBuilder, TaskOptions};
pub use result::{AsyncResult, Imap, ImapUnordered, MapResult};
pub use sandbox::{Limit, Sandbox};
pub use start::StartMethod;
