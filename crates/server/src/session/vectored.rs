//! Progress through a list of `Bytes` written with vectored writes, which
//! may take any prefix of them: the relay hands the kernel its slices as they
//! are, never joined into a new buffer.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

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

/// Appends `next` to `out`, joined with the last entry when both are
/// consecutive slices of `block`: a batch that arrived in one read leaves
/// in one slice (a `send`, not a `writev` of one slice per message), still
/// without a copy.
pub(super) fn push_joined(out: &mut Vec<Bytes>, block: &Bytes, next: &Bytes) {
    let base = block.as_ptr() as usize;
    let start = next.as_ptr() as usize;
    if let Some(last) = out.last_mut() {
        let from = last.as_ptr() as usize;
        let end = start + next.len();
        if from >= base && from + last.len() == start && end <= base + block.len() {
            *last = block.slice(from - base..end - base);
            return;
        }
    }
    out.push(next.clone());
}

/// Empty slices to fill with [`Chunks::slices`].
pub(super) fn slice_array<'b>() -> [IoSlice<'b>; MAX_SLICES] {
    [IoSlice::new(&[]); MAX_SLICES]
}

/// Writes every chunk, in as few system calls as the socket allows.
pub(super) async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    s: &mut W,
    chunks: &[Bytes],
) -> std::io::Result<()> {
    if let [one] = chunks {
        // A plain `send`, cheaper in the kernel than `writev`.
        s.write_all(one).await?;
    } else {
        let mut todo = Chunks::new(chunks);
        while !todo.is_done() {
            let mut slices = slice_array();
            let n = todo.slices(&mut slices);
            let written = s.write_vectored(&slices[..n]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            todo.advance(written);
        }
    }
    // TLS holds what it encrypted until flushed; for TCP this is free.
    s.flush().await
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

    #[test]
    fn joins_consecutive_slices_of_one_block_only() {
        let block = Bytes::from(b"abcdefgh".to_vec());
        let other = Bytes::from(b"xy".to_vec());
        let mut out = Vec::new();
        push_joined(&mut out, &block, &block.slice(0..2));
        push_joined(&mut out, &block, &block.slice(2..5));
        assert_eq!(out, [Bytes::from_static(b"abcde")]);
        // A gap, another buffer, a static message: kept apart.
        push_joined(&mut out, &block, &block.slice(6..8));
        push_joined(&mut out, &block, &other);
        push_joined(&mut out, &block, &Bytes::from_static(b"S"));
        assert_eq!(out.len(), 4);
        // Slices of an older block are not joined with the current one.
        let mut out = vec![other.slice(0..1)];
        push_joined(&mut out, &block, &block.slice(0..1));
        assert_eq!(out.len(), 2);
    }
}
