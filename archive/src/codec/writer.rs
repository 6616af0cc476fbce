//! The tar encoder: ustar headers with PAX records where needed, GNU PAX 1.0 sparse members,
//! written into an export's output buffer.

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::export::*;
use crate::{Error, Result};

/// Header metadata of one entry, independent of where it came from.
pub(crate) struct EntryMeta {
    pub(crate) kind: tar::EntryType,
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) size: u64,
    /// Whole seconds; negative before 1970 (written as a PAX `mtime` record, as Go does).
    pub(crate) mtime: i64,
    pub(crate) dev: Option<(u32, u32)>,
}

impl EntryMeta {
    pub(crate) fn whiteout() -> EntryMeta {
        EntryMeta {
            kind: tar::EntryType::Regular,
            mode: 0o600,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            dev: None,
        }
    }
}

pub(crate) const OCTAL7: u64 = 0o7_777_777;
pub(crate) const OCTAL11: u64 = 0o77_777_777_777;

/// Writes tar entries (PAX where needed) into the output buffer.
pub(crate) struct TarWriter {
    pub(crate) out: Out,
    /// Reused PAX record buffer.
    pub(crate) pax: Vec<u8>,
}

pub(crate) fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

pub(crate) fn werr(name: &[u8], e: io::Error) -> Error {
    Error::io("write tar entry", PathBuf::from(OsStr::from_bytes(name)), e)
}

/// Where an entry's file data comes from.
pub(crate) enum Data<'a> {
    None,
    /// Read `size` bytes from this descriptor; the path is for error messages.
    Fd(BorrowedFd<'a>, &'a Path),
    /// A file with holes, written as a PAX 1.0 sparse member: the map, then each data segment
    /// read from the descriptor at its offset.
    Sparse(BorrowedFd<'a>, &'a Path, &'a SparseMap),
}

/// The data segments of a file with holes, as a GNU PAX 1.0 sparse member describes them.
pub(crate) struct SparseMap {
    /// The file's size (`GNU.sparse.realsize`).
    pub(crate) real_size: u64,
    /// `(offset, length)` of each data segment, ascending and disjoint; a file ending in a
    /// hole ends with the empty segment `(real_size, 0)`, as GNU tar writes it.
    pub(crate) segs: Vec<(u64, u64)>,
}

/// The most data segments an exported sparse map holds; beyond this, the smallest holes are
/// written as zeros (memory stays bounded, and apply's limit of 2^20 segments is never hit).
pub(crate) const MAX_EXPORT_SEGMENTS: usize = 1 << 16;

pub(crate) fn decimal_len(n: u64) -> u64 {
    n.checked_ilog10().map_or(1, |l| u64::from(l) + 1)
}

impl SparseMap {
    /// Bytes of the map text (`count\n` then `offset\nlength\n` per segment), unpadded.
    pub(crate) fn text_len(&self) -> u64 {
        self.segs
            .iter()
            .fold(decimal_len(self.segs.len() as u64) + 1, |t, &(o, l)| {
                t + decimal_len(o) + decimal_len(l) + 2
            })
    }

    /// The member's stored size: the padded map and the data segments.
    pub(crate) fn stored_size(&self) -> u64 {
        let text = self.text_len();
        let data: u64 = self.segs.iter().map(|s| s.1).sum();
        text + pad_len(text) as u64 + data
    }
}

/// `dir/GNUSparseFile.0/base`, the member name GNU tar gives a 1.0 sparse file (readers that
/// do not know the format extract the raw map and data there, not over the real name).
pub(crate) fn sparse_header_name(name: &[u8]) -> Vec<u8> {
    let (parent, base) = match name.iter().rposition(|&b| b == b'/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => (&b""[..], name),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(b"GNUSparseFile.0/");
    p.extend_from_slice(base);
    p
}

impl TarWriter {
    pub(crate) fn raw_header(name: &[u8], link: &[u8], m: &EntryMeta) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        if let Some(u) = h.as_ustar_mut() {
            let n = name.len().min(u.name.len());
            u.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(u.linkname.len());
            u.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_entry_type(m.kind);
        h.set_mode(m.mode & 0o7777);
        h.set_uid(m.uid.min(OCTAL7));
        h.set_gid(m.gid.min(OCTAL7));
        h.set_size(if m.size > OCTAL11 { 0 } else { m.size });
        h.set_mtime(u64::try_from(m.mtime).unwrap_or(0).min(OCTAL11));
        if let Some((ma, mi)) = m.dev {
            let _ = h.set_device_major(ma);
            let _ = h.set_device_minor(mi);
        }
        h
    }

    /// Writes one entry: a PAX header when needed, the ustar header, then `data` (exactly
    /// `m.size` bytes are expected from it).
    pub(crate) fn entry(
        &mut self,
        name: &[u8],
        link: &[u8],
        m: &EntryMeta,
        xattrs: &[(String, Vec<u8>)],
        data: Data<'_>,
    ) -> Result<()> {
        let sparse = match data {
            Data::Sparse(_, _, map) => Some(map),
            _ => None,
        };
        let sparse_name = sparse.map(|_| sparse_header_name(name));
        let hname = sparse_name.as_deref().unwrap_or(name);
        let pax = &mut self.pax;
        pax.clear();
        if hname.len() > 100 {
            pax_record(pax, b"path", hname);
        }
        if link.len() > 100 {
            pax_record(pax, b"linkpath", link);
        }
        if m.uid > OCTAL7 {
            pax_record(pax, b"uid", m.uid.to_string().as_bytes());
        }
        if m.gid > OCTAL7 {
            pax_record(pax, b"gid", m.gid.to_string().as_bytes());
        }
        if m.size > OCTAL11 {
            pax_record(pax, b"size", m.size.to_string().as_bytes());
        }
        if !(0..=OCTAL11 as i64).contains(&m.mtime) {
            pax_record(pax, b"mtime", m.mtime.to_string().as_bytes());
        }
        for (k, v) in xattrs {
            pax_record(pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if let Some(map) = sparse {
            // After any `path`: readers take the last name record, and GNU.sparse.name is
            // the real one.
            pax_record(pax, b"GNU.sparse.major", b"1");
            pax_record(pax, b"GNU.sparse.minor", b"0");
            pax_record(pax, b"GNU.sparse.name", name);
            pax_record(
                pax,
                b"GNU.sparse.realsize",
                map.real_size.to_string().as_bytes(),
            );
        }
        if !pax.is_empty() {
            let mut pname = b"PaxHeaders.0/".to_vec();
            let base = name
                .rsplit(|&b| b == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"entry");
            pname.extend_from_slice(&base[..base.len().min(80)]);
            let pm = EntryMeta {
                kind: tar::EntryType::XHeader,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: pax.len() as u64,
                mtime: 0,
                dev: None,
            };
            let mut h = Self::raw_header(&pname, b"", &pm);
            h.set_cksum();
            self.out
                .write_all(h.as_bytes())
                .and_then(|()| self.out.write_all(&self.pax))
                .and_then(|()| self.out.zeros(pad_len(self.pax.len() as u64)))
                .map_err(|e| werr(name, e))?;
        }
        let mut h = Self::raw_header(hname, link, m);
        h.set_cksum();
        self.out
            .write_all(h.as_bytes())
            .map_err(|e| werr(name, e))?;
        match data {
            Data::None => {}
            Data::Fd(fd, path) => {
                self.out.copy_from(fd, None, m.size, path)?;
                self.out.zeros(pad_len(m.size)).map_err(|e| werr(name, e))?;
            }
            Data::Sparse(fd, path, map) => {
                self.sparse_map(map).map_err(|e| werr(name, e))?;
                for &(off, len) in &map.segs {
                    self.out.copy_from(fd, Some(off), len, path)?;
                }
                self.out.zeros(pad_len(m.size)).map_err(|e| werr(name, e))?;
            }
        }
        Ok(())
    }

    /// Writes the 1.0 sparse map (decimal lines) padded to a whole block.
    pub(crate) fn sparse_map(&mut self, map: &SparseMap) -> io::Result<()> {
        let mut line = String::new();
        let mut put = |out: &mut Out, n: u64| {
            use std::fmt::Write as _;
            line.clear();
            let _ = writeln!(line, "{n}");
            out.write_all(line.as_bytes())
        };
        put(&mut self.out, map.segs.len() as u64)?;
        for &(o, l) in &map.segs {
            put(&mut self.out, o)?;
            put(&mut self.out, l)?;
        }
        self.out.zeros(pad_len(map.text_len()))
    }

    pub(crate) fn finish(&mut self) -> Result<()> {
        self.out
            .zeros(1024)
            .and_then(|()| self.out.send())
            .map_err(|e| werr(b"end of archive", e))
    }
}

pub(crate) fn pad_len(size: u64) -> usize {
    match (size % 512) as usize {
        0 => 0,
        rem => 512 - rem,
    }
}
