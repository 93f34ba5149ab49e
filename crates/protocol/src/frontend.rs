//! Borrowed views of the client messages the proxy must look into.
//!
//! Only the fields routing needs are decoded (statement text and names);
//! the frame itself is forwarded as received.

use crate::frame::Cursor;
use crate::ProtoError;

/// `Query`: one simple-protocol query string (may hold several statements).
pub fn query(body: &[u8]) -> Result<&str, ProtoError> {
    let mut c = Cursor::new(body, "Query");
    let sql = c.cstr()?;
    Ok(sql)
}

/// `Parse`: prepares `sql` as statement `name` ("" is the unnamed statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
}

impl<'a> Parse<'a> {
    /// Reads a Parse body (the message is named Parse, hence the name).
    ///
    /// # Errors
    /// `Malformed`/`Utf8` when the body is not a Parse message.
    #[allow(clippy::self_named_constructors)]
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body, "Parse");
        let name = c.cstr()?;
        let sql = c.cstr()?;
        let n = c.i16()?;
        if n < 0 || c.rest().len() != n as usize * 4 {
            return Err(ProtoError::Malformed { what: "Parse" });
        }
        Ok(Parse { name, sql })
    }
}

/// `Bind`: binds statement `statement` into portal `portal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
}

impl<'a> Bind<'a> {
    /// Decodes only the two names; parameters stay in the frame.
    ///
    /// # Errors
    /// `Malformed`/`Utf8` when the names are missing.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body, "Bind");
        let portal = c.cstr()?;
        let statement = c.cstr()?;
        Ok(Bind { portal, statement })
    }
}

/// One Bind parameter: text format or not, and its bytes (`None` for NULL).
pub type BindParam<'a> = (bool, Option<&'a [u8]>);

/// The parameter values of a Bind body: for each, whether it is in text
/// format and its bytes (`None` for NULL). Off the relay path: the server
/// reads them only for the rare statements it must replay.
///
/// # Errors
/// `Malformed` for a broken body.
pub fn bind_params(body: &[u8]) -> Result<Vec<BindParam<'_>>, ProtoError> {
    let mut c = Cursor::new(body, "Bind");
    c.cstr()?;
    c.cstr()?;
    let count = |v: i16| usize::try_from(v).map_err(|_| ProtoError::Malformed { what: "Bind" });
    let nformats = count(c.i16()?)?;
    let mut formats = Vec::with_capacity(nformats);
    for _ in 0..nformats {
        formats.push(c.i16()? == 0);
    }
    let n = count(c.i16()?)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let text = match formats.len() {
            0 => true,
            1 => formats[0],
            _ => formats.get(i).copied().unwrap_or(true),
        };
        let len = c.i32()?;
        let value = match usize::try_from(len) {
            Ok(len) => Some(c.take(len)?),
            Err(_) => None,
        };
        out.push((text, value));
    }
    Ok(out)
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object<'a> {
    Statement(&'a str),
    Portal(&'a str),
}

/// `Describe` and `Close` share a layout: a kind byte and a name.
///
/// # Errors
/// `Malformed` for an unknown kind byte or a missing terminator.
pub fn object<'a>(body: &'a [u8], what: &'static str) -> Result<Object<'a>, ProtoError> {
    let mut c = Cursor::new(body, what);
    let kind = c.u8()?;
    let name = c.cstr()?;
    match kind {
        b'S' => Ok(Object::Statement(name)),
        b'P' => Ok(Object::Portal(name)),
        _ => Err(ProtoError::Malformed { what }),
    }
}

/// `Execute`: runs portal `portal`.
///
/// # Errors
/// `Malformed`/`Utf8` for a broken body.
pub fn execute(body: &[u8]) -> Result<&str, ProtoError> {
    let mut c = Cursor::new(body, "Execute");
    let portal = c.cstr()?;
    c.i32()?;
    Ok(portal)
}

/// `PasswordMessage` (cleartext or md5 hash).
///
/// # Errors
/// `Malformed` for a missing terminator.
pub fn password(body: &[u8]) -> Result<&[u8], ProtoError> {
    Cursor::new(body, "PasswordMessage").cbytes()
}

/// `SASLInitialResponse`: the chosen mechanism and the client-first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitial<'a> {
    pub mechanism: &'a str,
    pub data: &'a [u8],
}

impl<'a> SaslInitial<'a> {
    /// # Errors
    /// `Malformed` when the declared data length does not match.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body, "SASLInitialResponse");
        let mechanism = c.cstr()?;
        let len = c.i32()?;
        let data = if len < 0 {
            &[][..]
        } else {
            c.take(len as usize)?
        };
        if !c.is_empty() {
            return Err(ProtoError::Malformed {
                what: "SASLInitialResponse",
            });
        }
        Ok(SaslInitial { mechanism, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_parameters_are_read_with_their_formats() {
        let mut b = bytes::BytesMut::new();
        crate::encode::bind(&mut b, "p", "s", &[Some(b"off"), None]);
        let body = &b[crate::frame::HEADER_BYTES..];
        let params = bind_params(body).unwrap();
        assert_eq!(params, vec![(true, Some(&b"off"[..])), (true, None)]);
        assert!(bind_params(&body[..body.len() - 5]).is_err());
    }
    use crate::{encode, frame::decode};
    use bytes::BytesMut;

    #[test]
    fn round_trips_extended_messages() {
        let mut w = BytesMut::new();
        encode::parse(&mut w, "s1", "SELECT $1", &[23]);
        encode::bind(&mut w, "p1", "s1", &[Some(b"42")]);
        encode::describe(&mut w, b'P', "p1");
        encode::execute(&mut w, "p1", 0);
        encode::close(&mut w, b'S', "s1");
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(
            Parse::parse(f.body()).unwrap(),
            Parse {
                name: "s1",
                sql: "SELECT $1"
            }
        );
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(
            Bind::parse(f.body()).unwrap(),
            Bind {
                portal: "p1",
                statement: "s1"
            }
        );
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(object(f.body(), "Describe").unwrap(), Object::Portal("p1"));
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(execute(f.body()).unwrap(), "p1");
        let f = decode(&mut w, 1 << 20).unwrap().unwrap();
        assert_eq!(object(f.body(), "Close").unwrap(), Object::Statement("s1"));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(query(b"no terminator").is_err());
        assert!(Parse::parse(b"s\0SELECT 1\0\0\x05").is_err());
        assert!(object(b"Xname\0", "Close").is_err());
        assert!(SaslInitial::parse(b"SCRAM-SHA-256\0\0\0\0\x10abc").is_err());
        assert!(query(b"\xff\xfe\0").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(2000)))]

        /// Every body decoder the proxy runs on client input answers
        /// arbitrary bytes with a value or an error, never a panic; a
        /// decoded value always lies inside the body.
        #[test]
        fn every_body_decoder_survives_arbitrary_bytes(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let inside = |s: &[u8]| {
                s.is_empty() || {
                    let (b, e) = (body.as_ptr() as usize, body.as_ptr() as usize + body.len());
                    let p = s.as_ptr() as usize;
                    p >= b && p + s.len() <= e
                }
            };
            if let Ok(q) = query(&body) {
                proptest::prop_assert!(inside(q.as_bytes()));
            }
            if let Ok(p) = Parse::parse(&body) {
                proptest::prop_assert!(inside(p.sql.as_bytes()) && inside(p.name.as_bytes()));
            }
            let _ = Bind::parse(&body);
            if let Ok(params) = bind_params(&body) {
                for (_, v) in params {
                    proptest::prop_assert!(v.is_none_or(inside));
                }
            }
            let _ = object(&body, "Describe");
            let _ = execute(&body);
            let _ = password(&body);
            if let Ok(s) = SaslInitial::parse(&body) {
                proptest::prop_assert!(inside(s.data));
            }
        }

        /// A well-formed Bind with its bytes cut short anywhere is an error,
        /// never parameters read past the end.
        #[test]
        fn a_truncated_bind_is_an_error(
            values in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)),
                0..6,
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut b = bytes::BytesMut::new();
            let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
            crate::encode::bind(&mut b, "p", "s", &refs);
            let body = &b[crate::frame::HEADER_BYTES..];
            let whole = bind_params(body).expect("a whole Bind decodes");
            proptest::prop_assert_eq!(whole.len(), values.len());
            let at = cut.index(body.len());
            if let Ok(params) = bind_params(&body[..at]) {
                // Only a cut inside the trailing result-format list can
                // still decode, and then the values are all there.
                proptest::prop_assert_eq!(params.len(), values.len());
            }
        }
    }
}
