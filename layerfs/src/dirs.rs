//! Reading one directory: sorted entries, `lstat` and `readlink` of a child.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, Dir, FileType, Stat};

/// One entry of a directory as `getdents64(2)` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (one component, never `.` or `..`).
    pub name: CString,
    /// The inode number the directory reports (no `stat` was made).
    pub ino: u64,
    /// The type the directory reports; [`FileType::Unknown`] on filesystems without `d_type`.
    pub file_type: FileType,
}

/// Every entry of the directory open as `dir` except `.` and `..`, sorted bytewise by name.
///
/// Reads from the start of the directory whatever `dir`'s offset was (`getdents64` on a
/// duplicate of the descriptor, rewound), and leaves `dir` usable.
pub fn read_dir_sorted(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let mut d = Dir::read_from(dir)?;
    d.rewind();
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        out.push(DirEntry {
            name: name.to_owned(),
            ino: ent.ino(),
            file_type: ent.file_type(),
        });
    }
    out.sort_unstable_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

/// `lstat` of `name` inside `dir` (`fstatat(2)` with `AT_SYMLINK_NOFOLLOW`).
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

/// The target of the symlink `name` inside `dir` (`readlinkat(2)`), as bytes.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    rustix::fs::readlinkat(dir, name, Vec::new())
        .map(CString::into_bytes)
        .map_err(io::Error::from)
}
