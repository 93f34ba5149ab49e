//! Borrowed views of the server messages the proxy must look into:
//! ReadyForQuery (transaction status), ErrorResponse/NoticeResponse fields,
//! ParameterStatus, BackendKeyData and Authentication requests.

use crate::frame::Cursor;
use crate::ProtoError;

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// `ReadyForQuery` body → transaction status.
///
/// # Errors
/// `Malformed` for an unknown status byte.
pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, ProtoError> {
    match body {
        [b'I'] => Ok(TxStatus::Idle),
        [b'T'] => Ok(TxStatus::InBlock),
        [b'E'] => Ok(TxStatus::Failed),
        _ => Err(ProtoError::Malformed {
            what: "ReadyForQuery",
        }),
    }
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorFields<'a> {
    /// Non-localized severity (`V`), falling back to `S`.
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

impl<'a> ErrorFields<'a> {
    /// # Errors
    /// `Malformed` when a field is not terminated.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body, "ErrorResponse");
        let mut out = ErrorFields::default();
        let mut localized = "";
        loop {
            let t = c.u8()?;
            if t == 0 {
                break;
            }
            let v = c.cstr()?;
            match t {
                b'S' => localized = v,
                b'V' => out.severity = v,
                b'C' => out.code = v,
                b'M' => out.message = v,
                _ => {}
            }
        }
        if out.severity.is_empty() {
            out.severity = localized;
        }
        Ok(out)
    }

    /// FATAL or PANIC: the server closes the connection after this.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity, "FATAL" | "PANIC")
    }
}

/// `ParameterStatus` body → (name, value).
///
/// # Errors
/// `Malformed`/`Utf8` for a broken body.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtoError> {
    let mut c = Cursor::new(body, "ParameterStatus");
    Ok((c.cstr()?, c.cstr()?))
}

/// `BackendKeyData` body → (pid, secret).
///
/// # Errors
/// `Malformed` when the body is not 8 bytes.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtoError> {
    let mut c = Cursor::new(body, "BackendKeyData");
    let pid = c.i32()?;
    let secret = c.i32()?;
    Ok((pid, secret))
}

/// An authentication request from a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth<'a> {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: &'a [u8],
    },
    SaslContinue {
        data: &'a [u8],
    },
    SaslFinal {
        data: &'a [u8],
    },
    /// Kerberos, GSS, SSPI and others the proxy cannot answer.
    Unsupported(i32),
}

/// Authentication request codes.
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// `Authentication*` body → request.
///
/// # Errors
/// `Malformed` for a truncated body.
pub fn authentication(body: &[u8]) -> Result<Auth<'_>, ProtoError> {
    let mut c = Cursor::new(body, "Authentication");
    let code = c.i32()?;
    Ok(match code {
        auth_code::OK => Auth::Ok,
        auth_code::CLEARTEXT => Auth::Cleartext,
        auth_code::MD5 => {
            let s = c.take(4)?;
            Auth::Md5 {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        auth_code::SASL => Auth::Sasl {
            mechanisms: c.rest(),
        },
        auth_code::SASL_CONTINUE => Auth::SaslContinue { data: c.rest() },
        auth_code::SASL_FINAL => Auth::SaslFinal { data: c.rest() },
        other => Auth::Unsupported(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, frame::decode, sqlstate, tag};
    use bytes::BytesMut;

    #[test]
    fn round_trips_what_the_proxy_writes() {
        let mut w = BytesMut::new();
        encode::error_response(
            &mut w,
            encode::Severity::Fatal,
            sqlstate::PROTOCOL_VIOLATION,
            "bad",
        );
        encode::parameter_status(&mut w, "server_version", "15.4");
        encode::backend_key_data(&mut w, 12, -5);
        encode::ready_for_query(&mut w, TxStatus::InBlock);
        encode::auth_md5(&mut w, [1, 2, 3, 4]);
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), tag::backend::ERROR_RESPONSE);
        let e = ErrorFields::parse(f.body()).unwrap();
        assert_eq!((e.severity, e.code, e.message), ("FATAL", "08P01", "bad"));
        assert!(e.is_fatal());
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(
            parameter_status(f.body()).unwrap(),
            ("server_version", "15.4")
        );
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(backend_key_data(f.body()).unwrap(), (12, -5));
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(ready_for_query(f.body()).unwrap(), TxStatus::InBlock);
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(
            authentication(f.body()).unwrap(),
            Auth::Md5 { salt: [1, 2, 3, 4] }
        );
    }
}
