//! Where the workers' stdout and stderr go: [`Output`], one per stream,
//! chosen per pool (`PoolBuilder::stdout`, `PoolBuilder::stderr`) as
//! [`std::process::Stdio`] is for a `Command`.
//!
//! - [`Output::Inherit`]: the worker writes to the program's own fd, as
//!   any child does, with nothing in between. An unsandboxed pool's
//!   default; a sandboxed pool refuses it (a task owns its worker, and with
//!   the program's fd it could do more than add bytes to it: `ftruncate`
//!   and `pwrite` a log file, `fcntl` its flags, read it back).
//! - Every other choice sends the stream **through the pool**: the fork
//!   server gives each worker a pipe of its own for that stream (made just
//!   before the fork, [`WorkerPipes`]), and hands the read end to the
//!   parent with the worker's socket (`SPAWNED`, `server.rs`), keeping no
//!   copy. The parent's pump, one thread per pool (`procpool-output`, `pump.rs`),
//!   reads every worker's pipes (`relay.rs`): it cuts what arrives into
//!   whole lines (a partial line waits for its end, the worker's end, or
//!   64 KiB, `relay::LINE_MAX`), then writes them to the program's fd
//!   ([`Output::Lines`], [`Output::PrefixedLines`]), logs them
//!   ([`Output::Log`]), or drops them ([`Output::Null`]). One thread
//!   writes every line of the pool, each in one piece: lines of different
//!   workers never mix.
//!
//! Whenever stderr goes through the pool (`Null` included), the pump keeps
//! each worker's last bytes of it, its crash report (`relay::TAIL`). The
//! engine asks for it (`Backend::last_words`) when a task panicked and
//! when a worker ended, and the report joins the task's error. Results and
//! ends come on other channels than output: a worker writes to its pipe
//! before it sends a result, and the server reaps it before it reports its
//! end, so reading what the pipe holds then (without waiting: a task's
//! child may hold the pipe open) gives every byte it wrote before. In a
//! sandboxed pool the pump also counts what each worker wrote, and past
//! the output cap marks its `died_of` word and has the server kill it, and
//! a worker's lines are untrusted: their control characters are escaped.
//!
//! Why the parent reads the pipes rather than the server, as the server
//! once relayed a sandboxed pool's: a crash report must be read with the
//! result or the end it goes with. A relay in another process would hold
//! a worker's last bytes somewhere between its pipe and the parent when
//! the result arrives, and the task would be settled before them. Reading
//! each worker's own pipe also tells whose line is whose without a
//! header on it (the pid of a `[worker PID] ` prefix or a log record).
//!
//! Over MPI a rank's server always gives its workers the rank's own
//! stdout and stderr (`Streams::INHERIT`), which the launcher forwards:
//! the builder accepts no other `Output` with `mpi()`.
//!
//! The pump holds nothing of the pool but the pipes, a copy of the
//! server's socket (for those kills; given up when the pool closes the
//! server, so that the server still sees end-of-file), the status words
//! and what waits to be written, so it keeps no pool alive. It ends once
//! the pool is done and every pipe has reached end-of-file, or at most
//! `pump::DRAIN_WAIT` after: `join` waits that long at most for it, so that
//! what the pool's processes wrote before they ended is out before `join`
//! returns. A write to the program's fd that fails (a closed pipe, a full
//! disk) drops those bytes, and the pump reads on, so a worker never
//! blocks on a dead reader; a slow reader slows the workers that write.

use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Where one output stream (stdout or stderr) of a pool's workers goes,
/// as [`std::process::Stdio`] says it for one child: set with
/// [`PoolBuilder::stdout`](crate::PoolBuilder::stdout) and
/// [`PoolBuilder::stderr`](crate::PoolBuilder::stderr).
///
/// | | the worker writes to | reaches | crash report (stderr) |
/// |---|---|---|---|
/// | `Inherit` | the program's own fd | the program's fd, byte for byte | no |
/// | `Null` | a pipe the pool reads | nothing | yes |
/// | `Lines` | a pipe the pool reads | the program's fd, whole lines | yes |
/// | `PrefixedLines` | a pipe the pool reads | the program's fd, whole lines after `[worker PID] ` | yes |
/// | `Log` | a pipe the pool reads | a [`log`] record per line | yes |
///
/// `Inherit` is an unsandboxed pool's default: nothing stands between a
/// task's `println!` and the program's stdout, and the lines of two
/// workers may mix mid-line. Through the pool, a thread of the program
/// reads each worker's pipe and passes on whole lines only: a line
/// without its newline waits for the rest, for its worker's end (then
/// it goes out with a newline added), or until it is 64 KiB long (then
/// it goes out cut). When stderr goes through the pool, each worker's
/// last bytes of it come back with the error of a task it failed
/// ([`Error::last_words`](crate::Error::last_words)), `Null` included.
///
/// A sandboxed pool's default is `Lines` for both streams, and it refuses
/// `Inherit` ([`Error::Sandbox`](crate::Error::Sandbox)): its lines come
/// from untrusted code, so their control characters (ESC and the rest of
/// C0 and C1 but the tab, and DEL) are written as visible escapes
/// (`\x1b`), which no terminal acts on. Over MPI only `Inherit` is
/// accepted ([`Error::Config`](crate::Error::Config)): each rank's
/// workers write to that rank's stdout and stderr, which the launcher
/// forwards as it does for the rank itself.
///
/// `Log` makes each line a record of target `procpool::worker`: level
/// `Info` for stdout, `Warn` for stderr, the message `worker PID: line`.
///
/// ```
/// use procpool::{Output, Pool};
/// fn shout(x: u32) -> u32 {
///     println!("working on {x}");
///     eprintln!("a warning about {x}");
///     x
/// }
/// let pool = Pool::builder()
///     .processes(2)
///     .stdout(Output::PrefixedLines) // "[worker 1234] working on 1"
///     .stderr(Output::Null)          // dropped, but kept for crash reports
///     .build()?;
/// assert_eq!(pool.map(shout, 1..=4)?, vec![1, 2, 3, 4]);
/// # Ok::<(), procpool::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Output {
    /// The program's own fd, shared with the worker (an unsandboxed
    /// pool's default).
    Inherit,
    /// Nothing: what the workers write is read and dropped (for stderr,
    /// its last bytes are kept for crash reports).
    Null,
    /// The program's own fd, through the pool, in whole lines.
    Lines,
    /// As [`Lines`](Output::Lines), each line after `[worker PID] `.
    PrefixedLines,
    /// A [`log`] record per line: target `procpool::worker`, level
    /// `Info` (stdout) or `Warn` (stderr), message `worker PID: line`.
    Log,
}

/// A pool's choice for both streams, and whether its workers are
/// sandboxed (their lines untrusted, their output capped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Streams {
    pub(crate) stdout: Output,
    pub(crate) stderr: Output,
    /// A sandboxed pool's output cap (bytes per worker, both streams).
    pub(crate) cap: Option<u64>,
}

impl Streams {
    /// Both streams the program's own (an MPI rank's server).
    #[cfg_attr(not(any(feature = "mpi", test)), allow(dead_code))]
    pub(crate) const INHERIT: Streams = Streams {
        stdout: Output::Inherit,
        stderr: Output::Inherit,
        cap: None,
    };

    /// Which streams (stdout, stderr) go through the pool: each worker
    /// gets a pipe of its own for them.
    pub(crate) fn piped(self) -> [bool; 2] {
        [self.stdout, self.stderr].map(|o| o != Output::Inherit)
    }

    /// The streams as the server needs them: only which are piped (what
    /// an exec'd server is told, [`Streams::from_bits`]).
    pub(crate) fn bits(self) -> u8 {
        let [out, err] = self.piped();
        u8::from(out) | u8::from(err) << 1
    }

    /// A server's streams from [`Streams::bits`]: a piped stream is
    /// `Null` to it (the server only makes the pipes).
    pub(crate) fn from_bits(bits: u8) -> Streams {
        let mode = |bit: u8| {
            if bits & bit != 0 {
                Output::Null
            } else {
                Output::Inherit
            }
        };
        Streams {
            stdout: mode(1),
            stderr: mode(2),
            cap: None,
        }
    }

    /// The server's own stdout and stderr: the program's for a stream
    /// that is inherited, else `/dev/null` (it writes nothing itself; its
    /// workers get pipes of their own).
    pub(crate) fn server_stdio(self) -> [std::process::Stdio; 2] {
        self.piped().map(|p| {
            if p {
                std::process::Stdio::null()
            } else {
                std::process::Stdio::inherit()
            }
        })
    }
}

/// The pipes of one worker's piped streams, made by the server just
/// before the fork: the worker makes the write ends its stdout and
/// stderr, the parent gets the read ends.
pub(crate) struct WorkerPipes {
    write: [Option<OwnedFd>; 2],
    read: [Option<OwnedFd>; 2],
}

impl WorkerPipes {
    /// Pipes for the streams that `piped` says (none: an empty set).
    pub(crate) fn new(piped: [bool; 2]) -> std::io::Result<WorkerPipes> {
        let mut p = WorkerPipes {
            write: [None, None],
            read: [None, None],
        };
        // In a program started with stdout or stderr closed, a pipe may
        // get fd 1 or 2, which the new worker would take for its stdio:
        // each end is numbered above them.
        let above = |fd: OwnedFd| {
            if fd.as_raw_fd() > 2 {
                Ok(fd)
            } else {
                sys::dup_above_stdio(&fd)
            }
        };
        for (k, _) in piped.iter().enumerate().filter(|(_, p)| **p) {
            let (r, w) = sys::pipe()?;
            p.read[k] = Some(above(r)?);
            p.write[k] = Some(above(w)?);
        }
        Ok(p)
    }

    /// In the new worker: makes its write ends its stdout and stderr, and
    /// closes every fd of the pipes (their numbers above 2).
    pub(crate) fn install(&self) -> std::io::Result<()> {
        sys::redirect_stdio(self.write[0].as_ref(), self.write[1].as_ref())?;
        for fd in self.write.iter().chain(&self.read).flatten() {
            sys::close_fd(fd.as_raw_fd());
        }
        Ok(())
    }

    /// The read ends, in stream order, for the parent (with the worker's
    /// socket). The server drops the pipes once they are sent.
    pub(crate) fn read_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.read.iter().flatten().map(AsRawFd::as_raw_fd)
    }
}
