//! The untagged first packet of a connection.
//!
//! Before authentication the peer is untrusted, so the packet is capped at
//! [`crate::MAX_STARTUP_PACKET_BYTES`] (PostgreSQL's own limit) and parsed
//! completely here; its handful of strings are owned because they live for
//! the whole session.

use bytes::{Buf, BytesMut};

use crate::frame::Cursor;
use crate::{ProtoError, MAX_STARTUP_PACKET_BYTES};

/// Request codes that share the version field.
pub mod code {
    pub const CANCEL_REQUEST: i32 = 80_877_102;
    pub const SSL_REQUEST: i32 = 80_877_103;
    pub const GSSENC_REQUEST: i32 = 80_877_104;
    /// Protocol 3.0, the only version spoken.
    pub const PROTOCOL_3_0: i32 = 3 << 16;
}

/// What a client can open a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Asks for TLS; answered `N` until TLS is configured.
    SslRequest,
    /// Asks for GSSAPI encryption; always answered `N`.
    GssEncRequest,
    /// Cancels the statement running on the session with this key.
    Cancel { pid: i32, secret: i32 },
    /// A protocol 3.x session.
    Startup(Startup),
}

/// A StartupMessage of protocol 3.x.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Minor version the client asked for; above 0 gets NegotiateProtocolVersion.
    pub minor: u16,
    /// Parameters in the order sent, except `_pq_.` protocol options.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; none are supported.
    pub protocol_options: Vec<String>,
}

impl Startup {
    /// Looks a parameter up by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The user name (required by the protocol).
    pub fn user(&self) -> Option<&str> {
        self.param("user").filter(|u| !u.is_empty())
    }

    /// The database, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> Option<&str> {
        self.param("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }
}

/// Splits one startup packet off `buf`.
///
/// # Errors
/// `BadLength` for a length outside 8..=10 000, `UnsupportedProtocol` for a
/// major version other than 3, `Malformed`/`Utf8` for a broken body.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_PACKET_BYTES as i32).contains(&len) {
        return Err(ProtoError::BadLength {
            len: i64::from(len),
            max: MAX_STARTUP_PACKET_BYTES,
        });
    }
    let len = len as usize;
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut body = &packet[4..];
    let version = body.get_i32();
    let packet = match version {
        code::SSL_REQUEST if body.is_empty() => StartupPacket::SslRequest,
        code::GSSENC_REQUEST if body.is_empty() => StartupPacket::GssEncRequest,
        code::CANCEL_REQUEST if body.len() == 8 => {
            let pid = body.get_i32();
            let secret = body.get_i32();
            StartupPacket::Cancel { pid, secret }
        }
        code::SSL_REQUEST | code::GSSENC_REQUEST | code::CANCEL_REQUEST => {
            return Err(ProtoError::Malformed { what: "startup" })
        }
        v => {
            let (major, minor) = ((v >> 16) as u16, (v & 0xffff) as u16);
            if major != 3 {
                return Err(ProtoError::UnsupportedProtocol { major, minor });
            }
            StartupPacket::Startup(parse_params(body, minor)?)
        }
    };
    Ok(Some(packet))
}

fn parse_params(body: &[u8], minor: u16) -> Result<Startup, ProtoError> {
    let mut cur = Cursor::new(body, "startup");
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let key = cur.cstr()?;
        if key.is_empty() {
            break;
        }
        let value = cur.cstr()?;
        if key.starts_with("_pq_.") {
            protocol_options.push(key.to_owned());
        } else {
            params.push((key.to_owned(), value.to_owned()));
        }
    }
    if !cur.is_empty() {
        return Err(ProtoError::Malformed { what: "startup" });
    }
    Ok(Startup {
        minor,
        params,
        protocol_options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use proptest::prelude::*;

    fn packet(version: i32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn parses_startup_with_params() {
        let mut buf = BytesMut::new();
        encode::startup_message(
            &mut buf,
            &[("user", "app"), ("database", "db"), ("_pq_.x", "1")],
        );
        let StartupPacket::Startup(s) = decode_startup(&mut buf).unwrap().unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(s.user(), Some("app"));
        assert_eq!(s.database(), Some("db"));
        assert_eq!(s.protocol_options, vec!["_pq_.x".to_owned()]);
        assert_eq!(s.minor, 0);
        assert!(buf.is_empty());
    }

    #[test]
    fn database_defaults_to_user() {
        let mut buf = packet(code::PROTOCOL_3_0, b"user\0bob\0\0");
        let Some(StartupPacket::Startup(s)) = decode_startup(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(s.database(), Some("bob"));
    }

    #[test]
    fn requests_and_cancel() {
        let mut b = packet(code::SSL_REQUEST, b"");
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut b = packet(code::GSSENC_REQUEST, b"");
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
        let mut body = Vec::new();
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(&9i32.to_be_bytes());
        let mut b = packet(code::CANCEL_REQUEST, &body);
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::Cancel { pid: 7, secret: 9 })
        );
    }

    #[test]
    fn rejects_bad_versions_and_lengths() {
        let mut b = packet(2 << 16, b"user\0x\0\0");
        assert_eq!(
            decode_startup(&mut b).unwrap_err(),
            ProtoError::UnsupportedProtocol { major: 2, minor: 0 }
        );
        let mut b = BytesMut::from(&20_000i32.to_be_bytes()[..]);
        assert!(matches!(
            decode_startup(&mut b),
            Err(ProtoError::BadLength { .. })
        ));
        let mut b = BytesMut::from(&4i32.to_be_bytes()[..]);
        assert!(decode_startup(&mut b).is_err());
        let mut b = packet(code::PROTOCOL_3_0, b"user\0x");
        assert!(decode_startup(&mut b).is_err());
    }

    #[test]
    fn newer_minor_is_reported() {
        let mut b = packet((3 << 16) | 2, b"user\0x\0\0");
        let Some(StartupPacket::Startup(s)) = decode_startup(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(s.minor, 2);
    }

    proptest! {
        #[test]
        fn arbitrary_startup_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode_startup(&mut buf);
        }
    }
}
