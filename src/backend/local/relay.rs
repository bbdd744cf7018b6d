//! The workers' piped output, in the parent (the state of `output.rs`'s
//! pump, behind its lock): each worker's pipes, cut into whole lines and
//! passed on as the pool's [`Output`] says; each worker's last bytes of
//! stderr (its crash report); and, in a sandboxed pool, what each worker
//! wrote, against the output cap.
//!
//! A sandboxed worker's lines are untrusted: its control characters are
//! escaped ([`escape_controls`]) before they reach a terminal or a log.
//! Past the cap the worker's `died_of` word is marked, the server is asked
//! to kill it (a `KILL` on a copy of its socket), and the rest of what it
//! wrote is dropped: its task fails with `Limit::Output`.
//!
//! Only the pump's thread closes a pipe (at end-of-file, in
//! [`Relays::tidy`]), so that an fd it polls is never closed under it;
//! the backend's calls ([`Relays::ended`], [`Relays::last_words`]) read
//! what a pipe holds without waiting and leave the rest to the pump.

use super::output::{Output, Streams};
use super::server::Msg;
use crate::proto::words::SharedWords;
use crate::sys;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// How much one read of a worker's pipe takes.
const CHUNK: usize = 64 << 10;
/// A line longer than this goes out cut, in pieces of this size.
pub(crate) const LINE_MAX: usize = 64 << 10;
/// How much of a worker's stderr its crash report keeps: its last bytes.
pub(crate) const TAIL: usize = 4 << 10;
/// How much one call of the backend reads from a pipe at most (a task's
/// child that floods it cannot keep the supervisor there).
const DRAIN_MAX: usize = 1 << 20;
/// The target of the records of [`Output::Log`].
pub(crate) const LOG_TARGET: &str = "procpool::worker";

/// One stream of one worker: its pipe, and the start of a line.
struct Stream {
    fd: Option<OwnedFd>,
    /// Bytes of a line whose newline has not come yet.
    partial: Vec<u8>,
    /// Not at end-of-file (the pump closes `fd` once it is).
    open: bool,
}

/// One worker's output.
struct Relay {
    slot: usize,
    pid: u32,
    streams: [Option<Stream>; 2],
    /// Its last bytes of stderr (at most twice [`TAIL`]).
    tail: Vec<u8>,
    /// What it wrote, both streams (counted in a sandboxed pool).
    written: u64,
    /// Past the output cap: what it writes is dropped.
    over: bool,
    /// Its end was reported: its slot may belong to another worker.
    ended: bool,
}

/// A line for the log ([`Output::Log`]).
pub(crate) struct Record {
    pub(crate) stderr: bool,
    pub(crate) pid: u32,
    pub(crate) line: String,
}

/// What waits to go out: whole lines for the program's stdout and
/// stderr, and records for the log.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub(crate) bytes: [Vec<u8>; 2],
    pub(crate) records: Vec<Record>,
}

/// Every worker's piped output.
pub(crate) struct Relays {
    modes: [Output; 2],
    /// A sandboxed pool's output cap: its lines are untrusted too.
    cap: Option<u64>,
    relays: Vec<Relay>,
    out: Outgoing,
    /// Workers past the cap, whose kill is not sent yet: (slot, pid).
    kills: Vec<(usize, u32)>,
    /// A copy of the server's socket, for those kills.
    server: Option<OwnedFd>,
    words: Arc<SharedWords>,
    buf: Vec<u8>,
    /// The pool is done: the pump ends at end-of-file, or at this time.
    closing: Option<Instant>,
}

impl Relays {
    pub(crate) fn new(streams: Streams, words: Arc<SharedWords>, server: OwnedFd) -> Relays {
        Relays {
            modes: [streams.stdout, streams.stderr],
            cap: streams.cap,
            relays: Vec::new(),
            out: Outgoing::default(),
            kills: Vec::new(),
            server: Some(server),
            words,
            buf: vec![0; CHUNK],
            closing: None,
        }
    }

    /// The worker `pid` in `slot` started, with the read ends of its
    /// piped streams.
    pub(crate) fn add(&mut self, slot: usize, pid: u32, pipes: [Option<OwnedFd>; 2]) {
        let streams = pipes.map(|fd| {
            fd.map(|fd| {
                let _ = sys::set_nonblocking(&fd);
                Stream {
                    fd: Some(fd),
                    partial: Vec::new(),
                    open: true,
                }
            })
        });
        self.relays.push(Relay {
            slot,
            pid,
            streams,
            tail: Vec::new(),
            written: 0,
            over: false,
            ended: false,
        });
    }

    /// Adds each open pipe to `set`, and its (relay, stream) to `who`.
    pub(crate) fn poll_on(&self, set: &mut sys::PollSet, who: &mut Vec<(usize, usize)>) {
        for (i, r) in self.relays.iter().enumerate() {
            for (k, s) in r.streams.iter().enumerate() {
                if let Some(Stream {
                    fd: Some(fd),
                    open: true,
                    ..
                }) = s
                {
                    set.push(fd.as_raw_fd(), true, false);
                    who.push((i, k));
                }
            }
        }
    }

    /// How long the pump may sleep: until the closing deadline, a moment
    /// while kills wait to be sent, else until something happens.
    pub(crate) fn poll_timeout_ms(&self, now: Instant) -> i32 {
        let mut ms: i64 = -1;
        if let Some(at) = self.closing {
            ms = at.saturating_duration_since(now).as_millis().min(60_000) as i64 + 1;
        }
        if !self.kills.is_empty() {
            ms = if ms < 0 { 10 } else { ms.min(10) };
        }
        ms as i32
    }

    /// One read of stream `k` of relay `i` (ready, by the pump's poll).
    pub(crate) fn read(&mut self, i: usize, k: usize) {
        self.read_some(i, k, CHUNK);
    }

    /// Reads stream `k` of relay `i` until it would block, ends, or `max`
    /// bytes were read; passes on what came. Returns at once if it is
    /// closed.
    fn read_some(&mut self, i: usize, k: usize, max: usize) {
        let mut got = 0;
        while got < max {
            let Some(Stream {
                fd: Some(fd),
                open: open @ true,
                ..
            }) = &mut self.relays[i].streams[k]
            else {
                return;
            };
            let n = match sys::read(fd.as_raw_fd(), &mut self.buf) {
                Ok(0) => 0,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                *open = false;
                return;
            }
            got += n;
            self.take(i, k, n);
        }
    }

    /// Passes on the `n` bytes just read into the buffer from stream `k`
    /// of relay `i`: its crash report, the cap, and its lines.
    fn take(&mut self, i: usize, k: usize, n: usize) {
        let bytes = &self.buf[..n];
        let r = &mut self.relays[i];
        if k == 1 {
            r.tail.extend_from_slice(bytes);
            if r.tail.len() > 2 * TAIL {
                r.tail.drain(..r.tail.len() - TAIL);
            }
        }
        r.written = r.written.saturating_add(n as u64);
        // The read that crosses the cap still goes out; none after it.
        let crossed = !r.over && !r.ended && self.cap.is_some_and(|cap| r.written > cap);
        if !r.over && self.modes[k] != Output::Null {
            let sink = Sink {
                mode: self.modes[k],
                k,
                pid: r.pid,
                untrusted: self.cap.is_some(),
                out: &mut self.out,
            };
            let s = r.streams[k].as_mut().expect("a piped stream");
            lines(&mut s.partial, bytes, sink);
        }
        if crossed {
            self.over_cap(i);
        }
    }

    /// Relay `i` went past the cap: its `died_of` word says so, its kill
    /// waits to be sent, and what it writes from now on is dropped.
    fn over_cap(&mut self, i: usize) {
        let r = &mut self.relays[i];
        r.over = true;
        for s in r.streams.iter_mut().flatten() {
            s.partial = Vec::new();
        }
        self.words.status(r.slot).died_of.store(
            crate::sandbox::cause::OUTPUT,
            std::sync::atomic::Ordering::SeqCst,
        );
        self.kills.push((r.slot, r.pid));
        self.send_kills();
    }

    /// Sends the kills that wait (the server kills only a worker it has
    /// not reaped); those that do not fit in its socket now wait more.
    pub(crate) fn send_kills(&mut self) {
        let Some(server) = &self.server else {
            self.kills.clear();
            return;
        };
        while let Some(&(slot, pid)) = self.kills.first() {
            let slot = slot as u32;
            let m = Msg::Kill { slot, pid, task: 0 }.to_bytes();
            match sys::send_with_fds(server.as_raw_fd(), &m, &[]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // Sent, or the server is gone (and its workers with it).
                _ => {
                    self.kills.remove(0);
                }
            }
        }
    }

    /// The worker `pid` in `slot` ended (the server reaped it): reads what
    /// its pipes hold, sends its partial lines out, and returns its crash
    /// report.
    pub(crate) fn ended(&mut self, slot: usize, pid: u32) -> Option<Arc<str>> {
        let i = self
            .relays
            .iter()
            .position(|r| r.slot == slot && r.pid == pid && !r.ended)?;
        for k in 0..2 {
            self.read_some(i, k, DRAIN_MAX);
            self.end_partial_line(i, k);
        }
        let r = &mut self.relays[i];
        r.ended = true;
        last_words(&r.tail, self.cap.is_some())
    }

    /// The crash report of the live worker in `slot`, once what its stderr
    /// pipe holds now was read.
    pub(crate) fn last_words(&mut self, slot: usize) -> Option<Arc<str>> {
        let i = self
            .relays
            .iter()
            .position(|r| r.slot == slot && !r.ended)?;
        self.read_some(i, 1, DRAIN_MAX);
        last_words(&self.relays[i].tail, self.cap.is_some())
    }

    /// Sends the partial line of stream `k` of relay `i` out, with a
    /// newline added.
    fn end_partial_line(&mut self, i: usize, k: usize) {
        let r = &mut self.relays[i];
        let Some(s) = &mut r.streams[k] else {
            return;
        };
        if s.partial.is_empty() || r.over {
            return;
        }
        let line = std::mem::take(&mut s.partial);
        Sink {
            mode: self.modes[k],
            k,
            pid: r.pid,
            untrusted: self.cap.is_some(),
            out: &mut self.out,
        }
        .line(&line);
    }

    /// Sends every partial line out (the pump is ending).
    pub(crate) fn flush_partial_lines(&mut self) {
        for i in 0..self.relays.len() {
            for k in 0..2 {
                self.end_partial_line(i, k);
            }
        }
    }

    /// Gives up the copy of the server's socket.
    pub(crate) fn forget_server(&mut self) {
        self.server = None;
        self.kills.clear();
    }

    /// The pool is done: the pump ends by `until` at the latest.
    pub(crate) fn close_by(&mut self, until: Instant) {
        self.closing = Some(self.closing.map_or(until, |c| c.min(until)));
        self.forget_server();
    }

    /// Whether the pump is done: the pool is, and every pipe reached
    /// end-of-file or the deadline passed.
    pub(crate) fn done(&self, now: Instant) -> bool {
        let Some(at) = self.closing else {
            return false;
        };
        let open = self
            .relays
            .iter()
            .flat_map(|r| r.streams.iter().flatten())
            .any(|s| s.open);
        !open || now >= at
    }

    /// Closes the pipes at end-of-file (their partial lines go out), and
    /// forgets a worker whose end was reported and whose pipes are closed.
    pub(crate) fn tidy(&mut self) {
        for i in 0..self.relays.len() {
            for k in 0..2 {
                if let Some(s @ Stream { open: false, .. }) = &mut self.relays[i].streams[k]
                    && s.fd.take().is_some()
                {
                    self.end_partial_line(i, k);
                }
            }
        }
        self.relays
            .retain(|r| !r.ended || r.streams.iter().flatten().any(|s| s.fd.is_some()));
    }

    /// What waits to go out, taken.
    pub(crate) fn take_out(&mut self) -> Outgoing {
        std::mem::take(&mut self.out)
    }
}

/// Where one stream's lines go.
struct Sink<'a> {
    mode: Output,
    /// The stream: 0 stdout, 1 stderr.
    k: usize,
    pid: u32,
    /// Escape control characters (a sandboxed worker's lines).
    untrusted: bool,
    out: &'a mut Outgoing,
}

impl Sink<'_> {
    /// Sends one line (without its newline) on.
    fn line(&mut self, line: &[u8]) {
        match self.mode {
            Output::Inherit | Output::Null => {}
            Output::Lines | Output::PrefixedLines => {
                let to = &mut self.out.bytes[self.k];
                if self.mode == Output::PrefixedLines {
                    let _ = write!(Bytes(to), "[worker {}] ", self.pid);
                }
                if self.untrusted {
                    escape_controls(line, to);
                } else {
                    to.extend_from_slice(line);
                }
                to.push(b'\n');
            }
            Output::Log => {
                let line = if self.untrusted {
                    let mut v = Vec::with_capacity(line.len());
                    escape_controls(line, &mut v);
                    String::from_utf8_lossy(&v).into_owned()
                } else {
                    String::from_utf8_lossy(line).into_owned()
                };
                self.out.records.push(Record {
                    stderr: self.k == 1,
                    pid: self.pid,
                    line,
                });
            }
        }
    }
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Cuts `bytes`, after the `partial` line before them, into whole lines
/// for `sink`; what follows the last newline stays in `partial`, and goes
/// out in pieces of [`LINE_MAX`] while it is longer.
fn lines(partial: &mut Vec<u8>, bytes: &[u8], mut sink: Sink<'_>) {
    let mut rest = bytes;
    if sink.mode == Output::Lines && !sink.untrusted {
        // Whole lines pass as they are: up to the last newline at once.
        if let Some(last) = rest.iter().rposition(|&b| b == b'\n') {
            let to = &mut sink.out.bytes[sink.k];
            to.append(partial);
            to.extend_from_slice(&rest[..=last]);
            rest = &rest[last + 1..];
        }
    }
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        if partial.is_empty() {
            sink.line(&rest[..nl]);
        } else {
            partial.extend_from_slice(&rest[..nl]);
            sink.line(partial);
            partial.clear();
        }
        rest = &rest[nl + 1..];
    }
    partial.extend_from_slice(rest);
    while partial.len() >= LINE_MAX {
        let cut = char_boundary(partial, LINE_MAX);
        sink.line(&partial[..cut]);
        partial.drain(..cut);
    }
}

/// Where to cut `b` at or before `at` without splitting a UTF-8
/// character (at `at` if the bytes there are not UTF-8).
fn char_boundary(b: &[u8], at: usize) -> usize {
    let continuation = |x: u8| x & 0xC0 == 0x80;
    (at.saturating_sub(3)..=at)
        .rev()
        .find(|&i| i > 0 && i < b.len() && !continuation(b[i]))
        .unwrap_or(at)
}

/// Writes `line` to `out` with every control character but the tab (C0,
/// DEL, C1) as a visible escape (`\x1b`, `\u{9b}`), and bytes that are not
/// UTF-8 as U+FFFD: nothing of it can move a terminal's cursor, change
/// its colours or title, or hide what came before.
pub(crate) fn escape_controls(line: &[u8], out: &mut Vec<u8>) {
    if line
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        out.extend_from_slice(line);
        return;
    }
    let mut s = String::with_capacity(line.len());
    for c in String::from_utf8_lossy(line).chars() {
        if c.is_control() && c != '\t' {
            let n = c as u32;
            if n < 0x80 {
                let _ = write!(s, "\\x{n:02x}");
            } else {
                let _ = write!(s, "\\u{{{n:x}}}");
            }
        } else {
            s.push(c);
        }
    }
    out.extend_from_slice(s.as_bytes());
}

/// A crash report from a worker's stderr tail: its last [`TAIL`] bytes
/// (from a character's start), as text, control characters escaped if
/// untrusted, trailing blank space off; `None` if that leaves nothing.
fn last_words(tail: &[u8], untrusted: bool) -> Option<Arc<str>> {
    let mut t = &tail[tail.len().saturating_sub(TAIL)..];
    if t.len() < tail.len() {
        let skip = t.iter().take(3).take_while(|&&b| b & 0xC0 == 0x80).count();
        t = &t[skip..];
    }
    let text = if untrusted {
        let mut v = Vec::with_capacity(t.len());
        for (n, line) in t.split(|&b| b == b'\n').enumerate() {
            if n > 0 {
                v.push(b'\n');
            }
            escape_controls(line, &mut v);
        }
        String::from_utf8_lossy(&v).into_owned()
    } else {
        String::from_utf8_lossy(t).into_owned()
    };
    let text = text.trim_end();
    (!text.is_empty()).then(|| Arc::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(modes: Output, untrusted: bool, chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
        let mut out = Outgoing::default();
        let mut partial = Vec::new();
        for c in chunks {
            let sink = Sink {
                mode: modes,
                k: 0,
                pid: 7,
                untrusted,
                out: &mut out,
            };
            lines(&mut partial, c, sink);
        }
        (out.bytes[0].clone(), partial)
    }

    #[test]
    fn only_whole_lines_go_out_and_a_partial_one_waits() {
        let (out, partial) = cut(Output::Lines, false, &[b"ab", b"c\nde", b"f\ng\n", b"h"]);
        assert_eq!(out, b"abc\ndef\ng\n");
        assert_eq!(partial, b"h");
        let (out, _) = cut(Output::PrefixedLines, false, &[b"x\ny\n"]);
        assert_eq!(out, b"[worker 7] x\n[worker 7] y\n");
    }

    #[test]
    fn a_line_past_the_bound_goes_out_in_pieces() {
        let long = vec![b'a'; 2 * LINE_MAX + 10];
        let (out, partial) = cut(Output::Lines, false, &[&long]);
        assert_eq!(out.len(), 2 * LINE_MAX + 2);
        assert_eq!(partial.len(), 10);
        // A piece never splits a character.
        let mut text = vec![b'a'; LINE_MAX - 1];
        text.extend_from_slice("é".as_bytes());
        let (out, partial) = cut(Output::Lines, false, &[&text]);
        assert_eq!(out.len(), LINE_MAX);
        assert_eq!(partial, "é".as_bytes());
    }

    #[test]
    fn control_characters_of_untrusted_lines_are_escaped() {
        let mut v = Vec::new();
        escape_controls(b"\x1b[2J\x1b]0;title\x07ok\tfine\r\x7f", &mut v);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "\\x1b[2J\\x1b]0;title\\x07ok\tfine\\x0d\\x7f"
        );
        let mut v = Vec::new();
        escape_controls("\u{9b}31m é \u{85}".as_bytes(), &mut v);
        assert_eq!(String::from_utf8(v).unwrap(), "\\u{9b}31m é \\u{85}");
        // A lone byte of C1 (not UTF-8) is no control once replaced.
        let mut v = Vec::new();
        escape_controls(b"a\x9bb", &mut v);
        assert_eq!(String::from_utf8(v).unwrap(), "a\u{fffd}b");
        let (out, _) = cut(Output::Lines, true, &[b"\x1b[31mred\n"]);
        assert_eq!(out, b"\\x1b[31mred\n");
        // A trusted worker's escapes pass as they are.
        let (out, _) = cut(Output::Lines, false, &[b"\x1b[31mred\n"]);
        assert_eq!(out, b"\x1b[31mred\n");
    }

    #[test]
    fn the_crash_report_is_the_last_bytes_from_a_characters_start() {
        assert_eq!(last_words(b"", false), None);
        assert_eq!(last_words(b"\n \n", false), None);
        assert_eq!(last_words(b"bye\n", false).as_deref(), Some("bye"));
        let mut tail = "é".repeat(TAIL);
        tail.push_str("\nlast\n");
        let words = last_words(tail.as_bytes(), false).unwrap();
        assert!(words.len() <= TAIL && words.ends_with("é\nlast"));
        assert!(words.starts_with('é'), "{:?}", &words[..8]);
        let words = last_words(b"one\x1b[2J\ntwo\n", true).unwrap();
        assert_eq!(&*words, "one\\x1b[2J\ntwo");
    }
}
