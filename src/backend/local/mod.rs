//! The local backend: a fork server (started by exec, or forked from the
//! caller) that forks the workers.

pub(crate) mod server;
pub(crate) mod start;
