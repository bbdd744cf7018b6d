//! Parses a directory of untrusted inputs in sandboxed workers and reports,
//! per file, what happened.
//!
//! The "parser" stands for a library with a history of CVEs: some inputs
//! make it crash, loop forever, balloon, or try to phone home, read your
//! secrets, write outside its directory or start a shell. In a sandboxed
//! pool each of those fails alone, with an error that says why, and the
//! other files are parsed as usual.
//!
//! Run with `cargo run --release --example untrusted`.

use procpool::{Error, Pool, Sandbox, StartMethod};
use std::time::Duration;

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

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "it worked!".into(),
        Err(e) => format!("blocked ({e})"),
    }
}

fn main() -> Result<(), Error> {
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
    ];
    for (name, text) in inputs {
        std::fs::write(dir.join(name), text).expect("writing an input");
    }

    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::ForkServer)
        .sandbox(
            Sandbox::new()
                .read_only(&dir)
                .memory_limit(256 << 20)
                .cpu_time_per_task(Duration::from_millis(500))
                .open_files(64)
                .file_size_limit(1 << 20),
        )
        .build()?;

    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("listing the inputs")
        .map(|e| e.expect("an entry").path().display().to_string())
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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
