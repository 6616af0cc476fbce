//! Our own streaming tar reader.
//!
//! The `tar` crate splits PAX records at newlines (an xattr value holding `\n` breaks it, and its
//! `size`/`uid`/`gid` look-up then silently falls back to the header) and does not know GNU's PAX
//! sparse formats. This reader parses headers with [`tar::Header`]'s field accessors but handles
//! the extension headers itself:
//!
//! * PAX `x` records are parsed by their decimal length prefix (`"%d %s=%s\n"`, the length
//!   counting the whole record), so values may hold any byte; `g` records are parsed the same way
//!   (a malformed one is refused) and otherwise ignored, as moby and the `tar` crate do.
//! * GNU `L`/`K` long names and links.
//! * Sparse files: old GNU `S` entries (with extension blocks) and the PAX formats 0.0
//!   (`GNU.sparse.offset`/`numbytes` pairs), 0.1 (`GNU.sparse.map`) and 1.0 (the map as decimal
//!   lines at the start of the data, padded to 512 bytes). Maps are validated: sorted,
//!   non-overlapping, within the real size, at most [`MAX_SPARSE_SEGMENTS`] segments, and their
//!   lengths summing to the stored data size; a lying map is [`Error::Malformed`].
//!
//! Memory is bounded: extension headers are buffered up to [`MAX_PAX`] / [`MAX_LONG_NAME`] bytes,
//! sparse maps up to [`MAX_SPARSE_SEGMENTS`] entries; file data is streamed through [`Read`].

use std::io::{self, Read};

use rustix::fs::Timespec;
use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

use super::header::{self, Block};
use crate::{Error, Result};

/// The tar block size.
const BLOCK: u64 = 512;
/// The largest PAX extended header (`x`, `X` or `g`) we buffer: Go's `maxSpecialFileSize`.
pub(crate) const MAX_PAX: u64 = 1 << 20;
/// The largest GNU long name or long link (`L`/`K`) we buffer.
pub(crate) const MAX_LONG_NAME: u64 = 1 << 20;
/// The most segments a sparse map may have (16 bytes each in memory).
pub(crate) const MAX_SPARSE_SEGMENTS: usize = 1 << 20;

/// A sparse file's layout: its real size and the data segments `(offset, length)` stored, in
/// order, as the entry's data.
#[derive(Debug)]
pub(crate) struct Sparse {
    /// The size of the file once extracted.
    pub real_size: u64,
    /// Validated data segments: sorted, non-overlapping, within `real_size`.
    pub map: Vec<(u64, u64)>,
}

/// One member of the archive with every extension header folded in.
pub(crate) struct Entry {
    /// The member's own header block.
    pub header: Header,
    /// Its type.
    pub kind: EntryType,
    /// The effective name (GNU sparse name, PAX path, GNU long name or header name).
    pub name: Vec<u8>,
    /// The effective link target (PAX linkpath, GNU long link or header field), if any.
    pub link: Option<Vec<u8>>,
    /// The data bytes still to read from [`TarReader`] for this entry (after any sparse map).
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Numeric owner (header or PAX `uid`).
    pub uid: u64,
    /// Numeric group (header or PAX `gid`).
    pub gid: u64,
    /// Modification time (header or PAX `mtime`); negative before 1970.
    pub mtime: Timespec,
    /// Device major and minor numbers (char and block devices; 0 otherwise).
    pub device: (u32, u32),
    /// `SCHILY.xattr.*` records: name without the prefix, value.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The sparse layout, for sparse entries.
    pub sparse: Option<Sparse>,
}

impl Entry {
    /// The name for error messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Reads tar members one by one; between [`TarReader::next_entry`] calls it is a [`Read`] over
/// the current member's (stored) data.
pub(crate) struct TarReader<R> {
    /// The tar stream.
    inner: R,
    /// Data bytes of the current member not yet read.
    remaining: u64,
    /// Padding after the current member's data.
    pad: u64,
    /// The name of the last member returned, for error context.
    last: Option<String>,
}

/// An [`Error::Malformed`] for `entry`.
fn bad(entry: &str, reason: impl Into<String>) -> Error {
    Error::Malformed {
        entry: Some(entry.to_owned()),
        reason: reason.into(),
    }
}

/// The error for a numeric header field that is not a number.
fn field_err(entry: &str, f: header::BadField) -> Error {
    bad(
        entry,
        format!("expected an octal or base-256 number in the {} field", f.0),
    )
}

/// Padding after `size` data bytes.
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Parses an unsigned decimal number (ASCII digits only, no sign, no overflow).
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Leading zeros are allowed (Go's strconv.ParseInt reads them): only the rest must fit.
    let digits = &v[v.iter().position(|&b| b != b'0').unwrap_or(v.len())..];
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 20 {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One PAX record: keyword and value bytes.
pub(crate) type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// Splits PAX extended-header data into `(key, value)` records by their length prefixes.
///
/// Every record is `"<len> <key>=<value>\n"` where `<len>` counts the whole record; values may
/// hold any byte, `\n` and `=` included. `Err` says what was wrong.
pub(crate) fn parse_pax(data: &[u8]) -> std::result::Result<Vec<PaxRecord<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut at = 0usize;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().take(21).position(|&b| b == b' ') else {
            return Err(format!(
                "expected a PAX record starting with its decimal length at byte {at}, found {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(24)])
            ));
        };
        let len = decimal(&rest[..sp])
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| {
                format!(
                    "expected a decimal PAX record length at byte {at}, found {:?}",
                    String::from_utf8_lossy(&rest[..sp])
                )
            })?;
        if len < sp + 4 || len > rest.len() {
            return Err(format!(
                "PAX record at byte {at} says it is {len} bytes long, but {} bytes remain",
                rest.len()
            ));
        }
        let rec = &rest[..len];
        if rec[len - 1] != b'\n' {
            return Err(format!(
                "PAX record at byte {at} of length {len} does not end with a newline"
            ));
        }
        let kv = &rec[sp + 1..len - 1];
        let Some(eq) = kv.iter().position(|&b| b == b'=') else {
            return Err(format!("PAX record at byte {at} has no `=`"));
        };
        if eq == 0 {
            return Err(format!("PAX record at byte {at} has an empty keyword"));
        }
        out.push((&kv[..eq], &kv[eq + 1..]));
        rest = &rest[len..];
        at += len;
    }
    Ok(out)
}

/// Parses a PAX time (`secs[.frac]`, possibly negative) into a timespec.
pub(crate) fn parse_pax_time(v: &str) -> Option<Timespec> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    let digits: String = frac.chars().take(9).collect();
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !digits.is_empty() {
        nanos = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
    }
    if (secs < 0 || v.starts_with('-')) && nanos > 0 {
        return Some(Timespec {
            tv_sec: secs.checked_sub(1)?,
            tv_nsec: 1_000_000_000 - nanos,
        });
    }
    Some(Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    })
}

/// Checks a sparse map against the real size and the stored data size.
fn check_map(map: &[(u64, u64)], real_size: u64, stored: u64, entry: &str) -> Result<()> {
    let mut end = 0u64;
    let mut sum = 0u64;
    for (i, &(off, len)) in map.iter().enumerate() {
        if off < end {
            return Err(bad(
                entry,
                format!(
                    "sparse map segment {i} at offset {off} overlaps or precedes the previous one ending at {end}"
                ),
            ));
        }
        end = off
            .checked_add(len)
            .filter(|&e| e <= real_size)
            .ok_or_else(|| {
                bad(
                    entry,
                    format!(
                        "sparse map segment {i} ({len} bytes at offset {off}) ends beyond the real size {real_size}"
                    ),
                )
            })?;
        sum = sum.saturating_add(len);
    }
    if sum != stored {
        return Err(bad(
            entry,
            format!("sparse map lists {sum} data bytes, but the entry stores {stored}"),
        ));
    }
    Ok(())
}

/// The sparse-related PAX records of one member.
#[derive(Default)]
struct PaxSparse {
    /// `GNU.sparse.major`.
    major: Option<u64>,
    /// `GNU.sparse.minor`.
    minor: Option<u64>,
    /// `GNU.sparse.size` (0.x) or `GNU.sparse.realsize` (1.0).
    real_size: Option<u64>,
    /// `GNU.sparse.numblocks`.
    numblocks: Option<u64>,
    /// The 0.0 / 0.1 map.
    map: Vec<(u64, u64)>,
    /// A `GNU.sparse.offset` waiting for its `numbytes`.
    pending_offset: Option<u64>,
    /// Whether any `GNU.sparse.*` record was seen.
    seen: bool,
    /// `GNU.sparse.name`.
    name: Option<Vec<u8>>,
}

/// Everything the extension headers before a member said.
#[derive(Default)]
struct Ext {
    /// PAX `path`.
    path: Option<Vec<u8>>,
    /// PAX `linkpath`.
    linkpath: Option<Vec<u8>>,
    /// PAX `size`.
    size: Option<u64>,
    /// PAX `uid`.
    uid: Option<u64>,
    /// PAX `gid`.
    gid: Option<u64>,
    /// PAX `mtime`.
    mtime: Option<Timespec>,
    /// `SCHILY.xattr.*`.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// `GNU.sparse.*`.
    sparse: PaxSparse,
    /// The data of the PAX `x` header, folded in once the member's name is known (errors in
    /// it name the member it describes).
    pax_data: Option<Vec<u8>>,
    /// GNU long name.
    long_name: Option<Vec<u8>>,
    /// GNU long link.
    long_link: Option<Vec<u8>>,
}

impl Ext {
    /// Folds the records of one PAX `x` header in; errors name `entry`.
    fn pax(&mut self, recs: Vec<PaxRecord<'_>>, entry: &str) -> Result<()> {
        let num = |key: &[u8], v: &[u8]| {
            decimal(v).ok_or_else(|| {
                bad(
                    entry,
                    format!(
                        "expected a decimal PAX {} record, found {:?}",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v)
                    ),
                )
            })
        };
        let sp = &mut self.sparse;
        for (key, v) in recs {
            match key {
                b"path" => self.path = (!v.is_empty()).then(|| v.to_vec()),
                b"linkpath" => self.linkpath = (!v.is_empty()).then(|| v.to_vec()),
                b"size" => self.size = Some(num(key, v)?),
                b"uid" => self.uid = Some(num(key, v)?),
                b"gid" => self.gid = Some(num(key, v)?),
                b"mtime" => {
                    let t = std::str::from_utf8(v)
                        .ok()
                        .and_then(parse_pax_time)
                        .ok_or_else(|| {
                            bad(
                                entry,
                                format!(
                                    "expected a PAX mtime like 123.456, found {:?}",
                                    String::from_utf8_lossy(v)
                                ),
                            )
                        })?;
                    self.mtime = Some(t);
                }
                _ if key.starts_with(b"SCHILY.xattr.") => {
                    self.xattrs
                        .push((key[b"SCHILY.xattr.".len()..].to_vec(), v.to_vec()));
                }
                _ if key.starts_with(b"GNU.sparse.") => {
                    sp.seen = true;
                    match &key[b"GNU.sparse.".len()..] {
                        b"major" => sp.major = Some(num(key, v)?),
                        b"minor" => sp.minor = Some(num(key, v)?),
                        b"size" | b"realsize" => sp.real_size = Some(num(key, v)?),
                        b"numblocks" => {
                            let n = num(key, v)?;
                            if n > MAX_SPARSE_SEGMENTS as u64 {
                                return Err(too_many(entry));
                            }
                            sp.numblocks = Some(n);
                        }
                        b"name" => sp.name = Some(v.to_vec()),
                        b"offset" => {
                            if sp.pending_offset.is_some() {
                                return Err(bad(
                                    entry,
                                    "expected GNU.sparse.numbytes after GNU.sparse.offset, found another offset",
                                ));
                            }
                            sp.pending_offset = Some(num(key, v)?);
                        }
                        b"numbytes" => {
                            let off = sp.pending_offset.take().ok_or_else(|| {
                                bad(
                                    entry,
                                    "expected GNU.sparse.offset before GNU.sparse.numbytes, found none",
                                )
                            })?;
                            push_segment(&mut sp.map, off, num(key, v)?, entry)?;
                        }
                        b"map" => {
                            sp.map.clear();
                            if !v.is_empty() {
                                let nums = v
                                    .split(|&b| b == b',')
                                    .map(|n| num(key, n))
                                    .collect::<Result<Vec<u64>>>()?;
                                if nums.len() % 2 != 0 {
                                    return Err(bad(
                                        entry,
                                        format!(
                                            "expected an even count of numbers in GNU.sparse.map, found {}",
                                            nums.len()
                                        ),
                                    ));
                                }
                                for pair in nums.chunks_exact(2) {
                                    push_segment(&mut sp.map, pair[0], pair[1], entry)?;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The error for a map with more than [`MAX_SPARSE_SEGMENTS`] segments.
fn too_many(entry: &str) -> Error {
    bad(
        entry,
        format!("sparse map has more than {MAX_SPARSE_SEGMENTS} segments"),
    )
}

/// Appends a segment, enforcing [`MAX_SPARSE_SEGMENTS`].
fn push_segment(map: &mut Vec<(u64, u64)>, off: u64, len: u64, entry: &str) -> Result<()> {
    if map.len() >= MAX_SPARSE_SEGMENTS {
        return Err(too_many(entry));
    }
    map.push((off, len));
    Ok(())
}

/// Reads one GNU sparse descriptor into `map` unless it is empty.
fn gnu_segment(s: &GnuSparseHeader, map: &mut Vec<(u64, u64)>, entry: &str) -> Result<()> {
    if s.is_empty() {
        return Ok(());
    }
    let off = s.offset().map_err(|e| bad(entry, e.to_string()))?;
    let len = s.length().map_err(|e| bad(entry, e.to_string()))?;
    push_segment(map, off, len, entry)
}

impl<R: Read> TarReader<R> {
    /// Starts reading the tar stream `inner`.
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            pad: 0,
            last: None,
        }
    }

    /// The stream, positioned wherever reading stopped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The entry name for errors not tied to a header we could read.
    fn context(&self) -> String {
        match &self.last {
            Some(l) => format!("after {l}"),
            None => "<first header>".to_owned(),
        }
    }

    /// Skips `n` bytes; `Err` when the stream ends first.
    fn skip(&mut self, n: u64, entry: &str) -> Result<()> {
        let got = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|e| bad(entry, e.to_string()))?;
        if got != n {
            return Err(bad(
                entry,
                format!("truncated archive: expected {n} more bytes, found {got}"),
            ));
        }
        Ok(())
    }

    /// Reads a whole block; `Ok(false)` at a clean end of stream.
    fn block(&mut self, buf: &mut [u8; 512], entry: &str) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(bad(
                        entry,
                        format!("truncated archive: a 512-byte block ends after {got} bytes"),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(bad(entry, e.to_string())),
            }
        }
        Ok(true)
    }

    /// Reads the data of an extension header of `size` bytes (at most `limit`) plus padding.
    fn ext_data(&mut self, size: u64, limit: u64, what: &str, entry: &str) -> Result<Vec<u8>> {
        if size > limit {
            return Err(bad(
                entry,
                format!("{what} of {size} bytes exceeds the limit of {limit}"),
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        let got = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| bad(entry, e.to_string()))?;
        if got as u64 != size {
            return Err(bad(
                entry,
                format!("truncated {what}: expected {size} bytes, found {got}"),
            ));
        }
        self.skip(padding(size), entry)?;
        Ok(data)
    }

    /// Reads the next member, skipping what is left of the current one. `Ok(None)` at the
    /// end-of-archive block (or a clean end of stream).
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        // Truncation in the rest of the current member names that member.
        let ctx = self.last.clone().unwrap_or_else(|| self.context());
        let left = self.remaining.saturating_add(self.pad);
        self.remaining = 0;
        self.pad = 0;
        self.skip(left, &ctx)?;
        let mut ext = Ext::default();
        let mut pending = false;
        loop {
            let ctx = self.context();
            let mut block = [0u8; 512];
            if !self.block(&mut block, &ctx)? || block.iter().all(|&b| b == 0) {
                if pending {
                    return Err(bad(
                        &ctx,
                        "extension headers at the end of the archive describe no member",
                    ));
                }
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block).clone();
            let fields = Block::new(&block);
            let hname = String::from_utf8_lossy(&fields.name()).into_owned();
            let hname = if hname.is_empty() { ctx } else { hname };
            if !header::checksum_matches(&block) {
                return Err(bad(
                    &hname,
                    format!(
                        "header checksum mismatch: stored {:?}, which is neither the unsigned nor the signed sum of the block",
                        String::from_utf8_lossy(header::c_string(&block[148..156]))
                    ),
                ));
            }
            let kind = header.entry_type();
            let hsize = fields
                .size()
                .map_err(|f| field_err(&hname, f))
                .and_then(|s| {
                    u64::try_from(s).map_err(|_| {
                        bad(&hname, format!("expected a size of 0 or more, found {s}"))
                    })
                })?;
            match kind.as_byte() {
                // Solaris `X` headers are PAX `x` headers by another name. When several describe
                // one member the last one wins, as in Go, GNU and BSD tar.
                b'x' | b'X' => {
                    ext.pax_data = Some(self.ext_data(hsize, MAX_PAX, "PAX header", &hname)?);
                    pending = true;
                    continue;
                }
                b'g' => {
                    let data = self.ext_data(hsize, MAX_PAX, "PAX global header", &hname)?;
                    parse_pax(&data).map_err(|r| bad(&hname, r))?;
                    continue;
                }
                b'L' | b'K' => {
                    let is_name = kind.as_byte() == b'L';
                    // The last of several long names wins; a long name is a C string, cut at its
                    // first NUL (Go, GNU and BSD tar).
                    let mut data = self.ext_data(hsize, MAX_LONG_NAME, "GNU long name", &hname)?;
                    let len = header::c_string(&data).len();
                    data.truncate(len);
                    if is_name {
                        ext.long_name = Some(data);
                    } else {
                        ext.long_link = Some(data);
                    }
                    pending = true;
                    continue;
                }
                _ => {}
            }
            if let Some(data) = ext.pax_data.take() {
                let recs = parse_pax(&data).map_err(|r| bad(&hname, r))?;
                // Errors in the records name the member as it will be known.
                let named = |k: &[u8]| {
                    recs.iter()
                        .rev()
                        .find(|(key, v)| *key == k && !v.is_empty())
                };
                let entry = named(b"GNU.sparse.name")
                    .or_else(|| named(b"path"))
                    .map(|(_, v)| v.to_vec())
                    .or_else(|| ext.long_name.clone())
                    .map_or(hname, |n| String::from_utf8_lossy(&n).into_owned());
                ext.pax(recs, &entry)?;
            }
            let entry = self.member(header, &block, kind, hsize, ext)?;
            self.last = Some(entry.display_name());
            return Ok(Some(entry));
        }
    }

    /// Builds the member from its header and extensions, reading any sparse map.
    fn member(
        &mut self,
        header: Header,
        block: &[u8; 512],
        kind: EntryType,
        hsize: u64,
        ext: Ext,
    ) -> Result<Entry> {
        let fields = Block::new(block);
        let sp = ext.sparse;
        let name = sp
            .name
            .clone()
            .or(ext.path)
            .or(ext.long_name)
            .unwrap_or_else(|| fields.name());
        let display = String::from_utf8_lossy(&name).into_owned();
        let link = ext
            .linkpath
            .or(ext.long_link)
            .or_else(|| Some(fields.link_name().to_vec()).filter(|l| !l.is_empty()));
        // Types that carry no data: whatever the size field says, no data follows (Go's
        // isHeaderOnlyType; GNU tar and Python agree). Skipping "their" bytes would swallow
        // the next headers.
        let header_only = matches!(kind.as_byte(), b'1'..=b'6');
        let size = if header_only {
            0
        } else {
            ext.size.unwrap_or(hsize)
        };
        // `kind.as_byte()` reads a NUL type flag (V7's regular file) as `0`: look at the raw byte.
        let kind = match kind.as_byte() {
            // A GNU dumpdir (`--incremental`) is a directory; its data, the list of names the
            // directory held, is skipped.
            b'D' => EntryType::Directory,
            // Old (V7) archives mark directories by a trailing slash on a regular-type name.
            _ if block[156] == 0 && name.ends_with(b"/") => EntryType::Directory,
            _ => kind,
        };
        let num =
            |r: std::result::Result<i64, header::BadField>| r.map_err(|f| field_err(&display, f));
        let mode = u32::try_from(num(fields.mode())? & 0o7777).unwrap_or(0);
        let owner = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| {
                bad(
                    &display,
                    format!("expected a {what} of 0 or more, found {v}"),
                )
            })
        };
        let uid = match ext.uid {
            Some(u) => u,
            None => owner(num(fields.uid())?, "uid")?,
        };
        let gid = match ext.gid {
            Some(g) => g,
            None => owner(num(fields.gid())?, "gid")?,
        };
        let mtime = match ext.mtime {
            Some(t) => t,
            None => Timespec {
                tv_sec: num(fields.mtime())?,
                tv_nsec: 0,
            },
        };
        let device = if matches!(kind, EntryType::Char | EntryType::Block) {
            let (major, minor) = fields.device().map_err(|f| field_err(&display, f))?;
            let dev = |v: i64, what: &str| {
                u32::try_from(v).map_err(|_| {
                    bad(
                        &display,
                        format!("expected a device {what} number, found {v}"),
                    )
                })
            };
            (dev(major, "major")?, dev(minor, "minor")?)
        } else {
            (0, 0)
        };
        self.remaining = size;
        self.pad = padding(size);
        let mut entry = Entry {
            header,
            kind,
            name,
            link,
            size,
            mode,
            uid,
            gid,
            mtime,
            device,
            xattrs: ext.xattrs,
            sparse: None,
        };
        let regular = matches!(kind, EntryType::Regular | EntryType::Continuous);
        if kind == EntryType::GNUSparse {
            entry.sparse = Some(self.old_gnu_sparse(&entry.header, size, &display)?);
        } else if sp.seen && regular {
            entry.sparse = Some(self.pax_sparse(sp, &display)?);
            entry.size = self.remaining;
        } else if sp.seen {
            return Err(Error::bad_entry(
                &display,
                format!(
                    "expected GNU.sparse.* records on a regular file only, found them on tar entry type {:?}",
                    kind.as_byte() as char
                ),
            ));
        }
        Ok(entry)
    }

    /// Reads the map of an old GNU `S` entry (header descriptors plus extension blocks).
    fn old_gnu_sparse(&mut self, header: &Header, stored: u64, entry: &str) -> Result<Sparse> {
        let gnu = header.as_gnu().ok_or_else(|| {
            bad(
                entry,
                "expected a GNU header for a sparse entry, found another format",
            )
        })?;
        let real_size = gnu.real_size().map_err(|e| bad(entry, e.to_string()))?;
        let mut map = Vec::new();
        for s in &gnu.sparse {
            gnu_segment(s, &mut map, entry)?;
        }
        let mut more = gnu.is_extended();
        while more {
            let mut ext = GnuExtSparseHeader::new();
            if !self.block(ext.as_mut_bytes(), entry)? {
                return Err(bad(
                    entry,
                    "truncated archive: expected a sparse extension block",
                ));
            }
            for s in ext.sparse() {
                gnu_segment(s, &mut map, entry)?;
            }
            more = ext.is_extended();
        }
        check_map(&map, real_size, stored, entry)?;
        Ok(Sparse { real_size, map })
    }

    /// Builds the map of a PAX sparse member (0.0, 0.1 from records; 1.0 from the data).
    fn pax_sparse(&mut self, sp: PaxSparse, entry: &str) -> Result<Sparse> {
        let version = (sp.major, sp.minor);
        let (real_size, map) = match version {
            (Some(1), Some(0)) => {
                let real = sp.real_size.ok_or_else(|| {
                    bad(
                        entry,
                        "expected GNU.sparse.realsize in a 1.0 sparse member, found none",
                    )
                })?;
                (real, self.map_1_0(entry)?)
            }
            (None | Some(0), None | Some(0) | Some(1)) => {
                if sp.pending_offset.is_some() {
                    return Err(bad(
                        entry,
                        "expected GNU.sparse.numbytes after the last GNU.sparse.offset, found none",
                    ));
                }
                let real = sp.real_size.ok_or_else(|| {
                    bad(
                        entry,
                        "expected GNU.sparse.size in a 0.x sparse member, found none",
                    )
                })?;
                if let Some(n) = sp.numblocks
                    && n != sp.map.len() as u64
                {
                    return Err(bad(
                        entry,
                        format!(
                            "GNU.sparse.numblocks says {n} segments, but the map has {}",
                            sp.map.len()
                        ),
                    ));
                }
                (real, sp.map)
            }
            (major, minor) => {
                return Err(Error::bad_entry(
                    entry,
                    format!(
                        "expected GNU sparse format 0.0, 0.1 or 1.0, found {}.{}",
                        major.map_or("?".into(), |m| m.to_string()),
                        minor.map_or("?".into(), |m| m.to_string())
                    ),
                ));
            }
        };
        check_map(&map, real_size, self.remaining, entry)?;
        Ok(Sparse { real_size, map })
    }

    /// Reads a 1.0 sparse map (decimal lines, padded to a block) from the start of the data.
    fn map_1_0(&mut self, entry: &str) -> Result<Vec<(u64, u64)>> {
        let mut buf: Vec<u8> = Vec::new();
        let mut pos = 0usize;
        let next = |this: &mut Self, buf: &mut Vec<u8>, pos: &mut usize| -> Result<u64> {
            loop {
                if let Some(nl) = buf[*pos..].iter().position(|&b| b == b'\n') {
                    let field = &buf[*pos..*pos + nl];
                    let n = decimal(field).ok_or_else(|| {
                        bad(
                            entry,
                            format!(
                                "expected a decimal number in the sparse map, found {:?}",
                                String::from_utf8_lossy(field)
                            ),
                        )
                    })?;
                    *pos += nl + 1;
                    return Ok(n);
                }
                let tail = &buf[*pos..];
                if tail.len() > 20 {
                    return Err(bad(
                        entry,
                        if tail.iter().all(|&b| b == 0) {
                            "sparse map ends (padding follows) before all its numbers"
                        } else {
                            "sparse map line longer than a decimal u64"
                        },
                    ));
                }
                if this.remaining < BLOCK {
                    return Err(bad(entry, "sparse map runs past the entry's data"));
                }
                let mut block = [0u8; 512];
                if !this.block(&mut block, entry)? {
                    return Err(bad(entry, "truncated archive in the sparse map"));
                }
                this.remaining -= BLOCK;
                buf.drain(..*pos);
                *pos = 0;
                buf.extend_from_slice(&block);
            }
        };
        let count = next(self, &mut buf, &mut pos)?;
        if count > MAX_SPARSE_SEGMENTS as u64 {
            return Err(too_many(entry));
        }
        // The count is the layer's word: grow as numbers actually arrive.
        let mut map = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let off = next(self, &mut buf, &mut pos)?;
            let len = next(self, &mut buf, &mut pos)?;
            map.push((off, len));
        }
        Ok(map)
    }
}

impl<R: Read> Read for TarReader<R> {
    /// Reads the current member's data; `Ok(0)` at its end (or when the stream ends early:
    /// callers compare what they read with the size they expect).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let got = self.inner.read(&mut buf[..n])?;
        self.remaining -= got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_by_length() {
        let v = b"21 SCHILY.xattr.a=\n=\n12 path=a b\n";
        let recs = parse_pax(v).unwrap();
        assert_eq!(recs[0], (&b"SCHILY.xattr.a"[..], &b"\n="[..]));
        assert_eq!(recs[1], (&b"path"[..], &b"a b"[..]));
        assert!(parse_pax(b"99 path=a\n").is_err());
        assert_eq!(parse_pax(b"9 path=a\n").unwrap().len(), 1);
        assert!(parse_pax(b"5 path=a\n").is_err());
        assert!(parse_pax(b"11 path=a\n").is_err());
        assert!(parse_pax(b"x path=a\n").is_err());
        assert!(parse_pax(b"8 patha\n").is_err());
        assert!(parse_pax(b"-5 a=b\n").is_err());
    }

    #[test]
    fn pax_time() {
        let t = parse_pax_time("12.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 500_000_000));
        let t = parse_pax_time("-1.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750_000_000));
        assert!(parse_pax_time("x").is_none());
        assert!(parse_pax_time("1.x").is_none());
    }

    #[test]
    fn maps_are_checked() {
        assert!(check_map(&[(0, 5), (10, 5)], 20, 10, "e").is_ok());
        assert!(check_map(&[(0, 5), (4, 5)], 20, 10, "e").is_err());
        assert!(check_map(&[(10, 5), (0, 5)], 20, 10, "e").is_err());
        assert!(check_map(&[(0, 5), (18, 5)], 20, 10, "e").is_err());
        assert!(check_map(&[(0, 5)], 20, 6, "e").is_err());
        assert!(check_map(&[(u64::MAX, 2)], u64::MAX, 2, "e").is_err());
    }
}
