//! What the parent and its workers share: the wire framing, the codec,
//! task offsets and outcomes, the panic report, the status words,
//! shared-memory blocks and `SharedBuf`s; the one buffered connection that
//! every side reads and writes frames through; and how a thread out of
//! work waits for more (the idle policy both sides follow).
//!
//! `README.md` beside this file: the frames besides tasks, and how large
//! bodies and `SharedBuf`s travel.

pub(crate) mod codec;
pub(crate) mod conn;
pub(crate) mod idle;
pub(crate) mod logs;
pub(crate) mod report;
pub(crate) mod shared_buf;
pub(crate) mod shm;
pub(crate) mod task;
pub(crate) mod untrusted;
pub(crate) mod wire;
pub(crate) mod words;
