//! What the parent believes of a sandboxed worker's stream: nothing the
//! protocol does not allow, and no length past the sandbox's result limit
//! (`Sandbox::result_limit`).
//!
//! A task in a sandbox is taken to be hostile, and it owns its worker: it
//! can find the worker's socket to the parent and write anything on it,
//! with any file descriptors. So the supervisor checks, before it spends
//! anything on what such a worker sends:
//!
//! - each frame header ([`check_header`]): a kind a worker sends, a length
//!   within the limit (checked as soon as the header is in, before the
//!   read buffer grows for the body), and, for a DONE frame, a shape a
//!   sandboxed worker's result has: no `SharedBuf` fds (a sandboxed worker
//!   copies its buffers inline) and no result in its input block (its
//!   input was sealed);
//! - a DONE frame's body ([`check_done_body`]): a result in a block has
//!   its 8-byte length there, within the limit;
//! - the result block's file, by its size, before it is mapped
//!   ([`block_max`]);
//! - the fds that arrive ([`fds_allowed`]): only a DONE frame whose result
//!   is in a new block carries one; any other is closed as soon as it is
//!   received.
//!
//! Anything else is a protocol violation: the supervisor kills the worker,
//! stops reading it, and fails its task with
//! `Error::ProtocolViolation`. These are pure functions of the bytes, so
//! that the fuzz tests below can reach them.

use crate::proto::wire::{self, HDR, Header, ResultAt};

/// Checks a frame header from a sandboxed worker, before anything is
/// allocated for its body. `Err` says what is wrong.
pub(crate) fn check_header(h: &Header, limit: u64) -> Result<(), String> {
    match h.kind {
        wire::READY | wire::INIT_FAILED | wire::SANDBOX_FAILED | wire::RETIRING | wire::DONE => {}
        wire::LOG if h.len <= crate::proto::logs::MAX_BODY as u64 => return Ok(()),
        wire::LOG => return Err(format!("sent a log record of {} bytes", h.len)),
        k => return Err(format!("sent a frame of unknown kind {k}")),
    }
    if h.len > limit {
        return Err(format!(
            "sent a frame that claims {} bytes, past the sandbox's result limit of {limit} bytes",
            h.len
        ));
    }
    if h.kind != wire::DONE {
        return Ok(());
    }
    if h.status & wire::SHARED_FDS != 0 {
        return Err("sent SharedBuf fds with a result (a sandboxed worker copies them)".into());
    }
    match h.result_at() {
        ResultAt::Inline | ResultAt::NewBlock => Ok(()),
        ResultAt::InputBlock => Err("named its sealed input block for its result".into()),
        ResultAt::Unknown(a) => Err(format!("sent a result of unknown shape {a}")),
    }
}

/// Checks the body of a DONE frame whose header passed [`check_header`]:
/// a result in a new block has its length (8 bytes) there, within `limit`
/// together with the frame. Returns that length, if the result is in a
/// block.
pub(crate) fn check_done_body(h: &Header, body: &[u8], limit: u64) -> Result<Option<u64>, String> {
    if h.result_at() != ResultAt::NewBlock {
        return Ok(None);
    }
    let Ok(bytes) = <[u8; 8]>::try_from(body) else {
        return Err(format!(
            "sent a result block's length in {} bytes, not 8",
            body.len()
        ));
    };
    let len = u64::from_le_bytes(bytes);
    if len.saturating_add(h.len) > limit {
        return Err(format!(
            "claimed a result of {len} bytes, past the sandbox's result limit of {limit} bytes"
        ));
    }
    Ok(Some(len))
}

/// The granularity of a worker's blocks: it rounds a result's block up to
/// a multiple of this (`shm.rs`).
const BLOCK_GRAIN: u64 = 2 << 20;

/// The largest block file the parent maps for a result under `limit`: the
/// limit, rounded up as a worker rounds its blocks. Mapping more than is
/// read costs address space, not memory: what the parent reads (and
/// keeps resident) is the result's length, which [`check_done_body`]
/// held to the limit.
pub(crate) fn block_max(limit: u64) -> u64 {
    limit
        .checked_next_multiple_of(BLOCK_GRAIN)
        .unwrap_or(u64::MAX)
}

/// How many fds the frames in `buf` may carry, between them: `buf` starts
/// at a frame boundary (the supervisor consumes whole frames), and its
/// last frame may be partial. A sandboxed worker sends one fd, with a DONE
/// frame whose result is in a new block, on the frame's first byte; no
/// other frame carries any (a header not yet whole carries none: a
/// worker sends a frame's header in one piece with its fd).
pub(crate) fn fds_allowed(buf: &[u8]) -> usize {
    let mut at = 0usize;
    let mut n = 0;
    while let Some(h) = buf.get(at..).and_then(Header::parse) {
        if h.kind == wire::DONE && h.result_at() == ResultAt::NewBlock {
            n += 1;
        }
        match (HDR as u64)
            .checked_add(h.len)
            .and_then(|l| l.checked_add(at as u64))
        {
            Some(next) if next < buf.len() as u64 => at = next as usize,
            _ => break,
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec;
    use crate::proto::wire::{Frame, shared_prefix};

    /// A deterministic xorshift64* generator: the fuzz runs are the same
    /// on every run, and need no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }

        /// A length: mostly small, sometimes huge (the lengths an attacker
        /// claims).
        fn len(&mut self) -> u64 {
            match self.below(8) {
                0 => self.next(),
                1 => u64::MAX - self.below(64),
                2 => 1 << self.below(64),
                _ => self.below(200),
            }
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    const LIMIT: u64 = 1 << 20;

    /// A header of a random kind (mostly the worker's), flags and fields.
    fn header(r: &mut Rng) -> Header {
        let kinds = [wire::READY, wire::DONE, wire::DONE, wire::RETIRING, 0, 255];
        let len = r.len();
        let kind = kinds[r.below(kinds.len() as u64) as usize];
        let status = r.next() as u8;
        let seq = r.below(4);
        let mut h = Header::with_fields(kind, seq, r.below(4), r.next());
        (h.len, h.status) = (len, status);
        h
    }

    /// The header's bytes, its claimed length as it is.
    fn bytes_of(h: Header) -> Vec<u8> {
        let mut out = Vec::new();
        h.open(&mut out);
        out
    }

    /// Frames of random headers and bodies, some truncated, some garbage.
    fn stream(r: &mut Rng) -> Vec<u8> {
        let mut buf = Vec::new();
        for _ in 0..r.below(6) {
            let h = header(r);
            buf.extend_from_slice(&bytes_of(h));
            let body = (h.len as usize).min(r.below(64) as usize);
            buf.extend(r.bytes(body));
        }
        if r.below(4) == 0 {
            let n = r.below(40) as usize;
            buf.extend(r.bytes(n));
        }
        buf
    }

    #[test]
    fn a_header_past_the_limit_or_of_another_kind_is_refused() {
        let mut h = Header::done(1);
        h.len = LIMIT;
        assert_eq!(check_header(&h, LIMIT), Ok(()));
        h.len = LIMIT + 1;
        assert!(check_header(&h, LIMIT).unwrap_err().contains("past"));
        h.len = 4 << 30;
        assert!(check_header(&h, LIMIT).is_err());
        h.len = 10;
        h.kind = wire::TASK;
        assert!(check_header(&h, LIMIT).unwrap_err().contains("kind"));
        h.kind = wire::DONE;
        h.status = wire::SHARED_FDS;
        assert!(check_header(&h, LIMIT).is_err());
        h.status = 0;
        h.set_result_at(ResultAt::InputBlock);
        assert!(check_header(&h, LIMIT).is_err());
        h.set_result_at(ResultAt::NewBlock);
        h.len = 8;
        assert_eq!(check_header(&h, LIMIT), Ok(()));
        let len = |n: u64| n.to_le_bytes();
        assert_eq!(check_done_body(&h, &len(100), LIMIT), Ok(Some(100)));
        assert!(check_done_body(&h, &len(LIMIT), LIMIT).is_err());
        assert!(check_done_body(&h, &len(u64::MAX), LIMIT).is_err());
        assert!(check_done_body(&h, &[1, 2, 3], LIMIT).is_err());
        assert_eq!(block_max(1), 2 << 20);
        assert_eq!(block_max(u64::MAX), u64::MAX);
    }

    #[test]
    fn only_a_result_in_a_new_block_may_carry_an_fd() {
        let mut buf = Vec::new();
        Header::ready(1).push(&mut buf);
        assert_eq!(fds_allowed(&buf), 0);
        let mut h = Header::done(1);
        h.set_result_at(ResultAt::NewBlock);
        let f = h.open(&mut buf);
        buf.extend_from_slice(&5u64.to_le_bytes());
        f.close(&mut buf, 0);
        assert_eq!(fds_allowed(&buf), 1);
        // A partial one counts once its header is in.
        let mut h = Header::done(2);
        h.set_result_at(ResultAt::NewBlock);
        let f = h.open(&mut buf);
        buf.extend_from_slice(&5u64.to_le_bytes());
        f.close(&mut buf, 0);
        buf.truncate(buf.len() - 3);
        assert_eq!(fds_allowed(&buf), 2);
        buf.truncate(buf.len() - HDR);
        assert_eq!(fds_allowed(&buf), 1);
        assert_eq!(fds_allowed(&[]), 0);
    }

    /// The parent's parsing of what a worker sends, over random streams:
    /// nothing panics, every frame the parser yields lies within the
    /// buffer, every header the checks pass claims at most the limit, and
    /// the fds allowed never exceed the frames there are.
    #[test]
    fn fuzz_frames_and_headers() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let buf = stream(&mut r);
            let mut pos = 0;
            let mut frames = 0;
            while let Some(f) = Frame::parse(&buf, pos) {
                assert!(f.at == pos && f.end <= buf.len() && f.end >= f.at + HDR);
                let h = f.header;
                let _ = f.shared_count(&buf);
                let _ = f.payload(&buf);
                if check_header(&h, LIMIT).is_ok() {
                    assert!(h.len <= LIMIT);
                    if h.kind == wire::DONE
                        && let Ok(Some(n)) = check_done_body(&h, f.body(&buf), LIMIT)
                    {
                        assert!(n + h.len <= LIMIT);
                    }
                }
                pos = f.end;
                frames += 1;
            }
            let _ = wire::missing(&buf[pos..]);
            let _ = Frame::parse(&buf, buf.len() + r.below(3) as usize);
            assert!(fds_allowed(&buf) <= frames + 1);
            let (status, cut) = (r.next() as u8, r.below(buf.len() as u64 + 1) as usize);
            if let Some((_, rest)) = shared_prefix(status, &buf[..cut]) {
                assert!(rest.len() <= cut);
            }
        }
    }

    /// Untrusted decoding of random bytes, and of bytes that claim huge
    /// lengths, never panics and never believes a length past what the
    /// input could hold: a claim past it is an error, not an allocation.
    #[test]
    fn fuzz_untrusted_decoding() {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let n = r.below(48) as usize;
            let mut bytes = r.bytes(n);
            if r.below(2) == 0 {
                // A varint length tag (253: a u64 follows) with a claim.
                let at = r.below(bytes.len() as u64 + 1) as usize;
                let mut claim = vec![253u8];
                claim.extend_from_slice(&r.len().to_le_bytes());
                bytes.splice(at..at, claim);
            }
            if let Ok((v, used)) = codec::decode_untrusted::<serde_bytes::ByteBuf>(&bytes) {
                assert!(v.len() <= bytes.len() && used <= bytes.len());
            }
            if let Ok((v, _)) = codec::decode_untrusted::<String>(&bytes) {
                assert!(v.len() <= bytes.len());
            }
            if let Ok((v, _)) = codec::decode_untrusted::<Vec<u64>>(&bytes) {
                assert!(v.len() <= bytes.len());
            }
            let _ = codec::decode_untrusted::<(u8, Option<String>, Vec<Vec<u8>>)>(&bytes);
            let _ = crate::proto::task::take_message(&bytes);
        }
        // A claim of 4 GiB in 9 bytes is refused outright.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(4u64 << 30).to_le_bytes());
        assert!(codec::decode_untrusted::<serde_bytes::ByteBuf>(&bytes).is_err());
    }
}
