//! Worker logs over the worker's socket (`PoolBuilder::forward_logs`): the
//! logger a worker installs, the LOG frame it writes, and the parent's side
//! that reads it and hands each record to the program's own logger.
//!
//! The worker: once the parent's CONFIG frame names a level (after the
//! initializer, which may install a logger of its own), the worker
//! installs [`Forwarder`] if no logger is set yet (`log` allows one per
//! process). Each record at or above the level becomes a LOG frame on the
//! worker's socket: from any thread of the task, written whole under the
//! lock that the worker's own frames take too ([`send_lock`]), so that
//! frames never interleave. A record logged while that thread is already
//! logging (a logger that logs) is dropped, never re-entered.
//!
//! The frame: `seq` is the task the worker runs (its sequence number on
//! that worker), `a` the level (1 = error .. 5 = trace), and the body the
//! target's length (2 bytes), the target and the message, at most
//! [`MAX_BODY`] bytes in all (a longer message is cut at a character).
//!
//! The parent: the supervisor decodes each LOG frame (as untrusted as any
//! frame of a sandboxed worker) and queues it, without waiting, to one
//! thread of the process (`procpool-logs`) that calls the program's logger;
//! a slow logger fills the bounded queue, and records that do not fit are
//! counted and dropped (the count is logged once there is room), never
//! waited for.

use crate::proto::wire::{self, Header};
use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The most a LOG frame's body may hold.
pub(crate) const MAX_BODY: usize = 16 << 10;

/// How many records may wait for the parent's logger.
const QUEUE: usize = 4096;

/// CONFIG flags (in `a`): the forwarded level, in bits 8..11 (0: none).
const LEVEL_SHIFT: u32 = 8;

/// The CONFIG flags that ask a worker to forward records up to `level`.
pub(crate) fn config_flags(level: log::LevelFilter) -> u64 {
    (level as u64) << LEVEL_SHIFT
}

/// The level a CONFIG frame's flags ask for.
pub(crate) fn level_in(flags: u64) -> log::LevelFilter {
    match (flags >> LEVEL_SHIFT) & 7 {
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        5 => log::LevelFilter::Trace,
        _ => log::LevelFilter::Off,
    }
}

fn level_of(n: u64) -> Option<log::Level> {
    match n {
        1 => Some(log::Level::Error),
        2 => Some(log::Level::Warn),
        3 => Some(log::Level::Info),
        4 => Some(log::Level::Debug),
        5 => Some(log::Level::Trace),
        _ => None,
    }
}

// ---- the worker ----

static SEND: Mutex<()> = Mutex::new(());

/// The lock every frame a worker writes is written under.
pub(crate) fn send_lock() -> MutexGuard<'static, ()> {
    SEND.lock().unwrap_or_else(|e| e.into_inner())
}

/// The task the worker runs now (its sequence number), for its records.
static TASK: AtomicU64 = AtomicU64::new(0);

/// Notes the task the worker starts.
pub(crate) fn set_task(seq: u64) {
    TASK.store(seq, Ordering::Relaxed);
}

thread_local! {
    static LOGGING: Cell<bool> = const { Cell::new(false) };
}

/// The worker's logger: each record, a LOG frame on its socket.
struct Forwarder {
    fd: RawFd,
}

/// Installs the forwarding logger for records up to `level` on socket
/// `fd`, if this process has no logger yet; says whether it did.
pub(crate) fn install(fd: RawFd, level: log::LevelFilter) -> bool {
    if level == log::LevelFilter::Off {
        return false;
    }
    // Once per worker: a few bytes that live as long as the process.
    let logger: &'static Forwarder = Box::leak(Box::new(Forwarder { fd }));
    let installed = log::set_logger(logger).is_ok();
    if installed {
        log::set_max_level(level);
    }
    installed
}

/// A LOG frame for a record.
pub(crate) fn frame(seq: u64, level: log::Level, target: &str, msg: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire::HDR + 2 + target.len() + msg.len());
    let f = Header::log(seq, level as u64).open(&mut out);
    let target = cut(target, 256);
    out.extend_from_slice(&(target.len() as u16).to_le_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(cut(msg, MAX_BODY - 2 - target.len()).as_bytes());
    f.close(&mut out, 0);
    out
}

/// `s` cut to at most `max` bytes, at a character.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl log::Log for Forwarder {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) || LOGGING.with(|l| l.replace(true)) {
            return;
        }
        let msg = r.args().to_string();
        let out = frame(TASK.load(Ordering::Relaxed), r.level(), r.target(), &msg);
        {
            let _g = send_lock();
            // A parent that is gone ends the worker by its own loop.
            let _ = crate::sys::send_all(self.fd, &out);
        }
        LOGGING.with(|l| l.set(false));
    }

    fn flush(&self) {}
}

// ---- the parent ----

/// A record from a worker, on its way to the program's logger.
struct Record {
    level: log::Level,
    target: String,
    msg: String,
    pid: u32,
    task: u64,
}

/// Decodes the body of a LOG frame (`h` its header) from worker `pid` and
/// queues it for the program's logger; an error says what was malformed.
pub(crate) fn forward(h: &Header, body: &[u8], pid: u32) -> Result<(), String> {
    let level = level_of(h.log_level())
        .ok_or_else(|| format!("sent a log record of level {}", h.log_level()))?;
    let malformed = || "sent a malformed log record".to_string();
    if body.len() > MAX_BODY {
        return Err(malformed());
    }
    let n = u16::from_le_bytes(body.get(..2).ok_or_else(malformed)?.try_into().unwrap());
    let target = body.get(2..2 + n as usize).ok_or_else(malformed)?;
    let msg = &body[2 + n as usize..];
    let rec = Record {
        level,
        target: String::from_utf8_lossy(target).into_owned(),
        msg: String::from_utf8_lossy(msg).into_owned(),
        pid,
        task: h.seq,
    };
    if let Some(tx) = queue() {
        match tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
    Ok(())
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The queue to the thread that calls the program's logger, started on
/// first use; `None` if it could not be started.
fn queue() -> Option<&'static SyncSender<Record>> {
    static TX: OnceLock<Option<SyncSender<Record>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Record>(QUEUE);
        std::thread::Builder::new()
            .name("procpool-logs".into())
            .spawn(move || {
                for r in rx {
                    emit(&r);
                }
            })
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

/// Hands a record to the program's logger.
fn emit(r: &Record) {
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        log::warn!(
            "procpool: {dropped} log record(s) of the workers dropped (the logger was slower than they)"
        );
    }
    log::logger().log(
        &log::Record::builder()
            .level(r.level)
            .target(&r.target)
            .args(format_args!(
                "[worker {}, task {}] {}",
                r.pid, r.task, r.msg
            ))
            .build(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_carries_level_task_target_and_message() {
        let out = frame(7, log::Level::Warn, "app::db", "slow query");
        let h = Header::parse(&out).unwrap();
        assert_eq!((h.kind, h.seq, h.log_level()), (wire::LOG, 7, 2));
        let body = &out[wire::HDR..];
        assert_eq!(h.len as usize, body.len());
        assert_eq!(&body[..2], &7u16.to_le_bytes());
        assert_eq!(&body[2..9], b"app::db");
        assert_eq!(&body[9..], b"slow query");
        assert!(forward(&h, body, 1).is_ok());
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_within_the_cap() {
        let msg = "é".repeat(MAX_BODY);
        let out = frame(1, log::Level::Info, "t", &msg);
        let body = &out[wire::HDR..];
        assert!(body.len() <= MAX_BODY);
        assert!(std::str::from_utf8(&body[3..]).is_ok());
    }

    #[test]
    fn malformed_records_are_refused() {
        let h = |a| Header::log(1, a);
        assert!(forward(&h(9), &[0, 0], 1).is_err());
        assert!(forward(&h(1), &[5, 0, b'x'], 1).is_err());
        assert!(forward(&h(1), &[], 1).is_err());
        assert!(forward(&h(1), &vec![0; MAX_BODY + 1], 1).is_err());
    }

    #[test]
    fn the_level_travels_in_the_config_flags() {
        for l in [
            log::LevelFilter::Off,
            log::LevelFilter::Error,
            log::LevelFilter::Info,
            log::LevelFilter::Trace,
        ] {
            assert_eq!(level_in(config_flags(l) | 1), l);
        }
    }
}
