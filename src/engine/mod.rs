//! The engine: the queue, dispatch, lifecycle and completion of tasks,
//! whatever runs the workers. See `README.md` beside this file.

pub(crate) mod supervisor;
