//! The worker streams' direct path: TCP from the engine's end to the
//! worker (tasks) and from its rank (results), so that they cross no MPI
//! message and no thread that polls MPI.
//!
//! Rank 0 listens on an ephemeral port of every IPv4 address of its host
//! ([`Listener`]). Each START it sends carries a [`Dial`]: that port, the
//! host's addresses (loopback last) and a random token. Once the rank's
//! fork server has the worker up, the rank connects to the first address
//! that answers and says hello: the token, the slot, its rank and the
//! worker's pid. Rank 0 checks the token and the slot (a stranger's
//! connection is dropped), acknowledges with one byte, and hands the
//! socket to the engine as the worker's stream; the rank hands its end to
//! the worker (`rank.rs`). MPI keeps the control messages (start, kill,
//! timeouts, end, stop).
//!
//! Where no address answers (a firewall, say), the rank falls back to
//! relaying the stream in MPI messages, and says so once on stderr.
//! `PROCPOOL_MPI_STREAMS=mpi` on rank 0 makes every stream go that way;
//! `PROCPOOL_MPI_ADDRS` on rank 0 chooses the addresses ranks try (a
//! cluster's fast network rather than the first one the kernel lists).

use crate::sys::{self, PollSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The token's length.
const TOKEN: usize = 16;
/// A hello: the token, then the slot, the rank and the pid (4 bytes each).
const HELLO: usize = TOKEN + 12;
/// What rank 0 answers to a hello it accepts.
const ACK: u8 = 0xA5;
/// How long a rank waits to connect to one address.
const DIAL_WAIT: Duration = Duration::from_secs(2);
/// How long rank 0 waits for a connection's hello before dropping it...
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// ... and a rank for the ack, longer (rank 0 acknowledges in time or
/// drops the connection, which the rank then sees at once). Either way it
/// is the rank's STARTED message over MPI that says which way the stream
/// goes, so the two sides cannot disagree.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long the listener is left alone after accepting failed.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most this many connections wait for their hello at once (a flood of
/// strangers cannot make rank 0 hold more).
const MAX_PENDING: usize = 64;

/// Where and how a rank reaches rank 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Dial {
    token: [u8; TOKEN],
    port: u16,
    addrs: Vec<Ipv4Addr>,
}

impl Dial {
    /// Appends it to a START message.
    pub(super) fn encode(&self, m: &mut Vec<u8>) {
        m.extend_from_slice(&self.token);
        m.extend_from_slice(&self.port.to_le_bytes());
        for a in &self.addrs {
            m.extend_from_slice(&a.octets());
        }
    }

    /// The dial in a START message's body; `None` if it has none (the
    /// stream goes over MPI) or it is malformed.
    pub(super) fn decode(b: &[u8]) -> Option<Dial> {
        let token = b.get(..TOKEN)?.try_into().ok()?;
        let port = u16::from_le_bytes(b.get(TOKEN..TOKEN + 2)?.try_into().ok()?);
        let rest = &b[TOKEN + 2..];
        if rest.is_empty() || !rest.len().is_multiple_of(4) {
            return None;
        }
        let addrs = rest
            .chunks(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect();
        Some(Dial { token, port, addrs })
    }
}

/// A worker's stream, connected and acknowledged.
pub(super) struct Hello {
    pub(super) slot: usize,
    /// The stream, for the engine...
    pub(super) stream: OwnedFd,
    /// ... and a duplicate, never read, to see the rank shut it.
    pub(super) watch: OwnedFd,
}

/// A connection that has not said its hello yet.
struct Pending {
    stream: TcpStream,
    got: Vec<u8>,
    until: Instant,
}

/// Rank 0's listening socket, and the connections that wait for their
/// hello.
pub(super) struct Listener {
    listener: TcpListener,
    dial: Dial,
    pending: Vec<Pending>,
    /// Accepting failed: the listener is not watched until then.
    paused_until: Option<Instant>,
}

impl Listener {
    /// Listens on an ephemeral port of every IPv4 address of this host.
    /// The ranks are told `PROCPOOL_MPI_ADDRS` (addresses, comma
    /// separated, tried in that order) if it is set, else every address.
    pub(super) fn open() -> io::Result<Listener> {
        let addrs = match std::env::var(ADDRS_ENV) {
            Ok(v) => parse_addrs(&v)?,
            Err(_) => sys::ipv4_addrs()?,
        };
        if addrs.is_empty() {
            return Err(io::Error::other("this host has no IPv4 address"));
        }
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let mut token = [0u8; TOKEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut token)?;
        Ok(Listener {
            listener,
            dial: Dial { token, port, addrs },
            pending: Vec::new(),
            paused_until: None,
        })
    }

    pub(super) fn dial(&self) -> &Dial {
        &self.dial
    }

    /// Whether connections wait for their hello (whose deadlines pass
    /// whether or not they are readable).
    pub(super) fn waiting(&self) -> bool {
        !self.pending.is_empty() || self.paused_until.is_some()
    }

    /// Adds its sockets to `set` (for reading).
    pub(super) fn watch(&self, set: &mut PollSet) {
        if self.paused_until.is_none() {
            set.push(self.listener.as_raw_fd(), true, false);
        }
        for p in &self.pending {
            set.push(p.stream.as_raw_fd(), true, false);
        }
    }

    /// Accepts what connected and reads what hellos came; each whole one
    /// that `expected(slot, rank)` accepts is acknowledged and returned
    /// (at most one per slot). A wrong token, a slot not expected from that
    /// rank, or a hello that is late drops the connection; so does the
    /// oldest waiting one when too many wait.
    pub(super) fn hellos(&mut self, mut expected: impl FnMut(usize, usize) -> bool) -> Vec<Hello> {
        let now = Instant::now();
        if self.paused_until.is_none_or(|t| t <= now) {
            self.paused_until = None;
            self.accept(now);
        }
        let mut out: Vec<Hello> = Vec::new();
        let token = self.dial.token;
        self.pending.retain_mut(|p| {
            let mut buf = [0u8; HELLO];
            let want = HELLO - p.got.len();
            match p.stream.read(&mut buf[..want]) {
                Ok(0) => return false,
                Ok(n) => p.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return p.until > now,
                Err(_) => return false,
            }
            if p.got.len() < HELLO {
                return p.until > now;
            }
            let word = |at: usize| u32::from_le_bytes(p.got[at..at + 4].try_into().unwrap());
            // The pid (at TOKEN + 8) is not needed here: the rank's STARTED
            // says it.
            let (slot, rank) = (word(TOKEN) as usize, word(TOKEN + 4) as usize);
            let again = out.iter().any(|h| h.slot == slot);
            if p.got[..TOKEN] != token || again || !expected(slot, rank) {
                return false;
            }
            // Both fds before the ack: once acknowledged, the rank counts
            // on the stream.
            let (Ok(stream), Ok(watch)) = (p.stream.try_clone(), p.stream.try_clone()) else {
                return false;
            };
            let _ = p.stream.set_nodelay(true);
            if p.stream.write(&[ACK]).ok() != Some(1) {
                return false;
            }
            out.push(Hello {
                slot,
                stream: OwnedFd::from(stream),
                watch: OwnedFd::from(watch),
            });
            false
        });
        out
    }

    /// Accepts every connection that waits; the oldest that waits for its
    /// hello makes room when too many do. If accepting fails (no fd left,
    /// say), the listener is left alone for a moment (it would stay
    /// readable, and the caller's poll would spin).
    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.pending.len() >= MAX_PENDING {
                        self.pending.remove(0);
                    }
                    self.pending.push(Pending {
                        stream,
                        got: Vec::with_capacity(HELLO),
                        until: now + HELLO_WAIT,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }
}

/// The variable that names the addresses ranks connect to.
const ADDRS_ENV: &str = "PROCPOOL_MPI_ADDRS";

fn parse_addrs(v: &str) -> io::Result<Vec<Ipv4Addr>> {
    v.split(',')
        .filter(|a| !a.trim().is_empty())
        .map(|a| {
            a.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ADDRS_ENV}: {a:?} is not an IPv4 address"),
                )
            })
        })
        .collect()
}

/// A worker rank's side: connects to rank 0 for the worker in `slot` and
/// says hello, trying each address in turn. Returns the stream once rank 0
/// has acknowledged it.
pub(super) fn connect(d: &Dial, slot: usize, rank: usize, pid: u32) -> io::Result<OwnedFd> {
    let mut hello = Vec::with_capacity(HELLO);
    hello.extend_from_slice(&d.token);
    for w in [slot as u32, rank as u32, pid] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    let mut last = io::Error::other("rank 0 named no address");
    for &ip in &d.addrs {
        let to = SocketAddr::from((ip, d.port));
        match say_hello(to, &hello) {
            Ok(s) => return Ok(s),
            Err(e) => last = io::Error::new(e.kind(), format!("{to}: {e}")),
        }
    }
    Err(last)
}

fn say_hello(to: SocketAddr, hello: &[u8]) -> io::Result<OwnedFd> {
    let mut s = TcpStream::connect_timeout(&to, DIAL_WAIT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(ACK_WAIT))?;
    s.write_all(hello)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    if ack[0] != ACK {
        return Err(io::Error::other("not acknowledged"));
    }
    s.set_read_timeout(None)?;
    Ok(OwnedFd::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_hellos(l: &mut Listener, expected: (usize, usize)) -> Vec<Hello> {
        for _ in 0..2000 {
            let got = l.hellos(|s, r| (s, r) == expected);
            if !got.is_empty() {
                return got;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Vec::new()
    }

    #[test]
    fn addresses_are_read_in_order_and_a_bad_one_is_refused() {
        let a = parse_addrs("10.0.0.2, 127.0.0.1,").unwrap();
        assert_eq!(a, [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::LOCALHOST]);
        let e = parse_addrs("10.0.0.2,example.org").unwrap_err();
        assert!(
            e.to_string().contains("\"example.org\" is not an IPv4"),
            "{e}"
        );
    }

    #[test]
    fn a_dial_survives_its_message() {
        let d = Dial {
            token: [9; TOKEN],
            port: 4242,
            addrs: vec![Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::LOCALHOST],
        };
        let mut m = vec![1, 2, 3];
        d.encode(&mut m);
        assert_eq!(Dial::decode(&m[3..]), Some(d));
        assert_eq!(Dial::decode(&[]), None, "no dial: the stream goes over MPI");
        assert_eq!(Dial::decode(&m[3..m.len() - 1]), None);
    }

    #[test]
    fn a_rank_with_the_token_is_acknowledged_and_handed_over() {
        let mut l = Listener::open().unwrap();
        let d = l.dial().clone();
        let dialer = std::thread::spawn(move || connect(&d, 5, 2, 777));
        let got = wait_for_hellos(&mut l, (5, 2));
        let theirs = dialer.join().unwrap().expect("acknowledged");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].slot, 5);
        // The two ends are one stream.
        let mut ours = TcpStream::from(theirs);
        ours.write_all(b"task").unwrap();
        let mut engine = TcpStream::from(got.into_iter().next().unwrap().stream);
        engine.set_nonblocking(false).unwrap();
        let mut b = [0u8; 4];
        engine.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"task");
    }

    #[test]
    fn one_stream_per_slot_and_a_flood_of_silent_connections_keeps_no_rank_out() {
        let mut l = Listener::open().unwrap();
        let at = SocketAddr::from((Ipv4Addr::LOCALHOST, l.dial().port));
        // More strangers than may wait, connected and silent.
        let strangers: Vec<TcpStream> = (0..MAX_PENDING + 6)
            .map(|_| TcpStream::connect(at).unwrap())
            .collect();
        let d = l.dial().clone();
        let (d1, d2) = (d.clone(), d);
        let a = std::thread::spawn(move || connect(&d1, 5, 2, 1));
        let b = std::thread::spawn(move || connect(&d2, 5, 2, 1));
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(a.is_finished() && b.is_finished()) && Instant::now() < deadline {
            got += l.hellos(|s, r| (s, r) == (5, 2) && got == 0).len();
            std::thread::sleep(Duration::from_millis(1));
        }
        let ok = [a.join().unwrap().is_ok(), b.join().unwrap().is_ok()];
        assert_eq!(got, 1, "one stream for slot 5");
        assert_eq!(ok.iter().filter(|&&o| o).count(), 1, "{ok:?}");
        drop(strangers);
    }

    #[test]
    fn a_wrong_token_or_an_unexpected_slot_is_refused() {
        let mut l = Listener::open().unwrap();
        let mut wrong = l.dial().clone();
        wrong.token[0] ^= 1;
        let d = l.dial().clone();
        let a = std::thread::spawn(move || connect(&wrong, 5, 2, 1));
        let b = std::thread::spawn(move || connect(&d, 6, 2, 1));
        // Only slot 5 from rank 2 is expected: neither hello is taken.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(a.is_finished() && b.is_finished()) && Instant::now() < deadline {
            assert!(l.hellos(|s, r| (s, r) == (5, 2)).is_empty());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(a.join().unwrap().is_err());
        assert!(b.join().unwrap().is_err());
    }
}
