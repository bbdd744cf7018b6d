//! The public front: [`Pool`](pool::Pool) and its builder and options, the
//! result types, the global pool and `join_async`. Nothing below `api`
//! imports it.

pub(crate) mod builder;
pub(crate) mod encode;
pub(crate) mod feed;
pub(crate) mod global;
pub(crate) mod join;
pub(crate) mod options;
pub(crate) mod pool;
pub(crate) mod result;
pub(crate) mod task;
pub(crate) mod wait;
