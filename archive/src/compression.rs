//! Detecting and undoing the compression of a layer stream.
//!
//! Layers arrive as plain tar or compressed with gzip, zstd, xz or bzip2; the format is told by
//! the first bytes alone (as moby does). Decompression must happen in the trusted parent process,
//! never inside the confined apply (CVE-2014-9357): `chrootarchive` calls [`decompress`] before it
//! hands the plain tar to its child.

use std::io::{self, Read, Write};

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
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) || is_zstd_skippable(b) {
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

/// Whether `b` starts with a zstd skippable frame (magic `0x184D2A50`–`0x184D2A5F`, little
/// endian), which the zstd decoder steps over; some writers put metadata there.
fn is_zstd_skippable(b: &[u8]) -> bool {
    b.len() >= 4 && b[0] & 0xf0 == 0x50 && b[1..4] == [0x2a, 0x4d, 0x18]
}

/// The most memory the xz decoder may use. `xz -9` needs 65 MiB to decode; a stream asking for
/// more (a crafted 1 GiB dictionary in a 164 KiB file) is refused instead of allocated.
pub const XZ_MEMORY_LIMIT: u64 = 256 << 20;

/// Turns liblzma's bare "memory limit reached" into an error that says what happened.
struct XzLimited<R>(R);

impl<R: Read> Read for XzLimited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.to_string().contains("memory limit") {
                io::Error::other(format!(
                    "xz stream needs more than {} MiB of memory to decode (a dictionary that large is refused)",
                    XZ_MEMORY_LIMIT >> 20
                ))
            } else {
                e
            }
        })
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

/// Whether the checksum field of a 512-byte header block matches its contents (signed or
/// unsigned sum, as the reader accepts).
fn header_checksum_ok(block: &[u8]) -> bool {
    <&[u8; 512]>::try_from(block).is_ok_and(crate::apply::header_checksum_matches)
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
        .map_err(|e| Error::Stream {
            op: "read".into(),
            source: e,
        })?;
    let format = detect_compression(&head);
    let whole = io::Cursor::new(head.clone()).chain(reader);
    Ok(match format {
        Some(Compression::None) => Box::new(whole),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Some(Compression::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(whole)),
        Some(Compression::Xz) => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMORY_LIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(|e| Error::Stream {
                op: "start the xz decoder".into(),
                source: e.into(),
            })?;
            Box::new(XzLimited(liblzma::read::XzDecoder::new_stream(
                whole, stream,
            )))
        }
        Some(Compression::Zstd) => Box::new(zstd::stream::read::Decoder::new(whole).map_err(
            |e| Error::Stream {
                op: "start the zstd decoder".into(),
                source: e,
            },
        )?),
        None => {
            head.truncate(8);
            return Err(Error::UnknownFormat { magic: head });
        }
    })
}

/// A writer that compresses what it is given in one [`Compression`] format (the other direction
/// of [`decompress`]), for writing layer blobs (`graphctl diff --compress`).
///
/// Call [`Encoder::finish`] at the end: it writes the format's trailer and returns the inner
/// writer. Dropping an encoder without `finish` may leave a truncated stream.
pub struct Encoder<W: Write> {
    inner: EncoderKind<W>,
}

/// The encoder of each format.
enum EncoderKind<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    /// Starts a stream in `format` written to `writer`, at each format's default level (gzip 6,
    /// zstd 3, xz 6, bzip2 9). [`Compression::None`] passes the bytes through unchanged.
    pub fn new(writer: W, format: Compression) -> Result<Encoder<W>> {
        let inner = match format {
            Compression::None => EncoderKind::None(writer),
            Compression::Gzip => EncoderKind::Gzip(flate2::write::GzEncoder::new(
                writer,
                flate2::Compression::default(),
            )),
            Compression::Zstd => EncoderKind::Zstd(
                zstd::stream::write::Encoder::new(writer, zstd::DEFAULT_COMPRESSION_LEVEL)
                    .map_err(|e| Error::Stream {
                        op: "start the zstd encoder".into(),
                        source: e,
                    })?,
            ),
            Compression::Xz => EncoderKind::Xz(liblzma::write::XzEncoder::new(writer, 6)),
            Compression::Bzip2 => EncoderKind::Bzip2(bzip2::write::BzEncoder::new(
                writer,
                bzip2::Compression::best(),
            )),
        };
        Ok(Encoder { inner })
    }

    /// Ends the stream (writes the format's trailer, flushes) and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self.inner {
            EncoderKind::None(mut w) => {
                w.flush()?;
                Ok(w)
            }
            EncoderKind::Gzip(e) => e.finish(),
            EncoderKind::Zstd(e) => e.finish(),
            EncoderKind::Xz(e) => e.finish(),
            EncoderKind::Bzip2(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            EncoderKind::None(w) => w.write(buf),
            EncoderKind::Gzip(e) => e.write(buf),
            EncoderKind::Zstd(e) => e.write(buf),
            EncoderKind::Xz(e) => e.write(buf),
            EncoderKind::Bzip2(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            EncoderKind::None(w) => w.flush(),
            EncoderKind::Gzip(e) => e.flush(),
            EncoderKind::Zstd(e) => e.flush(),
            EncoderKind::Xz(e) => e.flush(),
            EncoderKind::Bzip2(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod encoder_tests {
    use super::*;

    /// Every format's encoder writes a stream that [`detect_compression`] names as that format
    /// and [`decompress`] turns back into the same bytes.
    #[test]
    fn every_format_round_trips_through_decompress() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        // A tar-looking start, so that `Compression::None` is detected as a tar.
        let mut plain = vec![0u8; 512];
        plain.extend_from_slice(&data);
        for format in [
            Compression::None,
            Compression::Gzip,
            Compression::Zstd,
            Compression::Xz,
            Compression::Bzip2,
        ] {
            let mut enc = Encoder::new(Vec::new(), format).unwrap();
            enc.write_all(&plain).unwrap();
            let blob = enc.finish().unwrap();
            assert_eq!(detect_compression(&blob), Some(format), "{format:?}");
            let mut back = Vec::new();
            decompress(&blob[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert!(
                back == plain,
                "{format:?}: the round trip changed the bytes"
            );
        }
    }
}
