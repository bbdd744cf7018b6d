//! The parent's thread that reads every worker's piped output, one per
//! pool (`procpool-output`), and its handle: `output.rs` says what it is
//! for; its state, behind a lock that the backend takes too, is
//! `relay.rs`.

use super::output::Streams;
use super::relay::{self, Outgoing, Relays};
use crate::proto::words::SharedWords;
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long `join` waits for the pump to pass on the last output of a
/// pool whose processes have all ended.
pub(crate) const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The pump's state, shared by its thread and the pool's backend.
struct PumpState {
    relays: Mutex<Relays>,
    /// Wakes the pump's thread: a worker was added, lines wait to be
    /// written, or the pool is done.
    wake: OwnedFd,
}

/// The parent's thread that reads every worker's piped output (see the
/// module doc), and its handle. Dropping it lets the thread end by
/// itself, within [`DRAIN_WAIT`].
pub(crate) struct Pump {
    shared: Arc<PumpState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pump {
    /// Starts the pump of a pool with `streams`, whose status words are
    /// `words` and whose server's socket `server` is a copy of (for its
    /// kills past the output cap).
    pub(crate) fn start(
        streams: Streams,
        words: Arc<SharedWords>,
        server: OwnedFd,
    ) -> std::io::Result<Pump> {
        let wake = sys::eventfd()?;
        let shared = Arc::new(PumpState {
            relays: Mutex::new(Relays::new(streams, words, server)),
            wake,
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("procpool-output".into())
            .spawn(move || run(&theirs))?;
        Ok(Pump {
            shared,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Relays> {
        lock(&self.shared)
    }

    fn wake(&self) {
        sys::eventfd_signal(self.shared.wake.as_raw_fd());
    }

    /// The worker `pid` in `slot` started, with the read ends of its
    /// piped streams.
    pub(crate) fn add(&self, slot: usize, pid: u32, pipes: [Option<OwnedFd>; 2]) {
        self.lock().add(slot, pid, pipes);
        self.wake();
    }

    /// The worker `pid` in `slot` ended: what its pipes hold is read, its
    /// partial lines go out, and its crash report is returned.
    pub(crate) fn ended(&self, slot: usize, pid: u32) -> Option<Arc<str>> {
        let words = self.lock().ended(slot, pid);
        self.wake();
        words
    }

    /// The crash report of the live worker in `slot`, after what its
    /// stderr pipe holds now was read.
    pub(crate) fn last_words(&self, slot: usize) -> Option<Arc<str>> {
        let words = self.lock().last_words(slot);
        self.wake();
        words
    }

    /// Gives up the copy of the server's socket (the pool is closing the
    /// server, which must see end-of-file).
    pub(crate) fn forget_server(&self) {
        self.lock().forget_server();
    }

    /// The pool is done: waits, at most `bound`, for the pump to pass on
    /// what the pipes hold until they all reach end-of-file (or `bound`
    /// has passed); returns whether it ended.
    pub(crate) fn finish(mut self, bound: Duration) -> bool {
        let until = Instant::now() + bound;
        self.lock().close_by(until);
        self.wake();
        let Some(thread) = self.thread.take() else {
            return true;
        };
        // A moment more than the pump's own deadline: it is written out
        // by then, unless a write to the program's fd blocks.
        let wait_until = until + Duration::from_millis(100);
        while !thread.is_finished() {
            if Instant::now() >= wait_until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
        true
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.lock().close_by(Instant::now() + DRAIN_WAIT);
            self.wake();
        }
    }
}

/// The relays, even if a thread panicked holding them (their state is
/// consistent after each read).
fn lock(shared: &PumpState) -> MutexGuard<'_, Relays> {
    shared.relays.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pump's loop: polls every open pipe, reads what is ready, writes
/// the whole lines out (without the lock), until the pool is done and
/// the pipes are at end-of-file or past the deadline.
fn run(shared: &PumpState) {
    let mut set = sys::PollSet::default();
    let mut who = Vec::new();
    loop {
        let timeout = {
            let r = lock(shared);
            set.clear();
            set.push(shared.wake.as_raw_fd(), true, false);
            who.clear();
            r.poll_on(&mut set, &mut who);
            r.poll_timeout_ms(Instant::now())
        };
        if set.poll(timeout).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if set.ready(0) {
            sys::drain(shared.wake.as_raw_fd());
        }
        let mut read_any = false;
        let (out, done) = {
            let mut r = lock(shared);
            for (j, &(i, k)) in who.iter().enumerate() {
                if set.ready(j + 1) {
                    r.read(i, k);
                    read_any = true;
                }
            }
            r.send_kills();
            let done = r.done(Instant::now());
            if done {
                r.flush_partial_lines();
            }
            r.tidy();
            (r.take_out(), done)
        };
        write_out(out);
        if done {
            return;
        }
        if read_any {
            // Output comes in bursts, often a few bytes a write (`{:>12}`
            // in a `println!` is a write per byte of padding): a moment's
            // pause lets the rest of a burst gather, to be read in one go
            // rather than a wake-up per write.
            std::thread::sleep(COALESCE);
        }
    }
}

/// How long the pump pauses after a read before it looks again.
const COALESCE: Duration = Duration::from_micros(50);

/// Writes whole lines to the program's stdout and stderr, and logs the
/// records.
fn write_out(out: Outgoing) {
    for (bytes, fd) in out
        .bytes
        .iter()
        .zip([libc::STDOUT_FILENO, libc::STDERR_FILENO])
    {
        write_all_or_drop(fd, bytes);
    }
    for r in out.records {
        let level = if r.stderr {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(target: relay::LOG_TARGET, level, "worker {}: {}", r.pid, r.line);
    }
}

/// Writes `bytes` to `to`, waiting while it is full (a non-blocking fd of
/// the program's); drops them if it fails.
fn write_all_or_drop(to: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match sys::write(to, bytes) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = sys::wait_writable(to, Duration::from_millis(100));
            }
            Err(_) => return,
        }
    }
}
