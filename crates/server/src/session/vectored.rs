//! Progress through a list of `Bytes` written with vectored writes, which
//! may take any prefix of them: the relay hands the kernel its slices as they
//! are, never joined into a new buffer.

use std::io::IoSlice;

use bytes::Bytes;

/// At most this many slices go into one write.
const MAX_SLICES: usize = 32;

/// The part of `chunks` not yet written.
pub(super) struct Chunks<'a> {
    chunks: &'a [Bytes],
    i: usize,
    off: usize,
}

impl<'a> Chunks<'a> {
    pub fn new(chunks: &'a [Bytes]) -> Self {
        Chunks {
            chunks,
            i: 0,
            off: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.i >= self.chunks.len()
    }

    /// Fills `out` with the next slices; returns how many.
    pub fn slices<'b>(&'b self, out: &mut [IoSlice<'b>; MAX_SLICES]) -> usize {
        let rest = &self.chunks[self.i..];
        let n = rest.len().min(MAX_SLICES);
        for (k, c) in rest[..n].iter().enumerate() {
            out[k] = IoSlice::new(if k == 0 { &c[self.off..] } else { &c[..] });
        }
        n
    }

    /// Records that `written` more bytes went out.
    pub fn advance(&mut self, mut written: usize) {
        while written > 0 && self.i < self.chunks.len() {
            let left = self.chunks[self.i].len() - self.off;
            if written >= left {
                written -= left;
                self.i += 1;
                self.off = 0;
            } else {
                self.off += written;
                written = 0;
            }
        }
    }
}

/// Empty slices to fill with [`Chunks::slices`].
pub(super) fn slice_array<'b>() -> [IoSlice<'b>; MAX_SLICES] {
    [IoSlice::new(&[]); MAX_SLICES]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_across_chunk_boundaries() {
        let chunks = [
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"f"),
        ];
        let mut c = Chunks::new(&chunks);
        c.advance(4);
        let mut out = slice_array();
        let n = c.slices(&mut out);
        assert_eq!(n, 2);
        assert_eq!(&*out[0], b"e");
        assert_eq!(&*out[1], b"f");
        c.advance(2);
        assert!(c.is_done());
    }
}
