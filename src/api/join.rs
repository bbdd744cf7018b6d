//! Waiting for a closed pool without blocking a thread: [`JoinFuture`], the
//! future of [`Pool::join_async`](crate::Pool::join_async).
//!
//! `join` blocks its thread until the supervisor thread has finished and
//! the callbacks queued so far have run. The future waits for the same two
//! things through wakers: a [`Signal`] that the supervisor thread sets as
//! it ends, then one that the result-handler thread sets once it has run
//! everything queued before it.

use crate::engine::completion::Signal;
use crate::engine::core::Engine;
use crate::error::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Sets its signal when dropped: at the end of the supervisor thread,
/// however it ends.
pub(crate) struct SetOnDrop(pub(crate) Arc<Signal>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// The future of [`Pool::join_async`](crate::Pool::join_async): resolves
/// once the pool is joined (its queue done or dropped, every process
/// exited and reaped, the callbacks of finished tasks run), with what
/// [`Pool::join`](crate::Pool::join) would return. It is `Send` and
/// `'static`: it can be spawned, and outlive the `&Pool` it came from.
#[must_use = "futures do nothing unless polled"]
pub struct JoinFuture {
    state: State,
}

enum State {
    Failed(Option<Error>),
    /// The supervisor thread has not finished.
    Supervisor {
        exited: Arc<Signal>,
        engine: Arc<Engine>,
    },
    /// The result-handler thread runs the callbacks queued before; then
    /// the future resolves with the pool's broken error, if any.
    Callbacks(Arc<Signal>, Option<Error>),
    /// Resolves with the pool's broken error, if any (once).
    Done(Option<Error>),
}

impl JoinFuture {
    pub(crate) fn new(exited: Arc<Signal>, engine: Arc<Engine>) -> JoinFuture {
        JoinFuture {
            state: State::Supervisor { exited, engine },
        }
    }

    pub(crate) fn failed(e: Error) -> JoinFuture {
        JoinFuture {
            state: State::Failed(Some(e)),
        }
    }
}

impl Future for JoinFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            match &mut self.state {
                State::Failed(e) => {
                    let e = e.take();
                    self.state = State::Done(e);
                }
                State::Supervisor { exited, engine } => {
                    if exited.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // As join(): a pool that broke meanwhile says so.
                    let broken = engine.broken();
                    self.state = match engine.handler.drained_signal() {
                        Some(s) => State::Callbacks(s, broken),
                        None => State::Done(broken),
                    };
                }
                State::Callbacks(s, broken) => {
                    if s.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let broken = broken.take();
                    self.state = State::Done(broken);
                }
                State::Done(e) => return Poll::Ready(e.take().map_or(Ok(()), Err)),
            }
        }
    }
}

impl std::fmt::Debug for JoinFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Failed(_) => "failed",
            State::Supervisor { .. } => "waiting for the workers",
            State::Callbacks(..) => "waiting for the callbacks",
            State::Done(_) => "done",
        };
        f.debug_struct("JoinFuture").field("state", &state).finish()
    }
}
