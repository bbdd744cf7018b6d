//! What the parent and its workers share: the wire framing, the codec,
//! task offsets and outcomes, panic reports, shared-memory blocks and
//! `SharedBuf`s.

pub(crate) mod codec;
pub(crate) mod report;
pub(crate) mod shared_buf;
pub(crate) mod shm;
pub(crate) mod task;
pub(crate) mod wire;
