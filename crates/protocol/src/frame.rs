//! Zero-copy framing of tagged messages (everything after the startup packet,
//! in both directions).
//!
//! A [`Frame`] is the message exactly as it arrived, split off the read
//! buffer with `split_to(..).freeze()`: forwarding it writes the same bytes
//! without a copy or a re-encode. The length is checked against the cap
//! *before* any memory is reserved for the body.

use bytes::{Bytes, BytesMut};

use crate::ProtoError;

/// Size of the tag byte plus the length word.
pub const HEADER_BYTES: usize = 5;

/// One whole tagged message: `tag`, `i32` length (which counts itself), body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Wraps bytes that hold exactly one message. Used by tests and by code
    /// that builds a message and wants to treat it like a received one.
    ///
    /// # Errors
    /// `Malformed` when `raw` is not exactly one well-formed message.
    pub fn from_bytes(raw: Bytes) -> Result<Frame, ProtoError> {
        if raw.len() < HEADER_BYTES {
            return Err(ProtoError::Malformed { what: "frame" });
        }
        let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
        if len + 1 != raw.len() {
            return Err(ProtoError::Malformed { what: "frame" });
        }
        Ok(Frame { raw })
    }

    /// The message tag (see [`crate::tag`]).
    #[inline]
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body, after the length word.
    #[inline]
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_BYTES..]
    }

    /// The whole message as received (tag, length, body).
    #[inline]
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Gives up the frame's bytes, for writing them on.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.raw
    }

    /// Total size on the wire.
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.raw.len()
    }
}

/// Peeks at the header of the next message: `(tag, total bytes on the wire)`.
///
/// # Errors
/// `BadLength` when the length word is below 4 or above `max`.
#[inline]
pub fn peek(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtoError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max {
        return Err(ProtoError::BadLength {
            len: i64::from(len),
            max,
        });
    }
    Ok(Some((buf[0], 1 + len as usize)))
}

/// Splits the next whole message off `buf`.
///
/// Returns `Ok(None)` when more bytes are needed; in that case it reserves
/// exactly the missing space (the length was already checked against `max`).
///
/// # Errors
/// `BadLength` when the length word is invalid; the connection should be
/// closed with FATAL `08P01`.
#[inline]
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtoError> {
    let Some((_, total)) = peek(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// Splits every whole message at the front of `buf` off as one block, to be
/// cut into frames with [`next_in`]. The frames of one block are slices of
/// one buffer, so consecutive ones can be forwarded as one slice again.
///
/// Returns `Ok(None)` when not even one message is whole (reserving the
/// missing space, as [`decode`] does). A bad length word after a whole
/// message ends the block there; the next call reports it.
///
/// # Errors
/// `BadLength` when the first message's length word is invalid.
pub fn decode_block(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, ProtoError> {
    let mut at = 0;
    loop {
        match peek(&buf[at..], max) {
            Ok(Some((_, total))) if buf.len() - at >= total => at += total,
            Ok(Some((_, total))) if at == 0 => {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            Err(e) if at == 0 => return Err(e),
            _ => break,
        }
    }
    Ok((at > 0).then(|| buf.split_to(at).freeze()))
}

/// Cuts the next message off a block made by [`decode_block`].
#[inline]
pub fn next_in(block: &mut Bytes) -> Option<Frame> {
    if block.len() < HEADER_BYTES {
        return None;
    }
    let len = u32::from_be_bytes([block[1], block[2], block[3], block[4]]) as usize;
    (block.len() > len).then(|| Frame {
        raw: block.split_to(len + 1),
    })
}

/// Position of the first NUL in `b`. Most strings in a message are names,
/// and most names are empty: that case skips the vectorised search and its
/// fixed cost.
#[inline]
fn nul(b: &[u8]) -> Option<usize> {
    match b.first() {
        Some(0) => Some(0),
        _ => memchr::memchr(0, b),
    }
}

/// Reads NUL-terminated strings out of a body, front to back.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    pub(crate) fn cstr(&mut self) -> Result<&'a str, ProtoError> {
        let bytes = self.cbytes()?;
        if bytes.is_empty() {
            return Ok("");
        }
        std::str::from_utf8(bytes).map_err(|_| ProtoError::Utf8 { what: self.what })
    }

    pub(crate) fn cbytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let end = nul(self.buf).ok_or(ProtoError::Malformed { what: self.what })?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = &rest[1..];
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtoError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(ProtoError::Malformed { what: self.what })?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, ProtoError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ProtoError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Malformed { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use proptest::prelude::*;

    #[test]
    fn splits_whole_frames_and_waits_for_partial() {
        let mut wire = BytesMut::new();
        encode::query(&mut wire, "SELECT 1");
        encode::sync(&mut wire);
        let whole = wire.clone();
        let mut buf = BytesMut::from(&whole[..3]);
        assert_eq!(decode(&mut buf, 1024).unwrap(), None);
        buf.extend_from_slice(&whole[3..]);
        let q = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(q.tag(), crate::tag::frontend::QUERY);
        assert_eq!(q.body(), b"SELECT 1\0");
        let s = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(s.tag(), crate::tag::frontend::SYNC);
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, 1024).unwrap(), None);
    }

    #[test]
    fn rejects_lengths_before_reserving() {
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        let err = decode(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, ProtoError::BadLength { .. }));
        assert!(buf.capacity() < 1 << 20, "no memory sized from the wire");
        let mut neg = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(decode(&mut neg, 1 << 20).is_err());
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(decode(&mut short, 1 << 20).is_err());
    }

    #[test]
    fn frame_bytes_are_the_received_bytes() {
        let mut wire = BytesMut::new();
        encode::query(&mut wire, "SELECT 'x'");
        let copy = wire.clone().freeze();
        let f = decode(&mut wire, 1024).unwrap().unwrap();
        assert_eq!(f.raw(), &copy);
        assert_eq!(Frame::from_bytes(copy).unwrap(), f);
    }

    #[test]
    fn a_block_holds_the_whole_frames_and_stops_at_a_bad_length() {
        let mut wire = BytesMut::new();
        encode::query(&mut wire, "SELECT 1");
        encode::sync(&mut wire);
        let two = wire.len();
        wire.extend_from_slice(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
        let mut block = decode_block(&mut wire, 1024).unwrap().unwrap();
        assert_eq!(block.len(), two);
        let q = next_in(&mut block).unwrap();
        assert_eq!(q.body(), b"SELECT 1\0");
        assert_eq!(
            next_in(&mut block).unwrap().tag(),
            crate::tag::frontend::SYNC
        );
        assert!(next_in(&mut block).is_none());
        assert!(matches!(
            decode_block(&mut wire, 1024),
            Err(ProtoError::BadLength { .. })
        ));
    }

    #[test]
    fn a_block_waits_for_its_first_whole_frame() {
        let mut wire = BytesMut::new();
        encode::query(&mut wire, "SELECT 1");
        let mut buf = BytesMut::from(&wire[..7]);
        assert_eq!(decode_block(&mut buf, 1024).unwrap(), None);
        assert!(buf.capacity() >= wire.len(), "the rest is reserved");
        buf.extend_from_slice(&wire[7..]);
        let block = decode_block(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&block[..], &wire[..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(2000)))]
        /// Blocks cut into the same frames as one-by-one decoding.
        #[test]
        fn blocks_cut_like_single_frames(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut one = BytesMut::from(&data[..]);
            let mut singles = Vec::new();
            while let Ok(Some(f)) = decode(&mut one, 256) {
                singles.push(f);
            }
            let mut buf = BytesMut::from(&data[..]);
            let mut cut = Vec::new();
            while let Ok(Some(mut block)) = decode_block(&mut buf, 256) {
                while let Some(f) = next_in(&mut block) {
                    cut.push(f);
                }
                prop_assert!(block.is_empty());
            }
            prop_assert_eq!(singles, cut);
        }

        /// Arbitrary bytes never panic the framer, and whatever it splits off
        /// re-assembles to the input prefix it consumed.
        #[test]
        fn the_first_nul_is_found_at_any_position(
            data in proptest::collection::vec(1u8.., 0..80),
            at in proptest::option::of(0usize..80),
        ) {
            let mut data = data;
            if let Some(at) = at.filter(|a| *a <= data.len()) {
                data.insert(at, 0);
            }
            prop_assert_eq!(nul(&data), data.iter().position(|&c| c == 0));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut out = Vec::new();
            while let Ok(Some(f)) = decode(&mut buf, 256) {
                prop_assert!(f.len() >= HEADER_BYTES && f.len() <= 257);
                out.extend_from_slice(f.raw());
            }
            prop_assert_eq!(&data[..out.len()], &out[..]);
        }
    }
}
