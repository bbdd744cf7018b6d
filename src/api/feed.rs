//! How an `imap` iterator feeds the pool: [`ChunkFeeder`] pulls the
//! caller's input a chunk at a time, encodes it and submits it, and
//! [`Pending`] is what it hands back for each chunk.

use crate::engine::completion::{Hook, Slot};
use crate::engine::core::Shared;
use crate::engine::job::JobSpec;
use crate::error::Error;
use crate::proto::shared_buf::{self, Mode};
use crate::proto::shm::Body;
use crate::proto::task::{self, TaskFn};
use serde::Serialize;
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

/// A chunk that an imap iterator has submitted (or failed to), or the
/// panic of its input iterator, in its place.
pub(crate) enum Pending {
    Chunk(Arc<Slot>, usize),
    Failed(Error, usize),
    /// The input iterator panicked here; nothing was pulled after it.
    InputPanicked(Box<dyn Any + Send>),
}

/// Pulls an imap iterator's input (`it`), one chunk at a time, on the
/// thread that asks for the next chunk.
pub(crate) struct ChunkFeeder<I> {
    pub(crate) it: I,
    pub(crate) f: TaskFn,
    /// What leads each chunk's input (a task's state, or nothing), or the
    /// error that fails every chunk.
    pub(crate) prefix: Result<Vec<u8>, Error>,
    pub(crate) chunksize: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    /// The input is done (exhausted, or it panicked): it is not pulled again.
    pub(crate) ended: bool,
    /// The input's panic, to hand over after the chunk pulled before it.
    pub(crate) panicked: Option<Box<dyn Any + Send>>,
    pub(crate) retry_shared: bool,
    pub(crate) mode: Mode,
}

impl<I> ChunkFeeder<I>
where
    I: Iterator,
    I::Item: Serialize,
{
    /// Submits the next chunk, with the hook `hook` makes of its item
    /// count; None when the input is exhausted.
    pub(crate) fn next_chunk(&mut self, hook: impl FnOnce(usize) -> Hook) -> Option<Pending> {
        let mut payload = self.prefix.as_ref().map_or(Vec::new(), |p| p.clone());
        let mut shared = Vec::new();
        let mut n = 0;
        let mut err = self.prefix.as_ref().err().cloned();
        shared_buf::encoding(self.mode, &mut shared, || {
            while n < self.chunksize && !self.ended {
                // The input's panic is kept, and resumed in the consumer in
                // its place, after the items before it (see Imap).
                let a = match catch_unwind(AssertUnwindSafe(|| self.it.next())) {
                    Ok(Some(a)) => a,
                    Ok(None) => {
                        self.ended = true;
                        break;
                    }
                    Err(p) => {
                        self.ended = true;
                        self.panicked = Some(p);
                        break;
                    }
                };
                if let Err(e) = task::push_item(&mut payload, &a) {
                    err.get_or_insert(Error::Encode {
                        what: "argument",
                        source: e,
                    });
                }
                n += 1;
            }
        });
        if n == 0 {
            return self.panicked.take().map(Pending::InputPanicked);
        }
        if err.is_none() && !shared.is_empty() && shared.len() > shared_buf::max_per_task() {
            err = Some(shared_buf::too_many(shared.len()));
        }
        if let Some(e) = err {
            return Some(Pending::Failed(e, n));
        }
        let slot = self.shared.new_slot();
        let spec = JobSpec {
            f: self.f,
            payload: Body::Heap(payload),
            hook: hook(n),
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            shared,
            retry_shared: self.retry_shared,
            items: n as u32,
        };
        match self.shared.submit(vec![(slot.clone(), spec)]) {
            Ok(()) => Some(Pending::Chunk(slot, n)),
            Err(e) => Some(Pending::Failed(e, n)),
        }
    }
}
