//! An index of an image tar (entry name to data offset and size, links to their targets), read
//! header by header with bounded memory.
//!
//! Only headers are read: member data is skipped by seeking. GNU long names (`L`, `K`) and PAX
//! records (`x`, `X`) are read up to [`MAX_EXTENDED`] bytes each; a larger one is refused with an
//! error naming its offset, so a few KiB of input can never make the index buffer gigabytes.
//! Names of all entries together are limited to [`MAX_NAME_BYTES`], entries to
//! [`MAX_ENTRIES`]. Header fields are read as Go's `archive/tar` reads them: numbers may be
//! octal with spaces or NULs around them, empty (0) or base-256; header-only types (links,
//! directories, devices, FIFOs) carry no data whatever their size field says; the ustar prefix
//! is used whenever the magic is `ustar\0`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use crate::error::{Error, Result, TarProblem};

/// The largest GNU long name or PAX extended header read (the layer reader's limit too).
pub const MAX_EXTENDED: u64 = 1 << 20;
/// The most entries indexed.
pub const MAX_ENTRIES: usize = 1_000_000;
/// The most bytes of names (and link targets) kept for all entries together.
pub const MAX_NAME_BYTES: usize = 64 << 20;

const BLOCK: u64 = 512;

/// Where a link entry points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget {
    /// Another entry, by normalized name.
    Inside(String),
    /// Somewhere outside the image (absolute, or `..` past the top): never followed.
    Outside,
}

/// The entries of an image tar.
#[derive(Debug, Default)]
pub struct TarIndex {
    /// Regular entries: normalized name to (data offset, size).
    pub files: HashMap<String, (u64, u64)>,
    /// Hard and symbolic links: normalized name to target.
    pub links: HashMap<String, LinkTarget>,
    /// Names of every other entry (directories, devices, …), to say what is there.
    pub others: HashMap<String, u8>,
}

/// Parses a numeric header field as Go does: base-256 if the top bit is set, else octal
/// surrounded by spaces/NULs (empty is 0).
fn number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return None; // negative
            }
            let mut v: u64 = u64::from(b & 0x3f);
            for &x in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(x))?;
            }
            Some(v)
        }
        _ => {
            let s = field
                .iter()
                .position(|&b| b == 0)
                .map_or(field, |n| &field[..n]);
            let s = std::str::from_utf8(s)
                .ok()?
                .trim_matches(|c| c == ' ' || c == '\0');
            if s.is_empty() {
                return Some(0);
            }
            u64::from_str_radix(s, 8).ok()
        }
    }
}

/// The bytes of `field` up to its first NUL.
fn cstr(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |n| &field[..n])
}

fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(want) = number(&h[148..156]) else {
        return false;
    };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed)
}

/// A reader that knows its offset.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counted<R> {
    /// Reads exactly one 512-byte block; `None` at a clean end of file.
    fn block(&mut self, shown: &Path) -> Result<Option<[u8; 512]>> {
        let mut b = [0u8; 512];
        let mut got = 0;
        while got < b.len() {
            match self.inner.read(&mut b[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(shown, e)),
            }
        }
        self.pos += got as u64;
        match got {
            0 => Ok(None),
            512 => Ok(Some(b)),
            _ => Err(problem(
                shown,
                TarProblem::TruncatedHeader {
                    offset: self.pos - got as u64,
                },
            )),
        }
    }

    /// Reads `len` bytes of member data (at most [`MAX_EXTENDED`], checked by the caller) and
    /// skips the padding after them.
    fn data(&mut self, len: u64, shown: &Path) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| read_error(shown, e))?;
        if buf.len() as u64 != len {
            return Err(problem(
                shown,
                TarProblem::TruncatedMember { offset: self.pos },
            ));
        }
        self.pos += len;
        self.skip(padding(len), shown)?;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, shown: &Path) -> Result<()> {
        let got = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|e| read_error(shown, e))?;
        self.pos += got;
        if got != n {
            return Err(problem(
                shown,
                TarProblem::TruncatedMember { offset: self.pos },
            ));
        }
        Ok(())
    }
}

impl Counted<BufReader<File>> {
    /// Skips member data by seeking.
    fn seek_past(&mut self, n: u64, end: u64, shown: &Path) -> Result<()> {
        let to = self
            .pos
            .checked_add(n)
            .filter(|&t| t <= end)
            .ok_or_else(|| problem(shown, TarProblem::PastEnd { offset: self.pos }))?;
        let delta = i64::try_from(n)
            .map_err(|_| problem(shown, TarProblem::PastEnd { offset: self.pos }))?;
        self.inner
            .seek_relative(delta)
            .map_err(|e| read_error(shown, e))?;
        self.pos = to;
        Ok(())
    }
}

/// An [`Error::ImageTar`] for the tar `shown`.
fn problem(shown: &Path, problem: TarProblem) -> Error {
    Error::ImageTar {
        path: shown.to_path_buf(),
        problem,
    }
}

/// An [`Error::ReadImageTar`] for the tar `shown`.
fn read_error(shown: &Path, source: io::Error) -> Error {
    Error::ReadImageTar {
        path: shown.to_path_buf(),
        source,
    }
}

fn padding(len: u64) -> u64 {
    (BLOCK - len % BLOCK) % BLOCK
}

/// Applies the PAX records in `data` to the pending name, link and size.
fn pax(
    data: &[u8],
    name: &mut Option<Vec<u8>>,
    link: &mut Option<Vec<u8>>,
    size: &mut Option<u64>,
    at: u64,
    shown: &Path,
) -> Result<()> {
    let bad = || problem(shown, TarProblem::BadPax { offset: at });
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        match k {
            b"path" => *name = Some(v.to_vec()),
            b"linkpath" => *link = Some(v.to_vec()),
            b"size" => {
                *size = Some(
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(bad)?,
                );
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// Indexes the tar `file` (shown as `shown` in errors).
pub fn index(file: &File, shown: &Path) -> Result<TarIndex> {
    let end = file.metadata().map_err(|e| read_error(shown, e))?.len();
    let mut clone = file.try_clone().map_err(|e| read_error(shown, e))?;
    clone
        .seek(io::SeekFrom::Start(0))
        .map_err(|e| read_error(shown, e))?;
    let mut r = Counted {
        inner: BufReader::new(clone),
        pos: 0,
    };
    let mut out = TarIndex::default();
    let (mut long_name, mut long_link, mut pax_size): (
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<u64>,
    ) = (None, None, None);
    let mut entries = 0usize;
    let mut name_bytes = 0usize;
    loop {
        let at = r.pos;
        let Some(h) = r.block(shown)? else { break };
        if h.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&h) {
            return Err(problem(shown, TarProblem::NotATar { offset: at }));
        }
        let kind = h[156];
        let size = number(&h[124..136])
            .ok_or_else(|| problem(shown, TarProblem::BadSize { offset: at }))?;
        match kind {
            b'L' | b'K' | b'x' | b'X' => {
                if size > MAX_EXTENDED {
                    return Err(problem(
                        shown,
                        TarProblem::ExtendedTooLarge {
                            offset: at,
                            size,
                            limit: MAX_EXTENDED,
                        },
                    ));
                }
                let data = r.data(size, shown)?;
                match kind {
                    b'L' => long_name = Some(cstr(&data).to_vec()),
                    b'K' => long_link = Some(cstr(&data).to_vec()),
                    _ => pax(
                        &data,
                        &mut long_name,
                        &mut long_link,
                        &mut pax_size,
                        at,
                        shown,
                    )?,
                }
                continue;
            }
            b'g' => {
                r.seek_past(size.saturating_add(padding(size)), end, shown)?;
                continue;
            }
            _ => {}
        }
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(problem(
                shown,
                TarProblem::TooManyEntries { limit: MAX_ENTRIES },
            ));
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => {
                let mut n = cstr(&h[0..100]).to_vec();
                if &h[257..263] == b"ustar\0" {
                    let prefix = cstr(&h[345..500]);
                    if !prefix.is_empty() {
                        let mut p = prefix.to_vec();
                        p.push(b'/');
                        p.extend_from_slice(&n);
                        n = p;
                    }
                }
                n
            }
        };
        let link = long_link
            .take()
            .unwrap_or_else(|| cstr(&h[157..257]).to_vec());
        let size = pax_size.take().unwrap_or(size);
        let header_only = matches!(kind, b'1' | b'2' | b'3' | b'4' | b'5' | b'6');
        let data_len = if header_only { 0 } else { size };
        let data_at = r.pos;
        name_bytes += name.len() + link.len();
        if name_bytes > MAX_NAME_BYTES {
            return Err(problem(
                shown,
                TarProblem::NamesTooLong {
                    limit: MAX_NAME_BYTES,
                },
            ));
        }
        let raw = String::from_utf8_lossy(&name).into_owned();
        if let Ok(norm) = crate::path::normalize(&raw) {
            out.files.remove(&norm);
            out.links.remove(&norm);
            out.others.remove(&norm);
            let is_dir_name = name.ends_with(b"/");
            match kind {
                b'0' | b'\0' | b'7' if !is_dir_name => {
                    if data_at.saturating_add(size) > end {
                        return Err(problem(shown, TarProblem::MemberPastEnd { name: norm }));
                    }
                    out.files.insert(norm, (data_at, size));
                }
                b'1' | b'2' => {
                    let target = String::from_utf8_lossy(&link).into_owned();
                    let joined = if kind == b'2' {
                        if target.starts_with('/') {
                            None
                        } else {
                            Some(match norm.rsplit_once('/') {
                                Some((dir, _)) => format!("{dir}/{target}"),
                                None => target,
                            })
                        }
                    } else {
                        Some(target)
                    };
                    let t = joined
                        .and_then(|j| crate::path::normalize_dots(&j))
                        .filter(|t| !t.is_empty())
                        .map_or(LinkTarget::Outside, LinkTarget::Inside);
                    out.links.insert(norm, t);
                }
                other => {
                    out.others.insert(norm, other);
                }
            }
        }
        r.seek_past(data_len.saturating_add(padding(data_len)), end, shown)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn numbers_as_go_reads_them() {
        assert_eq!(number(b"0000644\0"), Some(0o644));
        assert_eq!(number(b"   644 \0"), Some(0o644));
        assert_eq!(number(b"\0\0\0\0"), Some(0));
        assert_eq!(number(b"        "), Some(0));
        assert_eq!(number(&[0x80, 0, 0, 1, 0]), Some(256));
        assert_eq!(number(&[0xff, 0xff]), None);
        assert_eq!(number(b"9"), None);
    }
}

#[cfg(test)]
mod index_tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    fn header(name: &str, kind: u8, size: u64, magic: &[u8; 8], prefix: &str) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[257..265].copy_from_slice(magic);
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    #[test]
    fn header_only_sizes_prefixes_and_links() {
        let mut data = Vec::new();
        // A symlink whose size field is not 0: carries no data (Go's isHeaderOnlyType).
        data.extend_from_slice(&header("link", b'2', 512, b"ustar\0 \0", ""));
        data.extend_from_slice(&header("file", b'0', 3, b"ustar\0 \0", "dir"));
        let mut block = [0u8; 512];
        block[..3].copy_from_slice(b"abc");
        data.extend_from_slice(&block);
        data.extend_from_slice(&[0u8; 1024]);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let idx = index(&f, Path::new("t.tar")).unwrap();
        assert_eq!(idx.files.get("dir/file"), Some(&(1024, 3)));
        assert!(idx.links.contains_key("link"));
    }

    #[test]
    fn a_huge_pax_header_is_refused_from_its_size() {
        let mut data = header("pax", b'x', 1 << 30, b"ustar\x0000", "").to_vec();
        data.extend_from_slice(&[b'x'; 4096]);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let e = index(&f, Path::new("t.tar")).unwrap_err().to_string();
        assert!(e.contains("limit") && e.contains("t.tar"), "{e}");
    }

    #[test]
    fn a_size_past_the_end_of_the_file_is_refused() {
        let mut h = header("big", b'0', 0, b"ustar\x0000", "");
        // Base-256 size 2^62, then the checksum again.
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&h).unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
        let e = index(&f, Path::new("t.tar")).unwrap_err().to_string();
        assert!(e.contains("big") && e.contains("past the end"), "{e}");
    }
}
