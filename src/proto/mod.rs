//! What the parent and its workers share: the wire framing, the codec,
//! task offsets and outcomes, shared-memory blocks and `SharedBuf`s.

pub(crate) mod codec;
pub(crate) mod idle;
pub(crate) mod shared_buf;
pub(crate) mod shm;
pub(crate) mod status;
pub(crate) mod task;
pub(crate) mod wire;
