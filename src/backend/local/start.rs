//! How the fork server starts: the two start methods.
//!
//! **ForkServer** (the default): the server is a fresh exec of the
//! program's own executable (`/proc/self/exe`, which still names the
//! running image if the file on disk was rebuilt or deleted). It has one
//! thread and none of the host's memory, so no lock that a host thread held
//! can be held in it or in a worker it forks: the invariant is "no lock of
//! the host can be held in a worker".
//!
//! The exec'd copy must become the server without running `main`. The
//! crate has one constructor (an `.init_array` entry, [`CONSTRUCTOR`]), which
//! the C runtime runs before `main` in every process of the program. It
//! checks one environment variable, [`sys::SERVER_ENV`]; in every process
//! but a server it is absent, and the constructor returns at once. In a
//! server it runs the program's remaining constructors itself (so that
//! registries built before `main` are there for tasks, as in the host),
//! then calls [`serve_exec`], which never returns. A constructor of our own
//! rather than the `ctor` crate: we need the address of our own entry to
//! find the constructors after it, and the whole of it is one static.
//! The limit of it: the constructors after ours are found in the
//! executable's `DT_INIT_ARRAY`, so a static executable without a dynamic
//! section runs in its server only the constructors before ours.
//!
//! The parent hands the server three fds by number in that variable: its
//! socket, the memfd of the shared status words, and a memfd holding the
//! [`Setup`] (initializer, socket sizes). They are close-on-exec in the
//! parent and stay so; only the child clears the flag, between fork and
//! exec. The server closes every other fd, removes the variable from its
//! environment (a task that re-runs the program gets a normal program),
//! sets up what std sets up before `main` (SIGPIPE ignored, stack-overflow
//! detection) and the pool's silent panic hook, and says HELLO. The parent
//! waits for that HELLO with a deadline: a server that never comes up is an
//! error, not a hang.
//!
//! A sandboxed pool's server is exec'd differently in two ways
//! ([`exec_server`]): its environment holds only the variables its sandbox
//! names and the marker (an exec's strings stay on the new process's
//! stack, so removing the host's variables after the exec would leave
//! them in every worker's memory); the spin, which an unsandboxed server
//! reads from `PROCPOOL_SPIN_US`, travels in its config instead. And its
//! stdin is `/dev/null`. Any server's stdout and stderr are the program's
//! where the pool's workers inherit them, else `/dev/null`: its workers
//! then get pipes of their own (`output.rs`), and it writes nothing itself.
//!
//! **Fork**: the server is a `fork()` of the caller, as in the first
//! version: workers see the caller's memory as it was at build time, and a
//! lock another thread held at that instant stays held in them.
//!
//! One server per pool (not one per program, as CPython's forkserver):
//! an exec'd server costs about a millisecond more than a fork (the
//! start-up rows of `docs/performance.md`), while a shared server would have to apply each pool's
//! environment, working directory, initializer and limits after each fork
//! and outlive pools; the simple choice is cheap enough.

use crate::backend::local::output;
use crate::backend::local::server::{self, Init, Msg, Setup};
use crate::error::Error;
use crate::proto::task::TaskFn;
use crate::proto::words::{PAGE_WORDS, STATUS_WORDS, SharedWords};
use crate::sys;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// How a pool starts its fork server, the process that forks every worker.
///
/// Like Python's start methods. The default is [`ForkServer`], unless the
/// environment variable `PROCPOOL_START_METHOD` says `fork` (or
/// `forkserver`) when the pool is built: that sets the default for code
/// that never names a start method.
///
/// | | `ForkServer` (default) | `Fork` |
/// |---|---|---|
/// | the server is | a fresh exec of the program's executable | a `fork()` of the caller |
/// | a worker inherits | the program's statics as constructors left them; what the initializer sets up; its task's argument | the caller's whole memory at `build()`: statics, heap, tables filled before `build()` |
/// | safe when | always: no lock of the host can be held in a worker | only before the program has other threads (a lock held by another thread at `build()` stays held in every worker) |
/// | start-up | an exec and a handshake (about a millisecond more) | a fork |
/// | needs | `/proc/self/exe`, procpool linked into the executable | nothing |
///
/// A server that does not say it is ready within 30 s (or
/// `PROCPOOL_SERVER_START_TIMEOUT_MS`) is killed, and `build()` returns
/// [`Error::ServerStart`].
///
/// [`ForkServer`]: StartMethod::ForkServer
///
/// ```
/// use procpool::{Pool, StartMethod};
/// fn square(x: u64) -> u64 { x * x }
/// let pool = Pool::builder()
///     .processes(1)
///     .start_method(StartMethod::ForkServer)
///     .build()?;
/// assert_eq!(pool.apply(square, 7)?, 49);
/// # Ok::<(), procpool::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartMethod {
    /// The server is a fresh exec of the program's own executable: safe in
    /// any program, whatever its other threads hold.
    ForkServer,
    /// The server is a fork of the caller: workers see the caller's memory
    /// at build time; safe only before the program has other threads.
    Fork,
}

impl StartMethod {
    /// The default: `PROCPOOL_START_METHOD` (`fork` or `forkserver`) if
    /// set, else [`StartMethod::ForkServer`].
    pub fn from_env() -> Result<StartMethod, Error> {
        match std::env::var("PROCPOOL_START_METHOD") {
            Err(_) => Ok(StartMethod::ForkServer),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "forkserver" | "fork_server" | "fork-server" => Ok(StartMethod::ForkServer),
                "fork" => Ok(StartMethod::Fork),
                _ => Err(Error::Config(
                    "PROCPOOL_START_METHOD must be `fork` or `forkserver`",
                )),
            },
        }
    }
}

/// Set by the constructor in every process it runs in, a server included
/// (and so in every worker a server forks, where a task may build a pool
/// of its own): proof that the constructor is linked in and runs in this
/// image.
static CONSTRUCTOR_RAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The crate's one constructor, run by the C runtime before `main` (glibc
/// passes `argc`, `argv` and `envp` to `.init_array` entries). `#[used]`
/// keeps it from being dropped as unreferenced, and [`constructor_ran`]
/// references it from `PoolBuilder::build`, so the object file that holds
/// it is always linked into a program that builds a pool.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: sys::Constructor = on_load;

/// Whether the crate's constructor ran in this process (and so will run in
/// an exec'd copy of it). Also keeps [`CONSTRUCTOR`] referenced.
fn constructor_ran() -> bool {
    std::hint::black_box(&CONSTRUCTOR);
    CONSTRUCTOR_RAN.load(std::sync::atomic::Ordering::SeqCst)
}

extern "C" fn on_load(
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    // Before the server check: a server's workers are processes of this
    // image too, and a task may exec a server of its own from one.
    CONSTRUCTOR_RAN.store(true, std::sync::atomic::Ordering::SeqCst);
    // One environment check, with no allocation, in every process.
    let Some(value) = sys::server_marker(envp) else {
        return;
    };
    // The constructors after this one would run after we return; we never
    // return, so run them first: registries built before `main` are then
    // there for tasks, as in the host.
    sys::run_later_constructors(on_load, argc, argv, envp);
    serve_exec(&value)
}

/// How long the parent waits for an exec'd server's HELLO: 30 s, or
/// `PROCPOOL_SERVER_START_TIMEOUT_MS`.
fn hello_deadline() -> Duration {
    std::env::var("PROCPOOL_SERVER_START_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis)
}

/// The task code's home: the address ranges of the ELF object that holds
/// the crate (and its anchor), and whether that object is the executable.
fn home() -> &'static Option<sys::Object> {
    static HOME: std::sync::OnceLock<Option<sys::Object>> = std::sync::OnceLock::new();
    HOME.get_or_init(|| sys::object_of(crate::proto::task::anchor_addr()))
}

/// Whether a task function (and its trampoline) lies in the object its
/// offsets are measured from: an offset means nothing in another object
/// (a function of a shared library or plugin would be a wild call in an
/// exec'd process).
pub(crate) fn check_task(f: TaskFn) -> Result<(), Error> {
    let Some(home) = home() else {
        return Ok(());
    };
    let inside = |off: u64| {
        let a = crate::proto::task::addr_of(off);
        home.ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&a))
    };
    if inside(f.tramp) && inside(f.func) {
        Ok(())
    } else {
        Err(Error::Config(
            "a task function must be code of the program's executable (the object procpool \
             is linked into), not of a shared library or plugin: its address would mean \
             nothing in a worker",
        ))
    }
}

fn cannot_exec(reason: String) -> Error {
    Error::ServerStart {
        reason: format!(
            "{reason}; StartMethod::ForkServer cannot work here, use \
             .start_method(StartMethod::Fork) (safe only before the program starts threads)"
        ),
    }
}

/// Starts a fork server by exec; returns the parent's end of its socket
/// and its pid, once it has said HELLO.
pub(crate) fn exec_server(setup: &Setup) -> Result<(OwnedFd, libc::pid_t), Error> {
    can_exec()?;
    let (parent_end, server_end) =
        sys::seqpacket_pair().map_err(|e| Error::io("creating the fork server socket", e))?;
    let config =
        write_config(setup).map_err(|e| Error::io("writing the fork server's settings", e))?;
    // In a program started with stdin, stdout or stderr closed, these may
    // have numbers 0-2, which the server would take for its stdio: hand it
    // copies numbered above them.
    let moved = [
        above_stdio(&server_end)?,
        above_stdio(setup.words.fd())?,
        above_stdio(&config)?,
    ];
    let raw = |i: usize, fd: RawFd| moved[i].as_ref().map_or(fd, |m| m.as_raw_fd());
    let keep = [
        raw(0, server_end.as_raw_fd()),
        raw(1, setup.words.raw_fd()),
        raw(2, config.as_raw_fd()),
    ];
    let mut cmd = server_command(setup, keep);
    if setup.sandbox.is_some() {
        // A sandboxed worker gets none of the host's stdio fds (its
        // stdout and stderr are pipes of its own: the builder refuses
        // `Output::Inherit` for it).
        cmd.stdin(std::process::Stdio::null());
    }
    let [stdout, stderr] = setup.output.server_stdio();
    cmd.stdout(stdout).stderr(stderr);
    let child = sys::spawn_keeping(&mut cmd, keep)
        .map_err(|e| cannot_exec(format!("could not exec /proc/self/exe: {e}")))?;
    // The Child handle neither waits nor kills when dropped; the pool reaps
    // the server by pid.
    let pid = child.id() as libc::pid_t;
    drop((child, cmd, server_end, config, moved));
    match hello(&parent_end, pid) {
        Ok(()) => Ok((parent_end, pid)),
        Err(e) => {
            sys::kill_and_reap(pid);
            Err(e)
        }
    }
}

/// The command that execs the server, with its environment: the host's
/// for an unsandboxed pool (less the MPI launcher's variables if asked),
/// only what the sandbox names for a sandboxed one; and the crate's
/// marker, which names the fds in `keep`.
fn server_command(setup: &Setup, keep: [RawFd; 3]) -> std::process::Command {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    {
        use std::os::unix::process::CommandExt;
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
    }
    if let Some(sb) = &setup.sandbox {
        // No byte of the host's environment in the server's memory (an
        // exec's strings stay on its stack, so clearing `environ` after
        // would not do): only what the sandbox names.
        cmd.env_clear();
        cmd.envs(sb.env());
    } else if setup.without_mpi_env {
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if ["OMPI_", "PMIX_", "PMI_"].iter().any(|p| k.starts_with(p)) {
                cmd.env_remove(&key);
            }
        }
    }
    if setup.sandbox.is_none()
        && let Some(us) = spin_for_server(setup)
    {
        cmd.env(crate::proto::idle::SPIN_ENV, us.to_string());
    }
    cmd.env(
        sys::SERVER_ENV,
        format!("{},{},{}", keep[0], keep[1], keep[2]),
    );
    cmd
}

/// The spin the server must use when it is not the one its own
/// environment gives: a server on an MPI rank answers a rank that relays
/// from another host, so its workers spin as long as the rank does
/// (`idle::remote_spin_budget`); a sandboxed server has no
/// `PROCPOOL_SPIN_US` in its environment, so it gets the parent's (in its
/// config).
fn spin_for_server(setup: &Setup) -> Option<u64> {
    if setup.without_mpi_env {
        let spin = crate::proto::idle::remote_spin_budget().as_micros();
        return Some(spin.min(u64::MAX as u128) as u64);
    }
    if setup.sandbox.is_some() {
        return crate::proto::idle::spin_from_env();
    }
    None
}

/// Whether an exec of `/proc/self/exe` would start a fork server: the
/// crate is in the executable and its constructor runs there.
fn can_exec() -> Result<(), Error> {
    if std::env::var_os(sys::SERVER_ENV).is_some() {
        return Err(cannot_exec(format!(
            "{} is set in this process's environment (is this a copy of a fork server?)",
            sys::SERVER_ENV
        )));
    }
    match home() {
        Some(o) if o.is_main => {}
        Some(_) => {
            return Err(cannot_exec(
                "procpool is inside a shared library, not the program's executable".into(),
            ));
        }
        None => {
            return Err(cannot_exec(
                "procpool's code was not found among the loaded objects".into(),
            ));
        }
    }
    if !constructor_ran() {
        return Err(cannot_exec(
            "procpool's constructor did not run in this program (it runs from .init_array before main)"
                .into(),
        ));
    }
    Ok(())
}

/// A copy of `fd` numbered 3 or above if it is 0-2, else `None`.
fn above_stdio(fd: &OwnedFd) -> Result<Option<OwnedFd>, Error> {
    if fd.as_raw_fd() > 2 {
        return Ok(None);
    }
    sys::dup_above_stdio(fd)
        .map(Some)
        .map_err(|e| Error::io("moving an fd above stdio", e))
}

fn hello(sock: &OwnedFd, pid: libc::pid_t) -> Result<(), Error> {
    let fail = |why: &str| Error::ServerStart {
        reason: format!("the exec'd fork server (pid {pid}) {why}"),
    };
    let msg = next_datagram(sock, pid)?;
    match Msg::from_bytes(&msg) {
        Some(Msg::Hello { pid: p, sandbox }) if p as libc::pid_t == pid => match sandbox {
            HELLO_OK => Ok(()),
            b @ (HELLO_WEAKER | HELLO_FAILED) => {
                // The sandbox's report follows.
                let text = next_datagram(sock, pid)?;
                let reason = String::from_utf8_lossy(&text).into_owned();
                if b == HELLO_FAILED {
                    return Err(Error::Sandbox { reason });
                }
                log::warn!("procpool: a weaker sandbox, as allowed: it lacks {reason}");
                Ok(())
            }
            _ => Err(fail("sent a malformed hello")),
        },
        Some(_) => Err(fail("sent something other than its hello")),
        None if msg.is_empty() => Err(fail("exited before it was ready")),
        None => Err(fail("sent a malformed hello")),
    }
}

/// The server's next datagram, within [`hello_deadline`].
fn next_datagram(sock: &OwnedFd, pid: libc::pid_t) -> Result<Vec<u8>, Error> {
    let deadline = hello_deadline();
    match sys::wait_readable(sock.as_raw_fd(), deadline) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::ServerStart {
                reason: format!(
                    "the exec'd fork server (pid {pid}) did not answer within {deadline:?}"
                ),
            });
        }
        Err(e) => return Err(Error::io("waiting for the fork server", e)),
    }
    let mut buf = vec![0u8; 4096];
    let (n, _) = sys::recv_with_fds(sock.as_raw_fd(), &mut buf)
        .map_err(|e| Error::io("reading the fork server's hello", e))?;
    buf.truncate(n);
    Ok(buf)
}

/// HELLO's `b`: the server is ready (with its sandbox, if any).
const HELLO_OK: u64 = 0;
/// HELLO's `b`: ready with a weaker sandbox; a datagram saying what it
/// lacks follows.
const HELLO_WEAKER: u64 = 1;
/// HELLO's `b`: the sandbox cannot be had; a datagram saying why follows,
/// and the server exits.
const HELLO_FAILED: u64 = 2;

const CONFIG_MAGIC: &[u8; 8] = b"PROCPL04";

/// The settings an exec'd server needs, in a memfd: a magic, the socket
/// buffer size, which output streams are piped (a byte,
/// `Streams::bits`), the initializer (offsets and argument) if any, the
/// sandbox (a flag, a length and its bincode encoding) if any, then the
/// spin in microseconds (a flag and the number) if the server must not
/// take it from its environment (a sandboxed server, whose environment
/// holds only what the sandbox names: [`spin_for_server`]).
fn write_config(setup: &Setup) -> std::io::Result<OwnedFd> {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(CONFIG_MAGIC);
    bytes.extend_from_slice(&(setup.sock_buf as u64).to_le_bytes());
    bytes.push(setup.output.bits());
    match &setup.init {
        None => bytes.push(0),
        Some(init) => {
            bytes.push(1);
            bytes.extend_from_slice(&init.f.tramp.to_le_bytes());
            bytes.extend_from_slice(&init.f.func.to_le_bytes());
            bytes.extend_from_slice(&(init.arg.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&init.arg);
        }
    }
    match &setup.sandbox {
        None => bytes.push(0),
        Some(sb) => {
            let mut enc = Vec::new();
            crate::proto::codec::encode_into(sb, &mut enc).map_err(std::io::Error::other)?;
            bytes.push(1);
            bytes.extend_from_slice(&(enc.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&enc);
        }
    }
    match setup.sandbox.as_ref().and(spin_for_server(setup)) {
        None => bytes.push(0),
        Some(us) => {
            bytes.push(1);
            bytes.extend_from_slice(&us.to_le_bytes());
        }
    }
    let fd = sys::memfd()?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&bytes)?;
    Ok(OwnedFd::from(f))
}

/// What [`write_config`] wrote: the socket buffer size and output
/// streams, the initializer, the sandbox and the spin.
type Config = (
    (usize, output::Streams),
    Option<Init>,
    Option<crate::sandbox::Spec>,
    Option<u64>,
);

fn read_config(fd: OwnedFd) -> Option<Config> {
    let mut f = std::fs::File::from(fd);
    f.rewind().ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let rest = bytes.strip_prefix(CONFIG_MAGIC)?;
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let sock_buf = u64_at(rest, 0)? as usize;
    let streams = output::Streams::from_bits(*rest.get(8)?);
    let rest = &rest[9..];
    let (init, at) = match *rest.first()? {
        0 => (None, 1),
        _ => {
            let tramp = u64_at(rest, 1)?;
            let func = u64_at(rest, 9)?;
            let len = u64_at(rest, 17)? as usize;
            let end = 25usize.checked_add(len)?;
            let arg = rest.get(25..end)?.to_vec();
            (
                Some(Init {
                    f: TaskFn { tramp, func },
                    arg,
                }),
                end,
            )
        }
    };
    let (sandbox, at) = match *rest.get(at)? {
        0 => (None, at + 1),
        _ => {
            let len = u64_at(rest, at + 1)? as usize;
            let from = at + 9;
            let end = from.checked_add(len)?;
            let enc = rest.get(from..end)?;
            let spec = crate::proto::codec::decode::<crate::sandbox::Spec>(enc).ok()?;
            (Some(spec.0), end)
        }
    };
    let spin = match *rest.get(at)? {
        0 => None,
        _ => Some(u64_at(rest, at + 1)?),
    };
    Some(((sock_buf, streams), init, sandbox, spin))
}

/// The exec'd fork server, called by the crate's constructor before `main`
/// in a process started by [`exec_server`]; never returns.
pub(crate) fn serve_exec(value: &str) -> ! {
    sys::remove_env_single_threaded(sys::SERVER_ENV);
    sys::ignore_sigpipe();
    crate::worker::mark_pool_child();
    crate::worker::install_panic_hook();
    sys::install_stack_overflow_handler();
    let fds: Vec<i32> = value.split(',').filter_map(|s| s.parse().ok()).collect();
    let [sock, words, config] = fds[..] else {
        sys::exit_now(120)
    };
    let (Some(sock), Some(words), Some(config)) = (
        sys::adopt_fd(sock),
        sys::adopt_fd(words),
        sys::adopt_fd(config),
    ) else {
        sys::exit_now(121)
    };
    let Some(((sock_buf, output), init, sandbox, spin)) = read_config(config) else {
        sys::exit_now(123)
    };
    if let Some(us) = spin {
        crate::proto::idle::set_spin_override(us);
    }
    // A sandboxed pool gives each worker a page of status words.
    let stride = if sandbox.is_some() {
        PAGE_WORDS
    } else {
        STATUS_WORDS
    };
    let Ok(words) = SharedWords::from_fd(words, stride) else {
        sys::exit_now(122)
    };
    sys::close_fds_except(&[sock.as_raw_fd(), words.raw_fd()]);
    // The sandbox's network namespace, filters and checks, once for every
    // worker, before the first is forked.
    let (prepared, hello, report) = match sandbox.clone().map(crate::sandbox::prepare) {
        None => (None, HELLO_OK, None),
        Some(crate::sandbox::Readiness::Full(p)) => (Some(p), HELLO_OK, None),
        Some(crate::sandbox::Readiness::Weaker(p, what)) => (Some(p), HELLO_WEAKER, Some(what)),
        Some(crate::sandbox::Readiness::Failed(why)) => (None, HELLO_FAILED, Some(why)),
    };
    let hi = Msg::Hello {
        pid: std::process::id(),
        sandbox: hello,
    };
    if sys::send_with_fds(sock.as_raw_fd(), &hi.to_bytes(), &[]).is_err() {
        sys::exit_now(124)
    }
    if let Some(text) = report {
        let _ = sys::send_with_fds(sock.as_raw_fd(), text.as_bytes(), &[]);
    }
    if hello == HELLO_FAILED {
        sys::exit_now(125)
    }
    let setup = Setup {
        init,
        words: Arc::new(words),
        sock_buf,
        sandbox,
        prepared,
        without_mpi_env: false,
        output,
    };
    server::run(sock, &setup)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(init: Option<Init>) -> Setup {
        Setup {
            init,
            words: Arc::new(SharedWords::new(8).unwrap()),
            sock_buf: 12345,
            sandbox: None,
            prepared: None,
            without_mpi_env: false,
            output: output::Streams::INHERIT,
        }
    }

    #[test]
    fn the_config_travels_whole() {
        let init = Init {
            f: TaskFn {
                tramp: 0x1234,
                func: 0xfedc_ba98,
            },
            arg: (0..=255u8).collect(),
        };
        let mut s = spec(Some(init));
        s.output.stderr = output::Output::Log;
        let ((sock_buf, streams), init, sandbox, spin) =
            read_config(write_config(&s).unwrap()).unwrap();
        assert_eq!(sock_buf, 12345);
        // The server learns only which streams it pipes.
        assert_eq!(streams.piped(), [false, true]);
        let i = init.unwrap();
        assert_eq!(
            i.f,
            TaskFn {
                tramp: 0x1234,
                func: 0xfedc_ba98
            }
        );
        assert_eq!(i.arg, (0..=255u8).collect::<Vec<_>>());
        assert!(sandbox.is_none());
        assert!(spin.is_none());
        let (_, init, _, _) = read_config(write_config(&spec(None)).unwrap()).unwrap();
        assert!(init.is_none());
    }

    #[test]
    fn a_sandboxed_servers_config_carries_its_sandbox_and_spin() {
        let mut s = spec(None);
        s.sandbox = Some(crate::sandbox::Sandbox::new().resolve().unwrap());
        let (_, _, sandbox, spin) = read_config(write_config(&s).unwrap()).unwrap();
        assert!(sandbox.is_some());
        // The parent's PROCPOOL_SPIN_US, which the server's environment
        // lacks; none for an unsandboxed server, which reads its own.
        assert_eq!(spin, crate::proto::idle::spin_from_env());
        s.sandbox = None;
        let (_, _, _, spin) = read_config(write_config(&s).unwrap()).unwrap();
        assert_eq!(spin, None);
    }

    #[test]
    fn a_truncated_or_foreign_config_is_refused() {
        let init = Init {
            f: TaskFn { tramp: 1, func: 2 },
            arg: vec![7; 100],
        };
        let s = spec(Some(init));
        let mut f = std::fs::File::from(write_config(&s).unwrap());
        let mut bytes = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut bytes).unwrap();
        let with = |b: &[u8]| {
            let mut g = std::fs::File::from(sys::memfd().unwrap());
            g.write_all(b).unwrap();
            OwnedFd::from(g)
        };
        for cut in [0, 4, 8, 16, 20, bytes.len() - 1] {
            assert!(read_config(with(&bytes[..cut])).is_none(), "cut {cut}");
        }
        assert!(read_config(with(b"NOTOURS!and more bytes")).is_none());
    }

    #[test]
    fn the_crates_code_is_in_the_executable() {
        let o = home().as_ref().expect("the anchor's object");
        assert!(o.is_main);
        assert!(check_task(TaskFn::single::<u32, u32>(|x| x + 1)).is_ok());
    }
}
