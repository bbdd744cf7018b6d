//! Parses a directory of untrusted inputs in sandboxed workers and reports,
//! per file, what happened.
//!
//! The "parser" stands for a library with a history of CVEs: some inputs
//! make it crash, loop forever, balloon, or try to phone home, read your
//! secrets, write outside its directory, start a shell, plant a
//! set-user-ID file, poison its process for later inputs, stop itself,
//! start a thousand threads, snoop on the program's environment and the
//! host's files, erase the program's log, take over its worker's socket
//! to forge the answers to later inputs, claim a 4 GiB result, or flood
//! the program with file descriptors.
//! In a sandboxed
//! pool each of those fails alone, with an error that says why, and the
//! other files are parsed as usual.
//!
//! Run with `cargo run --release --example untrusted`.

use procpool::{Error, Pool, Sandbox, StartMethod};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A secret of the program's, in its environment.
const SECRET: &str = "UNTRUSTED_DEMO_TOKEN";

/// Set by an input that poisons the process it is parsed in.
static POISONED: AtomicBool = AtomicBool::new(false);

/// What the parser found in one file.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Summary {
    lines: usize,
    fields: usize,
    /// What the input made the parser try, and whether it worked.
    tried: Vec<String>,
}

/// A parser of `key=value` lines with dangerous bugs: some inputs make it
/// misbehave.
fn parse(path: String) -> Summary {
    let text = std::fs::read_to_string(&path).expect("reading the input");
    let mut tried = Vec::new();
    for line in text.lines() {
        match line.trim() {
            // A memory-safety bug: the process dies.
            "CRASH" => std::process::abort(),
            // A parser stuck in a loop.
            "LOOP" => loop {
                std::hint::spin_loop();
            },
            // A length field trusted as is.
            "BALLOON" => {
                let mut v: Vec<Vec<u8>> = Vec::new();
                loop {
                    v.push(vec![1u8; 16 << 20]);
                }
            }
            "PHONE HOME" => {
                let r = std::net::TcpStream::connect_timeout(
                    &"127.0.0.1:9".parse().expect("an address"),
                    Duration::from_secs(1),
                );
                tried.push(format!("connect to 127.0.0.1:9: {}", outcome(r.map(drop))));
            }
            "STEAL" => {
                let r = std::fs::read_to_string("/etc/passwd");
                tried.push(format!("read /etc/passwd: {}", outcome(r.map(drop))));
            }
            "DROP" => {
                let target = std::env::temp_dir().join("procpool-untrusted-dropped");
                let r = std::fs::write(&target, "payload");
                tried.push(format!("write {}: {}", target.display(), outcome(r)));
            }
            // Plants a set-user-ID copy of itself for whoever runs it later.
            "SETUID" => {
                let out = std::path::Path::new(&path).with_file_name("out");
                let target =
                    std::ffi::CString::new(format!("{}/suid", out.display())).expect("a path");
                // SAFETY: umask and open with a valid C string; the fd is
                // closed at once.
                let fd = unsafe {
                    libc::umask(0);
                    libc::open(target.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o6755)
                };
                let r = if fd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    // SAFETY: fd is the file just opened.
                    unsafe { libc::close(fd) };
                    Ok(())
                };
                tried.push(format!("make a set-user-ID file: {}", outcome(r)));
            }
            // Leaves its mark on the process for the inputs after it.
            "POISON" => {
                POISONED.store(true, Ordering::SeqCst);
                std::thread::spawn(|| {
                    loop {
                        std::hint::spin_loop();
                    }
                });
                tried.push("poison its process and leave a thread spinning".into());
            }
            // Stops itself: uses no CPU, and would hold its worker for ever.
            "STOP" => {
                // SAFETY: a signal to this process itself.
                unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
            }
            // Starts threads until it cannot.
            "THREADS" => {
                let hs: Vec<_> = (0..1000)
                    .map_while(|_| {
                        std::thread::Builder::new()
                            .stack_size(64 << 10)
                            .spawn(|| std::thread::sleep(Duration::from_millis(100)))
                            .ok()
                    })
                    .collect();
                tried.push(format!("start 1000 threads: {} started", hs.len()));
                hs.into_iter().for_each(|h| drop(h.join()));
            }
            // Looks for the program's secrets and the host's files.
            "SNOOP" => {
                let token =
                    std::env::var(SECRET).map_or("not there".into(), |_| "it worked!".to_string());
                tried.push(format!("read the program's {SECRET}: {token}"));
                let r = std::fs::metadata("/etc/passwd").map(drop);
                tried.push(format!("stat /etc/passwd: {}", outcome(r)));
            }
            // Erases the program's log.
            "ERASE LOG" => {
                // SAFETY: ftruncate on fd 1 with an integer length.
                let r = if unsafe { libc::ftruncate(1, 0) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                tried.push(format!("truncate the program's stdout: {}", outcome(r)));
            }
            // Takes over its worker's socket to the program and answers
            // the tasks it expects that worker to get next.
            "HIJACK" => {
                let forged = (1..=100).all(|seq| write_all(parent_socket(), &header(0, 3, seq)));
                tried.push(format!(
                    "forge the answers to 100 later tasks: sent {forged}"
                ));
            }
            // Claims a 4 GiB result, then streams zeros after the claim, to
            // make the program allocate gigabytes.
            "CLAIM" => {
                let fd = parent_socket();
                let mut ok = write_all(fd, &header(4 << 30, 3, 1));
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..256 {
                    ok = ok && write_all(fd, &zeros);
                }
                tried.push(format!("make the program hold a 4 GiB result: sent {ok}"));
            }
            // Sends the program thousands of file descriptors, to use up
            // its fd table.
            "FD FLOOD" => {
                let null = std::fs::File::open("/dev/null").expect("/dev/null");
                let fds = [std::os::fd::AsRawFd::as_raw_fd(&null); 250];
                let sent = (0..40)
                    .filter(|_| send_with_fds(parent_socket(), &header(0, 99, 0), &fds))
                    .count();
                tried.push(format!("send the program {} fds", sent * fds.len()));
            }
            "SHELL" => {
                let r = std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg("id")
                    .output();
                tried.push(format!("run /bin/sh: {}", outcome(r.map(drop))));
            }
            _ => {}
        }
    }
    Summary {
        lines: text.lines().count(),
        fields: text.lines().filter(|l| l.contains('=')).count(),
        tried,
    }
}

/// The worker's socket to the program: the first socket among its fds,
/// found as a hostile input would (with `fstat`).
fn parent_socket() -> i32 {
    (3..1024)
        .find(|&fd| {
            // SAFETY: stat is plain data, for which all zero is a value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat of an integer fd (EBADF if it is not open)
            // writes into a live stat.
            let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
            ok && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
        })
        .unwrap_or(-1)
}

/// A frame header of the pool's wire format (as a hostile input could
/// learn it from the crate's source): length, kind, status, task, two words.
fn header(len: u64, kind: u8, seq: u64) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.extend_from_slice(&[kind, 0]);
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]);
    h
}

/// Writes all of `b` to `fd`; false if it could not.
fn write_all(fd: i32, mut b: &[u8]) -> bool {
    while !b.is_empty() {
        // SAFETY: a write of a live buffer to an integer fd.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            return false;
        }
        b = &b[n as usize..];
    }
    true
}

/// One `sendmsg` of `bytes` on `sock` with `fds` attached; false if it
/// failed.
fn send_with_fds(sock: i32, bytes: &[u8], fds: &[i32]) -> bool {
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data, for which all zero is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: cbuf holds CMSG_SPACE(fd_bytes) bytes, one header and the
    // fds, which CMSG_FIRSTHDR and CMSG_DATA address inside it; msg and
    // what it points to live across sendmsg.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(c),
            fd_bytes as usize,
        );
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) == bytes.len() as isize
    }
}

/// A line of this program's `/proc/self/status` (`VmHWM`), in MiB.
fn status_mib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    kib >> 10
}

/// How many fds this program holds.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "it worked!".into(),
        Err(e) => format!("blocked ({e})"),
    }
}

fn main() -> Result<(), Error> {
    // SAFETY: main has started no thread yet, so nothing reads the
    // environment while it changes.
    unsafe { std::env::set_var(SECRET, "s3cr3t") };
    // The untrusted inputs, made here for the demonstration.
    let dir = std::env::temp_dir().join(format!("procpool-untrusted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("making the input directory");
    let inputs = [
        ("config.txt", "name=procpool\nworkers=2\nmode=strict\n"),
        ("crash.txt", "a=1\nCRASH\n"),
        ("loop.txt", "a=1\nLOOP\n"),
        ("balloon.txt", "BALLOON\n"),
        ("phone-home.txt", "x=1\nPHONE HOME\nSTEAL\n"),
        ("dropper.txt", "DROP\nSHELL\ny=2\n"),
        ("users.txt", "alice=admin\nbob=user\n"),
        ("setuid.txt", "SETUID\nz=3\n"),
        ("poison.txt", "POISON\nw=4\n"),
        ("stop.txt", "STOP\n"),
        ("bomb.txt", "THREADS\n"),
        ("snoop.txt", "SNOOP\nERASE LOG\n"),
        ("hijack.txt", "HIJACK\n"),
        ("claim.txt", "CLAIM\n"),
        ("fd-flood.txt", "FD FLOOD\n"),
    ];
    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("making the output directory");
    for (name, text) in inputs {
        std::fs::write(dir.join(name), text).expect("writing an input");
    }

    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::ForkServer)
        .sandbox(
            Sandbox::new()
                .read_only(&dir)
                .read_write(&out)
                .memory_limit(256 << 20)
                .cpu_time_per_task(Duration::from_millis(500))
                .open_files(64)
                .file_size_limit(1 << 20),
        )
        .build()?;

    let fds_before = open_fds();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("listing the inputs")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    let results: Vec<_> = files
        .iter()
        .map(|f| pool.apply_async(parse, f.clone()))
        .collect::<Result<_, _>>()?;
    for (file, r) in files.iter().zip(results) {
        let name = std::path::Path::new(file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match r.get() {
            Ok(s) => {
                println!("{name:16} parsed: {} lines, {} fields", s.lines, s.fields);
                for t in s.tried {
                    println!("{:16}   tried to {t}", "");
                }
            }
            Err(Error::LimitExceeded { limit, .. }) => {
                println!("{name:16} stopped: went past the {limit}")
            }
            Err(Error::WorkerLost { status, .. }) => {
                println!("{name:16} crashed the parser ({status}); the worker was replaced")
            }
            Err(e) => println!("{name:16} failed: {e}"),
        }
    }
    pool.close();
    pool.join()?;
    let planted = std::fs::read_dir(&out)
        .expect("listing the output directory")
        .filter(|e| {
            use std::os::unix::fs::PermissionsExt;
            let mode = e
                .as_ref()
                .map_or(0, |e| e.metadata().map_or(0, |m| m.permissions().mode()));
            mode & 0o6000 != 0
        })
        .count();
    println!("set-user-ID or set-group-ID files left on the host: {planted}");
    println!(
        "this program's peak memory: {} MiB; its fds: {fds_before} before the inputs, {} after",
        status_mib("VmHWM:"),
        open_fds()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
