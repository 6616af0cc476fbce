//! The fields of one 512-byte tar header block, read the way Go's `archive/tar` reads them.
//!
//! moby's layer code reads layers with Go's reader, so an archive means what Go says it means.
//! Where GNU tar and Go disagree we follow Go (see the crate's corpus tests):
//!
//! * Numeric fields ([`numeric`]): base-256 when the first byte has its high bit set (negative
//!   values included: pre-1970 mtimes), otherwise octal with leading and trailing spaces and NULs
//!   trimmed; an empty field (all spaces or NULs) is 0.
//! * The checksum ([`checksum_matches`]) may be the unsigned sum (POSIX) or the signed sum (some
//!   historic tars).
//! * The name ([`Block::name`]): the `prefix` field is used whenever the magic is `ustar\0`
//!   (whatever the version field says) and for star archives; for a GNU header (`ustar `,
//!   version ` \0`) whose atime/ctime fields do not parse as numbers, the field is taken as a
//!   prefix written by a pre-Go 1.8 writer when it is ASCII (golang.org/issue/12594).

/// Offsets of the fields of a header block.
mod at {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHKSUM: Range<usize> = 148..156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const VERSION: Range<usize> = 263..265;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    pub const PREFIX: Range<usize> = 345..500;
    /// star's shorter prefix (atime and ctime follow it).
    pub const STAR_PREFIX: Range<usize> = 345..476;
    pub const STAR_TRAILER: Range<usize> = 508..512;
    pub const GNU_ATIME: Range<usize> = 345..357;
    pub const GNU_CTIME: Range<usize> = 357..369;
}

/// The header formats Go tells apart (`block.getFormat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Pre-POSIX: no magic.
    V7,
    /// `ustar\0` (POSIX ustar and PAX).
    Ustar,
    /// `ustar\0` with the `tar\0` trailer of star.
    Star,
    /// `ustar ` with version ` \0` (GNU).
    Gnu,
}

/// A field that is not a number (the error text names the field).
#[derive(Debug)]
pub(crate) struct BadField(pub &'static str);

/// The bytes of a string field up to its first NUL.
pub(crate) fn c_string(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => &field[..n],
        None => field,
    }
}

/// Go's `parseNumeric`: base-256 or octal, see the module documentation. `None` when the
/// field is not a number or overflows an `i64`.
pub(crate) fn numeric(field: &[u8]) -> Option<i64> {
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        // Base-256, two's complement: invert negative numbers, read, invert back.
        let inv = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &b) in field.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        if x >> 63 != 0 {
            return None;
        }
        let x = x as i64;
        return Some(if inv == 0xff { !x } else { x });
    }
    let trimmed = {
        let is_pad = |b: &u8| *b == b' ' || *b == 0;
        let start = field.iter().position(|b| !is_pad(b)).unwrap_or(field.len());
        let end = field
            .iter()
            .rposition(|b| !is_pad(b))
            .map_or(start, |e| e + 1);
        &field[start..end]
    };
    let s = c_string(trimmed);
    if s.is_empty() {
        return Some(0);
    }
    let s = std::str::from_utf8(s).ok()?;
    u64::from_str_radix(s, 8)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
}

/// Whether the stored checksum of `block` matches its unsigned or its signed byte sum (the
/// checksum field itself counted as spaces).
pub(crate) fn checksum_matches(block: &[u8; 512]) -> bool {
    let Some(stored) = numeric(&block[at::CHKSUM]) else {
        return false;
    };
    let rest = block[..at::CHKSUM.start]
        .iter()
        .chain(&block[at::CHKSUM.end..]);
    let unsigned: i64 = rest.clone().map(|&b| i64::from(b)).sum::<i64>() + 8 * 32;
    let signed: i64 = rest.map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    stored == unsigned || stored == signed
}

/// One header block and the fields read from it.
pub(crate) struct Block<'a> {
    raw: &'a [u8; 512],
}

impl<'a> Block<'a> {
    /// Reads `raw` (whose checksum the caller has checked).
    pub fn new(raw: &'a [u8; 512]) -> Block<'a> {
        Block { raw }
    }

    /// The format Go would guess from the magic and version fields.
    pub fn format(&self) -> Format {
        let magic = &self.raw[at::MAGIC];
        if magic == b"ustar\0" {
            if &self.raw[at::STAR_TRAILER] == b"tar\0" {
                Format::Star
            } else {
                Format::Ustar
            }
        } else if magic == b"ustar " && &self.raw[at::VERSION] == b" \0" {
            Format::Gnu
        } else {
            Format::V7
        }
    }

    fn num(&self, range: std::ops::Range<usize>, what: &'static str) -> Result<i64, BadField> {
        numeric(&self.raw[range]).ok_or(BadField(what))
    }

    /// Permission and type bits of the mode field.
    pub fn mode(&self) -> Result<i64, BadField> {
        self.num(at::MODE, "mode")
    }

    /// The numeric owner.
    pub fn uid(&self) -> Result<i64, BadField> {
        self.num(at::UID, "uid")
    }

    /// The numeric group.
    pub fn gid(&self) -> Result<i64, BadField> {
        self.num(at::GID, "gid")
    }

    /// The stored size (negative sizes are the caller's to refuse).
    pub fn size(&self) -> Result<i64, BadField> {
        self.num(at::SIZE, "size")
    }

    /// The modification time in seconds (negative before 1970).
    pub fn mtime(&self) -> Result<i64, BadField> {
        self.num(at::MTIME, "mtime")
    }

    /// Device major and minor numbers (0 where the format has none).
    pub fn device(&self) -> Result<(i64, i64), BadField> {
        if self.format() == Format::V7 {
            return Ok((0, 0));
        }
        Ok((
            self.num(at::DEVMAJOR, "device major")?,
            self.num(at::DEVMINOR, "device minor")?,
        ))
    }

    /// The link target field (up to its first NUL).
    pub fn link_name(&self) -> &'a [u8] {
        c_string(&self.raw[at::LINKNAME])
    }

    /// The member name: the name field, joined to the prefix field where the format has one
    /// (see the module documentation).
    pub fn name(&self) -> Vec<u8> {
        let name = c_string(&self.raw[at::NAME]);
        let prefix: &[u8] = match self.format() {
            Format::Ustar => c_string(&self.raw[at::PREFIX]),
            Format::Star => c_string(&self.raw[at::STAR_PREFIX]),
            Format::Gnu => {
                let unparsable = |r: std::ops::Range<usize>| {
                    self.raw[r.start] != 0 && numeric(&self.raw[r]).is_none()
                };
                let p = c_string(&self.raw[at::PREFIX]);
                if (unparsable(at::GNU_ATIME) || unparsable(at::GNU_CTIME)) && p.is_ascii() {
                    p
                } else {
                    b""
                }
            }
            Format::V7 => b"",
        };
        if prefix.is_empty() {
            return name.to_vec();
        }
        let mut full = Vec::with_capacity(prefix.len() + 1 + name.len());
        full.extend_from_slice(prefix);
        full.push(b'/');
        full.extend_from_slice(name);
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields_read_as_go_reads_them() {
        assert_eq!(numeric(b"0000644\0"), Some(0o644));
        assert_eq!(numeric(b"   644 \0"), Some(0o644));
        assert_eq!(numeric(b"\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(numeric(b"        "), Some(0));
        assert_eq!(numeric(b""), Some(0));
        assert_eq!(numeric(&[0, 0, b'6', b'4', b'4', 0]), Some(0o644));
        assert_eq!(numeric(b"64 4"), None);
        assert_eq!(numeric(b"0009"), None);
        // Base-256: 2^33 and -1.
        assert_eq!(
            numeric(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]),
            Some(1 << 33)
        );
        assert_eq!(numeric(&[0xff; 12]), Some(-1));
        assert_eq!(numeric(&[0x80, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn signed_and_unsigned_checksums_are_accepted() {
        let mut b = [0u8; 512];
        b[..3].copy_from_slice(b"a\xe9b");
        let unsigned: u32 = b.iter().map(|&x| u32::from(x)).sum::<u32>() + 256;
        let signed: i32 = b.iter().map(|&x| i32::from(x as i8)).sum::<i32>() + 256;
        for sum in [i64::from(unsigned), i64::from(signed)] {
            let f = format!("{sum:06o}\0 ");
            b[148..156].copy_from_slice(f.as_bytes());
            assert!(checksum_matches(&b), "{sum}");
        }
        b[148..156].copy_from_slice(b"000001\0 ");
        assert!(!checksum_matches(&b));
    }
}
