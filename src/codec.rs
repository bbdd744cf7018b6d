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
