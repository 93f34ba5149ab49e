//! Builders for the messages the proxy writes itself (its handshake, its own
//! errors, protocol negotiation) and, for tests and the backend login, a few
//! frontend messages. Each appends to the caller's `BytesMut` and
//! back-patches the length; nothing is built in a temporary.

use bytes::{BufMut, BytesMut};

use crate::backend::TxStatus;
use crate::tag::{backend as b, frontend as f};

/// Severity of an ErrorResponse/NoticeResponse the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Warning,
    Notice,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
        }
    }
}

/// Writes `tag`, a length placeholder, the body from `body`, then the length.
#[inline]
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(buf: &mut BytesMut, sev: Severity, code: &str, msg: &str) {
    fields(buf, b::ERROR_RESPONSE, sev, code, msg, None);
}

/// ErrorResponse with a DETAIL or HINT line as well.
pub fn error_response_hint(buf: &mut BytesMut, sev: Severity, code: &str, msg: &str, hint: &str) {
    fields(buf, b::ERROR_RESPONSE, sev, code, msg, Some(hint));
}

/// NoticeResponse (WARNING/NOTICE).
pub fn notice_response(buf: &mut BytesMut, sev: Severity, code: &str, msg: &str) {
    fields(buf, b::NOTICE_RESPONSE, sev, code, msg, None);
}

fn fields(buf: &mut BytesMut, tag: u8, sev: Severity, code: &str, msg: &str, hint: Option<&str>) {
    message(buf, tag, |w| {
        w.put_u8(b'S');
        cstr(w, sev.as_str().as_bytes());
        w.put_u8(b'V');
        cstr(w, sev.as_str().as_bytes());
        w.put_u8(b'C');
        cstr(w, code.as_bytes());
        w.put_u8(b'M');
        cstr(w, msg.as_bytes());
        if let Some(h) = hint {
            w.put_u8(b'H');
            cstr(w, h.as_bytes());
        }
        w.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, b::READY_FOR_QUERY, |w| w.put_u8(status.byte()));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b::PARAMETER_STATUS, |w| {
        cstr(w, name.as_bytes());
        cstr(w, value.as_bytes());
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    message(buf, b::BACKEND_KEY_DATA, |w| {
        w.put_i32(pid);
        w.put_i32(secret);
    });
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b::AUTHENTICATION, |w| w.put_i32(0));
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, b::AUTHENTICATION, |w| w.put_i32(3));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b::AUTHENTICATION, |w| {
        w.put_i32(5);
        w.put_slice(&salt);
    });
}

/// AuthenticationSASL offering SCRAM-SHA-256.
pub fn auth_sasl(buf: &mut BytesMut) {
    message(buf, b::AUTHENTICATION, |w| {
        w.put_i32(10);
        cstr(w, b"SCRAM-SHA-256");
        w.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b::AUTHENTICATION, |w| {
        w.put_i32(11);
        w.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b::AUTHENTICATION, |w| {
        w.put_i32(12);
        w.put_slice(data);
    });
}

/// NegotiateProtocolVersion: newest minor supported, unrecognized options.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: &[String]) {
    message(buf, b::NEGOTIATE_PROTOCOL_VERSION, |w| {
        w.put_i32((3 << 16) | minor);
        w.put_i32(unsupported.len() as i32);
        for o in unsupported {
            cstr(w, o.as_bytes());
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b::COMMAND_COMPLETE, |w| cstr(w, tag.as_bytes()));
}

pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b::PARSE_COMPLETE, |_| {});
}

pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b::EMPTY_QUERY_RESPONSE, |_| {});
}

/// RowDescription of text columns.
pub fn row_description_text(buf: &mut BytesMut, columns: &[&str]) {
    message(buf, b::ROW_DESCRIPTION, |w| {
        w.put_i16(columns.len() as i16);
        for c in columns {
            cstr(w, c.as_bytes());
            w.put_i32(0); // table oid
            w.put_i16(0); // column number
            w.put_i32(25); // text
            w.put_i16(-1);
            w.put_i32(-1);
            w.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (`None` is NULL).
pub fn data_row_text(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b::DATA_ROW, |w| {
        w.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    w.put_i32(v.len() as i32);
                    w.put_slice(v.as_bytes());
                }
                None => w.put_i32(-1),
            }
        }
    });
}

// ---- frontend messages (backend login, tests, replays) ----

/// StartupMessage for protocol 3.0.
pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_i32(crate::startup::code::PROTOCOL_3_0);
    for (k, v) in params {
        cstr(buf, k.as_bytes());
        cstr(buf, v.as_bytes());
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// CancelRequest packet.
pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_i32(crate::startup::code::CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

pub fn password_message(buf: &mut BytesMut, password: &[u8]) {
    message(buf, f::PASSWORD, |w| cstr(w, password));
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, f::PASSWORD, |w| {
        cstr(w, mechanism.as_bytes());
        w.put_i32(data.len() as i32);
        w.put_slice(data);
    });
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, f::PASSWORD, |w| w.put_slice(data));
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, f::QUERY, |w| cstr(w, sql.as_bytes()));
}

pub fn parse(buf: &mut BytesMut, name: &str, sql: &str, types: &[u32]) {
    message(buf, f::PARSE, |w| {
        cstr(w, name.as_bytes());
        cstr(w, sql.as_bytes());
        w.put_i16(types.len() as i16);
        for t in types {
            w.put_u32(*t);
        }
    });
}

/// Bind with text parameters and text results.
pub fn bind(buf: &mut BytesMut, portal: &str, statement: &str, params: &[Option<&[u8]>]) {
    message(buf, f::BIND, |w| {
        cstr(w, portal.as_bytes());
        cstr(w, statement.as_bytes());
        w.put_i16(0);
        w.put_i16(params.len() as i16);
        for p in params {
            match p {
                Some(v) => {
                    w.put_i32(v.len() as i32);
                    w.put_slice(v);
                }
                None => w.put_i32(-1),
            }
        }
        w.put_i16(0);
    });
}

pub fn describe(buf: &mut BytesMut, kind: u8, name: &str) {
    message(buf, f::DESCRIBE, |w| {
        w.put_u8(kind);
        cstr(w, name.as_bytes());
    });
}

pub fn close(buf: &mut BytesMut, kind: u8, name: &str) {
    message(buf, f::CLOSE, |w| {
        w.put_u8(kind);
        cstr(w, name.as_bytes());
    });
}

pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: i32) {
    message(buf, f::EXECUTE, |w| {
        cstr(w, portal.as_bytes());
        w.put_i32(max_rows);
    });
}

pub fn sync(buf: &mut BytesMut) {
    message(buf, f::SYNC, |_| {});
}

pub fn flush(buf: &mut BytesMut) {
    message(buf, f::FLUSH, |_| {});
}

pub fn terminate(buf: &mut BytesMut) {
    message(buf, f::TERMINATE, |_| {});
}
