//! A task's input on its way to `submit`: encoded (an argument for
//! `apply`, a chunk of items for `map`, a [`Task`]'s state), checked (no
//! codec error, no more `SharedBuf`s than one task may carry), and made
//! into the job that carries it. An `imap` fills its chunks an item at a
//! time (`feed.rs`), with the same errors and the same check.

use crate::engine::completion::Hook;
use crate::engine::job::{JobOptions, JobSpec};
use crate::error::CodecError;
use crate::error::{Error, Result};
use crate::proto::codec;
use crate::proto::shared_buf::{self, Mode, Region};
use crate::proto::shm::{BlockCache, Body, Spill, Target};
use crate::proto::task::{self, Task, TaskFn};
use serde::Serialize;

/// A task's input, encoded: its bytes (or its block), and the `SharedBuf`s
/// it moved out of the caller's hands.
pub(crate) struct Encoded {
    pub(crate) payload: Body,
    pub(crate) shared: Vec<Region>,
}

impl Encoded {
    /// The job that runs `f` on this input, of `items` items (0: an
    /// `apply`; `split`: see `Job::split`), with the call's options.
    pub(crate) fn job(
        self,
        f: TaskFn,
        hook: Hook,
        items: usize,
        split: Option<usize>,
        opts: JobOptions,
    ) -> JobSpec {
        JobSpec {
            f,
            payload: self.payload,
            shared: self.shared,
            hook,
            items: items as u32,
            split,
            opts,
        }
    }
}

/// The error of an argument (or an item) that cannot be encoded.
pub(crate) fn encode_error(source: CodecError) -> Error {
    Error::Encode {
        what: "argument",
        source,
    }
}

/// No more `SharedBuf`s than one task may carry.
pub(crate) fn check_shared(shared: &[Region]) -> Result<()> {
    if shared.len() > shared_buf::max_per_task() {
        return Err(shared_buf::too_many(shared.len()));
    }
    Ok(())
}

/// Whether an input's encoding went well: no codec error, and no more
/// `SharedBuf`s than a task may carry.
fn checked(encoded: std::result::Result<(), CodecError>, shared: &[Region]) -> Result<()> {
    encoded.map_err(encode_error)?;
    check_shared(shared)
}

/// Encodes an argument: in a buffer, or in a shared-memory block from
/// `cache` once it grows large (never without a cache); with the
/// `SharedBuf`s it moved out of the argument.
pub(crate) fn encode_arg<A: Serialize>(
    arg: &A,
    cache: Option<&BlockCache>,
    mode: Mode,
) -> Result<Encoded> {
    let mut v = Vec::new();
    let mut shared = Vec::new();
    let Some(cache) = cache else {
        let encoded = shared_buf::encoding(mode, &mut shared, || codec::encode_to(arg, &mut v));
        checked(encoded, &shared)?;
        return Ok(Encoded {
            payload: Body::Heap(v),
            shared,
        });
    };
    let mut w = Spill::new(&mut v, Target::Cache(cache));
    let encoded = shared_buf::encoding(mode, &mut shared, || codec::encode_to(arg, &mut w));
    if let Err(e) = checked(encoded, &shared) {
        w.discard();
        return Err(e);
    }
    let payload = match w.finish() {
        Ok((Some((b, n)), _)) => Body::Shm(b, n),
        Ok((None, _)) => Body::Heap(v),
        Err(e) => return Err(Error::io("making a shared-memory block", e)),
    };
    Ok(Encoded { payload, shared })
}

/// Encodes the items of one chunk after `prefix` (a task's state, or
/// nothing), with the `SharedBuf`s they moved out.
pub(crate) fn encode_chunk<'i, A: Serialize + 'i>(
    prefix: &[u8],
    items: impl IntoIterator<Item = &'i A>,
    mode: Mode,
) -> Result<Encoded> {
    let mut p = prefix.to_vec();
    let mut shared = Vec::new();
    let encoded = shared_buf::encoding(mode, &mut shared, || {
        for a in items {
            task::push_item(&mut p, a)?;
        }
        Ok(())
    });
    checked(encoded, &shared)?;
    Ok(Encoded {
        payload: Body::Heap(p),
        shared,
    })
}

/// A task's state, as the first item of every chunk of a map.
pub(crate) fn encode_state<T: Task>(t: &T) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    task::push_item(&mut bytes, t).map_err(|source| Error::Encode {
        what: "task",
        source,
    })?;
    Ok(bytes)
}
