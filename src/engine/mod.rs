//! The engine: the queue, dispatch, lifecycle and completion of tasks,
//! whatever runs the workers. See `README.md` beside this file.

pub(crate) mod completion;
pub(crate) mod core;
pub(crate) mod events;
pub(crate) mod job;
pub(crate) mod ledger;
pub(crate) mod lifecycle;
pub(crate) mod plan;
pub(crate) mod seam;
pub(crate) mod size;
pub(crate) mod stats;
pub(crate) mod supervisor;
pub(crate) mod watch;
pub(crate) mod worker;
