//! The result protocol: how the confined child tells the parent what happened.
//!
//! The child writes exactly one [`Message`] to the result pipe and exits. The encoding is a small
//! hand-rolled binary format (magic, tag, length-prefixed fields, little-endian integers) so that
//! both ends are plain code with no serialisation crate, no allocation-heavy machinery and no
//! locks. The parent treats the bytes as untrusted — a child compromised by a hostile layer could
//! write anything — so decoding is bounded ([`MAX_MESSAGE`]) and every malformation is an error,
//! never a panic.
//!
//! Every [`Error`] variant (and every [`archive::Error`] variant inside one) is encoded field by field so that the parent rebuilds an
//! equal error: same variant, same fields, and for OS errors the same errno
//! (`io::Error::from_raw_os_error`). I/O errors without an errno keep their kind and message.
//! A variant this crate does not know yet (the enum is `#[non_exhaustive]`) travels as its
//! message and comes back as an `archive::Error::Io` with op `"apply layer"`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use archive::Error as ArchiveError;

use crate::Error;

/// First bytes of every message; a version bump changes the last byte.
const MAGIC: &[u8; 4] = b"CRA2";

/// Upper bound on the size of a message the parent accepts.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;

/// Upper bound on one string field; longer fields are cut at a character boundary.
const MAX_FIELD: usize = 16 * 1024;

/// How the child confined itself (reported by `apply_layer_with_fault`, a `test-util` hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfinedBy {
    /// `pivot_root` into the target and the old root detached: the normal case.
    PivotRoot,
    /// `chroot` into the target, because `pivot_root` was refused (`EINVAL`, e.g. on an
    /// initramfs root).
    Chroot,
}

/// What the child reports.
#[derive(Debug)]
pub(crate) enum Message {
    /// The job succeeded: the bytes applied, the entries skipped (at most
    /// [`archive::MAX_SKIPPED`] listed, `skipped_count` in all) and how the child was confined.
    Ok {
        bytes: u64,
        skipped: Vec<(PathBuf, String)>,
        skipped_count: u64,
        by: ConfinedBy,
    },
    /// The job (or the confinement) failed.
    Err(Error),
    /// The child panicked; the payload's message.
    Panicked(String),
}

const TAG_OK: u8 = 0;
const TAG_ERR: u8 = 1;
const TAG_PANICKED: u8 = 2;

const E_IO: u8 = 1;
const E_BAD_ENTRY: u8 = 2;
const E_MALFORMED: u8 = 3;
const E_LIMIT: u8 = 4;
const E_UNKNOWN_FORMAT: u8 = 5;
const E_CONFINEMENT: u8 = 6;
const E_CHILD_DIED: u8 = 7;
const E_STREAM: u8 = 8;
const E_OTHER: u8 = 255;

/// `io::ErrorKind`s that survive the trip; anything else becomes `Other`.
const KINDS: &[io::ErrorKind] = &[
    io::ErrorKind::Other,
    io::ErrorKind::NotFound,
    io::ErrorKind::PermissionDenied,
    io::ErrorKind::AlreadyExists,
    io::ErrorKind::InvalidInput,
    io::ErrorKind::InvalidData,
    io::ErrorKind::UnexpectedEof,
    io::ErrorKind::WriteZero,
    io::ErrorKind::Interrupted,
    io::ErrorKind::Unsupported,
    io::ErrorKind::OutOfMemory,
    io::ErrorKind::BrokenPipe,
    io::ErrorKind::WouldBlock,
    io::ErrorKind::TimedOut,
];

/// Encodes `msg`. Never panics.
pub(crate) fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    match msg {
        Message::Ok {
            bytes,
            skipped,
            skipped_count,
            by,
        } => {
            out.push(TAG_OK);
            out.extend_from_slice(&bytes.to_le_bytes());
            out.push(match by {
                ConfinedBy::PivotRoot => 0,
                ConfinedBy::Chroot => 1,
            });
            out.extend_from_slice(&skipped_count.to_le_bytes());
            // Listed entries stop where the message would grow past half its limit (each
            // field is cut at MAX_FIELD); the count still says how many there were.
            let mut list = Vec::new();
            let mut listed: u32 = 0;
            for (path, why) in skipped.iter().take(archive::MAX_SKIPPED) {
                if out.len() + list.len() + 2 * MAX_FIELD + 16 > MAX_MESSAGE / 2 {
                    break;
                }
                put_bytes(&mut list, path.as_os_str().as_bytes());
                put_str(&mut list, why);
                listed += 1;
            }
            out.extend_from_slice(&listed.to_le_bytes());
            out.extend_from_slice(&list);
        }
        Message::Err(e) => {
            out.push(TAG_ERR);
            encode_error(&mut out, e);
        }
        Message::Panicked(s) => {
            out.push(TAG_PANICKED);
            put_str(&mut out, s);
        }
    }
    out
}

fn encode_error(out: &mut Vec<u8>, e: &Error) {
    let e = match e {
        Error::Confinement { step, source } => {
            out.push(E_CONFINEMENT);
            put_str(out, step);
            put_io(out, source);
            return;
        }
        Error::ChildDied { how } => {
            out.push(E_CHILD_DIED);
            put_str(out, how);
            return;
        }
        Error::Archive(e) => e,
    };
    match e {
        ArchiveError::Io { op, path, source } => {
            out.push(E_IO);
            put_str(out, op);
            put_bytes(out, path.as_os_str().as_bytes());
            put_io(out, source);
        }
        ArchiveError::Stream { op, source } => {
            out.push(E_STREAM);
            put_str(out, op);
            put_io(out, source);
        }
        ArchiveError::BadEntry { entry, reason } => {
            out.push(E_BAD_ENTRY);
            put_str(out, entry);
            put_str(out, reason);
        }
        ArchiveError::Malformed { entry, reason } => {
            out.push(E_MALFORMED);
            match entry {
                Some(entry) => {
                    out.push(1);
                    put_str(out, entry);
                }
                None => out.push(0),
            }
            put_str(out, reason);
        }
        ArchiveError::LimitExceeded { what, limit } => {
            out.push(E_LIMIT);
            put_str(out, what);
            out.extend_from_slice(&limit.to_le_bytes());
        }
        ArchiveError::UnknownFormat { magic } => {
            out.push(E_UNKNOWN_FORMAT);
            put_bytes(out, magic);
        }
        other => {
            out.push(E_OTHER);
            put_str(out, &other.to_string());
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(MAX_FIELD)];
    // `b.len() <= MAX_FIELD` fits in u32.
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_bytes(out, s.get(..end).unwrap_or_default().as_bytes());
}

fn put_io(out: &mut Vec<u8>, e: &io::Error) {
    match e.raw_os_error() {
        Some(errno) => {
            out.push(1);
            out.extend_from_slice(&errno.to_le_bytes());
        }
        None => {
            out.push(0);
            let kind = KINDS.iter().position(|k| *k == e.kind()).unwrap_or(0);
            // KINDS has fewer than 256 entries.
            out.push(kind as u8);
            put_str(out, &e.to_string());
        }
    }
}

/// Decodes a message written by [`encode`]. The bytes are untrusted: every problem is an
/// `Err` describing what was expected and what was found.
pub(crate) fn decode(buf: &[u8]) -> Result<Message, String> {
    let mut r = Cursor { buf, pos: 0 };
    let magic = r.take(4)?;
    if magic != MAGIC {
        return Err(format!("expected magic {MAGIC:02x?}, found {magic:02x?}"));
    }
    let msg = match r.u8()? {
        TAG_OK => {
            let bytes = r.u64()?;
            let by = match r.u8()? {
                0 => ConfinedBy::PivotRoot,
                1 => ConfinedBy::Chroot,
                t => return Err(format!("expected confinement 0 or 1, found {t}")),
            };
            let skipped_count = r.u64()?;
            let listed = u32::from_le_bytes(r.array()?) as usize;
            if listed > archive::MAX_SKIPPED || listed as u64 > skipped_count {
                return Err(format!(
                    "expected at most {} listed skipped entries and no more than their count {skipped_count}, found {listed}",
                    archive::MAX_SKIPPED
                ));
            }
            let mut skipped = Vec::with_capacity(listed);
            for _ in 0..listed {
                let path = PathBuf::from(OsStr::from_bytes(r.bytes()?));
                skipped.push((path, r.string()?));
            }
            Message::Ok {
                bytes,
                skipped,
                skipped_count,
                by,
            }
        }
        TAG_ERR => Message::Err(decode_error(&mut r)?),
        TAG_PANICKED => Message::Panicked(r.string()?),
        t => return Err(format!("expected message tag 0, 1 or 2, found {t}")),
    };
    if r.pos != buf.len() {
        return Err(format!(
            "expected {} bytes, found {} trailing",
            r.pos,
            buf.len() - r.pos
        ));
    }
    Ok(msg)
}

fn decode_error(r: &mut Cursor<'_>) -> Result<Error, String> {
    let archive = Error::Archive;
    Ok(match r.u8()? {
        E_IO => {
            let op = r.string()?;
            let path = PathBuf::from(OsStr::from_bytes(r.bytes()?));
            let source = r.io()?;
            archive(ArchiveError::Io { op, path, source })
        }
        E_BAD_ENTRY => {
            let entry = r.string()?;
            let reason = r.string()?;
            archive(ArchiveError::BadEntry { entry, reason })
        }
        E_MALFORMED => {
            let entry = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                t => return Err(format!("expected option tag 0 or 1, found {t}")),
            };
            let reason = r.string()?;
            archive(ArchiveError::Malformed { entry, reason })
        }
        E_LIMIT => {
            let what = r.string()?;
            let limit = r.u64()?;
            archive(ArchiveError::LimitExceeded { what, limit })
        }
        E_UNKNOWN_FORMAT => archive(ArchiveError::UnknownFormat {
            magic: r.bytes()?.to_vec(),
        }),
        E_CONFINEMENT => {
            let step = r.string()?;
            let source = r.io()?;
            Error::Confinement { step, source }
        }
        E_CHILD_DIED => Error::ChildDied { how: r.string()? },
        E_STREAM => {
            let op = r.string()?;
            let source = r.io()?;
            archive(ArchiveError::Stream { op, source })
        }
        E_OTHER => archive(ArchiveError::io(
            "apply layer",
            "",
            io::Error::other(r.string()?),
        )),
        t => return Err(format!("expected an error tag, found {t}")),
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|end| *end <= self.buf.len());
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(format!(
                "expected {n} more bytes at offset {}, found {}",
                self.pos,
                self.buf.len().saturating_sub(self.pos)
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        if len > MAX_FIELD {
            return Err(format!(
                "expected a field of at most {MAX_FIELD} bytes, found {len}"
            ));
        }
        self.take(len)
    }

    fn string(&mut self) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }

    fn io(&mut self) -> Result<io::Error, String> {
        match self.u8()? {
            1 => Ok(io::Error::from_raw_os_error(i32::from_le_bytes(
                self.array()?,
            ))),
            0 => {
                let kind = self.u8()?;
                let kind = KINDS
                    .get(usize::from(kind))
                    .copied()
                    .unwrap_or(io::ErrorKind::Other);
                Ok(io::Error::new(kind, self.string()?))
            }
            t => Err(format!("expected io error tag 0 or 1, found {t}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: Error) {
        let want = e.to_string();
        let errno = e.errno();
        let bytes = encode(&Message::Err(e));
        match decode(&bytes) {
            Ok(Message::Err(got)) => {
                assert_eq!(got.to_string(), want);
                assert_eq!(got.errno(), errno);
            }
            other => panic!("expected an error, found {other:?}"),
        }
    }

    #[test]
    fn every_variant_round_trips() {
        round_trip(Error::from(ArchiveError::io(
            "mknod",
            "a/b\u{e9}",
            io::Error::from_raw_os_error(libc::ENOSPC),
        )));
        round_trip(Error::from(ArchiveError::io(
            "read",
            "x",
            io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
        )));
        round_trip(ArchiveError::bad_entry("../x", "leaves the target").into());
        round_trip(Error::Archive(ArchiveError::Stream {
            op: "read".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        }));
        round_trip(Error::Archive(ArchiveError::Malformed {
            entry: Some("e".into()),
            reason: "bad checksum".into(),
        }));
        round_trip(Error::Archive(ArchiveError::Malformed {
            entry: None,
            reason: "truncated".into(),
        }));
        round_trip(Error::Archive(ArchiveError::LimitExceeded {
            what: "max_entries".into(),
            limit: 7,
        }));
        round_trip(Error::Archive(ArchiveError::UnknownFormat {
            magic: vec![1, 2, 3],
        }));
        round_trip(Error::Confinement {
            step: "pivot_root".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        });
        round_trip(Error::ChildDied {
            how: "was killed by signal SIGKILL".into(),
        });
    }

    #[test]
    fn io_kind_survives_without_errno() {
        let e = Error::io(
            "read",
            "p",
            io::Error::new(io::ErrorKind::InvalidData, "bad"),
        );
        match decode(&encode(&Message::Err(e))) {
            Ok(Message::Err(Error::Archive(ArchiveError::Io { source, .. }))) => {
                assert_eq!(source.kind(), io::ErrorKind::InvalidData);
            }
            other => panic!("expected an io error, found {other:?}"),
        }
    }

    #[test]
    fn ok_and_panicked_round_trip() {
        let skipped = vec![
            (
                PathBuf::from("dev/null"),
                "char device 1/3 not created".to_owned(),
            ),
            (PathBuf::from("a\u{e9}/b"), "why".to_owned()),
        ];
        match decode(&encode(&Message::Ok {
            bytes: 42,
            skipped: skipped.clone(),
            skipped_count: 3,
            by: ConfinedBy::Chroot,
        })) {
            Ok(Message::Ok {
                bytes,
                skipped: got,
                skipped_count,
                by,
            }) => {
                assert_eq!(bytes, 42);
                assert_eq!(got, skipped);
                assert_eq!(skipped_count, 3);
                assert_eq!(by, ConfinedBy::Chroot);
            }
            other => panic!("expected ok, found {other:?}"),
        }
        match decode(&encode(&Message::Panicked("boom".into()))) {
            Ok(Message::Panicked(m)) => assert_eq!(m, "boom"),
            other => panic!("expected panicked, found {other:?}"),
        }
    }

    #[test]
    fn long_fields_are_cut_at_char_boundaries() {
        let long = "é".repeat(MAX_FIELD);
        match decode(&encode(&Message::Panicked(long))) {
            Ok(Message::Panicked(m)) => {
                assert!(m.len() <= MAX_FIELD);
                assert!(m.chars().all(|c| c == 'é'));
            }
            other => panic!("expected panicked, found {other:?}"),
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&with_magic);
        }

        #[test]
        fn truncated_messages_are_errors(cut in 0usize..40) {
            let full = encode(&Message::Err(ArchiveError::bad_entry("entry", "reason").into()));
            if cut < full.len() {
                proptest::prop_assert!(decode(&full[..cut]).is_err());
            }
        }
    }
}
