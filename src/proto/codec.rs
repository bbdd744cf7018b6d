//! The one module that names the serialization format (bincode 2 through
//! serde). Moving to another serde format is a change to this file alone.

use crate::error::CodecError;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Appends the encoding of `value` to `out`. On failure `out` is restored to
/// its length before the call.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let len = out.len();
    match bincode::serde::encode_into_std_write(value, out, config()) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(len);
            Err(CodecError::new(e.to_string()))
        }
    }
}

/// Writes the encoding of `value` to `w`.
pub(crate) fn encode_to<T: Serialize + ?Sized, W: std::io::Write>(
    value: &T,
    w: &mut W,
) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, w, config())
        .map(|_| ())
        .map_err(|e| CodecError::new(e.to_string()))
}

/// Decodes one value from the front of `bytes`; returns it and the number of
/// bytes it took.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::new(e.to_string()))
}

/// [`decode`] (the same format: `config()` with a limit) for bytes a
/// worker wrote, which a hostile (sandboxed) worker
/// may have crafted: the length of a string or byte buffer is believed
/// only as far as `bytes` could hold it.
///
/// bincode allocates a byte buffer of the length it reads before it reads
/// the bytes, so a crafted length alone could make this process allocate
/// terabytes (and abort). Its limit counts what a decode claims: at most 16
/// bytes for each byte of input (a `u128` in one byte) and exactly the
/// bytes of each string, so a limit of 16 times the input never refuses a
/// well-formed value. The limit is a constant of the decoder's type: the
/// smallest of a few powers of two at or above that does, so a crafted
/// length is believed up to 64 times that at most (beyond 2^36 bytes,
/// there is no limit).
pub(crate) fn decode_untrusted<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, usize), CodecError> {
    let need = bytes.len().saturating_mul(16);
    macro_rules! within {
        ($($shift:literal),*) => {
            $(
                if need <= 1usize << $shift {
                    return bincode::serde::decode_from_slice(
                        bytes,
                        bincode::config::standard().with_limit::<{ 1usize << $shift }>(),
                    )
                    .map_err(|e| CodecError::new(e.to_string()));
                }
            )*
        };
    }
    within!(16, 22, 28, 32, 36);
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crafted_length_is_an_error_not_an_allocation() {
        // A string that claims 2^60 bytes, in 9 bytes of input.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_untrusted::<String>(&bytes).is_err());
        assert!(decode_untrusted::<serde_bytes::ByteBuf>(&bytes).is_err());
        // Well-formed values of every size still decode.
        for n in [0usize, 1, 1000, 1 << 20] {
            let mut out = Vec::new();
            let v = (vec![u128::MAX; 3], "x".repeat(n), vec![0u8; n]);
            encode_into(&v, &mut out).unwrap();
            let (back, used) = decode_untrusted::<(Vec<u128>, String, Vec<u8>)>(&out).unwrap();
            assert_eq!((back, used), (v, out.len()));
            let small = vec![1u128; n];
            out.clear();
            encode_into(&small, &mut out).unwrap();
            assert_eq!(decode_untrusted::<Vec<u128>>(&out).unwrap().0, small);
        }
    }
}
