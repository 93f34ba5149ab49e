//! Errors from decoding the wire protocol. "Need more bytes" is never an
//! error: decoders return `Ok(None)` for that.

/// A protocol violation found while decoding. Every variant is the peer's
/// fault; the server answers it with FATAL `08P01` and closes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The length field is below the minimum or above the configured cap.
    #[error("invalid message length {len} (maximum {max})")]
    BadLength { len: i64, max: usize },
    /// The startup packet is not one the proxy knows.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    /// A message body is shorter than its fields or lacks a terminator.
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    /// A string field is not valid UTF-8.
    #[error("invalid UTF-8 in {what} message")]
    Utf8 { what: &'static str },
}
