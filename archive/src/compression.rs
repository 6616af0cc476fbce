//! Detecting and undoing the compression of a layer stream.
//!
//! Layers arrive as plain tar or compressed with gzip, zstd, xz or bzip2; the format is told by
//! the first bytes alone (as moby does). Decompression must happen in the trusted parent process,
//! never inside the confined apply (CVE-2014-9357): `chrootarchive` calls [`decompress`] before it
//! hands the plain tar to its child.

use std::io::{self, Read};

use crate::{Error, Result};

/// A compression format a layer stream may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (RFC 1952), magic `1f 8b 08`.
    Gzip,
    /// Zstandard, magic `28 b5 2f fd`.
    Zstd,
    /// xz, magic `fd 37 7a 58 5a 00`.
    Xz,
    /// bzip2, magic `42 5a 68` (`BZh`).
    Bzip2,
}

/// How many bytes [`decompress`] peeks before deciding: one tar header block.
const PEEK: usize = 512;

/// Tells the format of a stream from its first bytes.
///
/// Returns `Some(Compression::None)` for a tar stream (the `ustar` magic at offset 257, an
/// all-zero block, a header whose checksum is right, or an empty input), the compression format
/// for a known magic, and `None` when the bytes are neither. Pass at least 512 bytes when the
/// stream has that many: old (v7) tar headers are recognised by their checksum only.
pub fn detect_compression(first_bytes: &[u8]) -> Option<Compression> {
    let b = first_bytes;
    if b.starts_with(&[0x1f, 0x8b, 0x08]) {
        Some(Compression::Gzip)
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if b.starts_with(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) {
        Some(Compression::Xz)
    } else if b.starts_with(b"BZh") {
        Some(Compression::Bzip2)
    } else if looks_like_tar(b) {
        Some(Compression::None)
    } else {
        None
    }
}

/// Whether `b` starts like a tar stream.
fn looks_like_tar(b: &[u8]) -> bool {
    if b.is_empty() {
        return true;
    }
    if b.len() >= 262 && &b[257..262] == b"ustar" {
        return true;
    }
    if b.len() < PEEK {
        return false;
    }
    let block = &b[..PEEK];
    if block.iter().all(|&c| c == 0) {
        return true;
    }
    header_checksum_ok(block)
}

/// Whether the checksum field of a 512-byte header block matches its contents.
fn header_checksum_ok(block: &[u8]) -> bool {
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect();
    let text = text.trim();
    let Ok(stored) = u32::from_str_radix(text, 8) else {
        return false;
    };
    let sum: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|&c| u32::from(c))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    sum == stored
}

/// Wraps `reader` in the decompressor its first bytes call for.
///
/// The first bytes are peeked without being lost: the returned reader yields the whole
/// (decompressed) stream. Concatenated gzip, bzip2, xz and zstd members are all read. A plain tar
/// is passed through unchanged. Unknown bytes give [`Error::UnknownFormat`] showing them; a read
/// error while peeking gives [`Error::Io`].
///
/// `reader` need not be `Send` (no decoder reads on another thread); in exchange the returned
/// reader is not `Send` either: use it on the thread that made it.
pub fn decompress<'a>(reader: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut reader = reader;
    let mut head = Vec::with_capacity(PEEK);
    (&mut reader)
        .take(PEEK as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::io("read", "<layer stream>", e))?;
    let format = detect_compression(&head);
    let whole = io::Cursor::new(head.clone()).chain(reader);
    Ok(match format {
        Some(Compression::None) => Box::new(whole),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Some(Compression::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(whole)),
        Some(Compression::Xz) => Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
        Some(Compression::Zstd) => Box::new(
            zstd::stream::read::Decoder::new(whole)
                .map_err(|e| Error::io("zstd init", "<layer stream>", e))?,
        ),
        None => {
            head.truncate(8);
            return Err(Error::UnknownFormat { magic: head });
        }
    })
}
