//! What travels after a panic's message in a PANIC body: where the task
//! panicked and, with backtraces on, its stack. The worker writes what its
//! panic hook recorded (`capture.rs`); nothing is symbolised there: each
//! address travels as a file offset in the object it was mapped from
//! (`/proc/self/maps`), which the parent maps back into its own address
//! space (`traceback.rs`).

use crate::proto::codec;
use crate::traceback::{Maps, PanicLocation, RemoteBacktrace};
use serde::{Deserialize, Serialize};

/// What travels after a panic's message in a PANIC body (see
/// [`put_report`]).
#[derive(Serialize, Deserialize, Default)]
struct Wire {
    location: Option<(String, u32, u32)>,
    /// The objects the frames are in (paths from `/proc/self/maps`).
    objects: Vec<String>,
    /// Each frame: an index into `objects` and a file offset in it.
    frames: Vec<(u32, u64)>,
}

/// In the worker, after a task's panic was caught: appends what the hook
/// recorded (the location, the frames as object offsets) to `out`, after
/// the panic's message.
pub(crate) fn put_report(out: &mut Vec<u8>) {
    let Some(rec) = crate::capture::take_recorded() else {
        return;
    };
    let mut wire = Wire {
        location: rec.location,
        ..Wire::default()
    };
    if !rec.ips.is_empty() {
        let maps = Maps::of_this_process();
        for ip in rec.ips {
            let (object, offset) = match maps.offset_of(ip) {
                Some((path, off)) => (path, off),
                None => ("?", ip as u64),
            };
            let i = match wire.objects.iter().position(|o| o == object) {
                Some(i) => i,
                None => {
                    wire.objects.push(object.to_string());
                    wire.objects.len() - 1
                }
            };
            wire.frames.push((i as u32, offset));
        }
    }
    // Encoding plain data into a Vec cannot fail.
    let _ = codec::encode_into(&wire, out);
}

/// In the parent: the location and backtrace that follow a panic's
/// message in a PANIC body (`rest` starts after the message), if any.
pub(crate) fn read_report(rest: &[u8]) -> (Option<PanicLocation>, Option<RemoteBacktrace>) {
    let Ok((wire, _)) = codec::decode_untrusted::<Wire>(rest) else {
        return (None, None);
    };
    let location = wire
        .location
        .map(|(file, line, column)| PanicLocation::new(file, line, column));
    let backtrace =
        (!wire.frames.is_empty()).then(|| RemoteBacktrace::new(wire.objects, wire.frames));
    (location, backtrace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_travels_after_the_message() {
        let sent = Wire {
            location: Some(("src/lib.rs".into(), 12, 5)),
            objects: vec!["/bin/app".into()],
            frames: vec![(0, 0x1234), (0, 0x5678)],
        };
        let mut body = Vec::new();
        codec::encode_into(&sent, &mut body).unwrap();
        let (location, backtrace) = read_report(&body);
        let l = location.unwrap();
        assert_eq!((l.file(), l.line(), l.column()), ("src/lib.rs", 12, 5));
        assert!(backtrace.is_some());
        // Without frames there is no backtrace; without a report, nothing.
        body.clear();
        codec::encode_into(&Wire::default(), &mut body).unwrap();
        assert!(matches!(read_report(&body), (None, None)));
        assert!(matches!(read_report(&[]), (None, None)));
    }

    #[test]
    fn nothing_recorded_adds_nothing() {
        // This thread has had no panic recorded.
        let mut out = vec![1, 2];
        put_report(&mut out);
        assert_eq!(out, [1, 2]);
    }
}
