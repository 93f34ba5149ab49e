//! PostgreSQL v3 wire protocol for pgsplit: framing, typed views of the few
//! messages the proxy reads, and builders for the messages it writes itself.
//!
//! # Layout
//! - [`frame`]: splits a byte stream into [`frame::Frame`]s without copying;
//!   a frame is the message exactly as it arrived (tag, length, body) held
//!   as a `Bytes` slice, so relaying it is a reference-count bump.
//! - [`startup`]: the untagged first packet (StartupMessage, SSLRequest,
//!   GSSENCRequest, CancelRequest), capped before authentication.
//! - [`tag`]: one named constant per message tag, per direction.
//! - [`frontend`] / [`backend`]: borrowed views of the messages the proxy
//!   must inspect (Query, Parse, Bind, … / ReadyForQuery, ErrorResponse, …).
//! - [`encode`]: builders for messages the proxy writes itself, appended to
//!   the caller's `BytesMut`.
//! - [`sqlstate`]: SQLSTATE codes the proxy emits.
//! - [`scram`] / [`md5`]: the server side of client authentication.
//!
//! Data flows one way: bytes → [`frame::decode`] → a `Frame` that is either
//! forwarded untouched or looked at through a view. Nothing here does I/O.
#![forbid(unsafe_code)]

pub mod backend;
pub mod encode;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod md5;
pub mod scram;
pub mod sqlstate;
pub mod startup;
pub mod tag;

pub use error::ProtoError;
pub use frame::{decode, decode_block, next_in, Frame};

/// PostgreSQL's own cap on the startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;

/// Default cap on any regular message after authentication (64 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How many cases a property test runs: `PROPTEST_CASES` when set (for a
/// longer fuzzing run on demand), otherwise the test's own `default`.
#[doc(hidden)]
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
