//! Backends: where workers live. `local` runs them as processes forked by
//! a fork server on this machine; `mpi` runs them on MPI ranks.

pub(crate) mod local;
#[cfg(feature = "mpi")]
pub(crate) mod mpi;
