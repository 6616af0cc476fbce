//! Reference trees: copying and comparing plain directories.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode};

use archive::compare::{CompareOptions, differences, snapshot};

use super::Outcome;

/// Copies the tree `src` to the new directory `dst`, keeping everything the comparison looks
/// at (types, modes, owners, contents, symlinks, devices, hardlink groups, xattrs, mtimes).
///
/// Written with plain `std::fs` and `rustix` calls, one entry at a time, and deliberately not
/// through `archive`: the reference trees must not share the code under test, or an attribute
/// that our tar round trip loses both ways would be invisible. The root's mode, owner and
/// xattrs are copied too; its mtime is not (see the module docs).
pub fn copy_tree(src: &Path, dst: &Path) -> Outcome {
    fs::create_dir(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    let mut copier = Copier::default();
    copier.dir_contents(src, dst)?;
    let md = fs::symlink_metadata(src).map_err(|e| format!("lstat {}: {e}", src.display()))?;
    copy_metadata(src, dst, &md)?;
    // Directory times last, deepest first: creating entries in a directory changes its mtime.
    for (path, md) in copier.dirs.iter().rev() {
        set_times(path, md)?;
    }
    Ok(())
}

/// State of one [`copy_tree`]: the first copy of each multiply-linked inode, and the
/// directories whose times are set at the end.
#[derive(Default)]
struct Copier {
    links: HashMap<(u64, u64), PathBuf>,
    dirs: Vec<(PathBuf, fs::Metadata)>,
}

impl Copier {
    fn dir_contents(&mut self, src: &Path, dst: &Path) -> Outcome {
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(|e| format!("read directory {}: {e}", src.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| format!("read directory {}: {e}", src.display()))?;
        names.sort();
        for name in names {
            self.entry(&src.join(&name), &dst.join(&name))?;
        }
        Ok(())
    }

    fn entry(&mut self, src: &Path, dst: &Path) -> Outcome {
        let md = fs::symlink_metadata(src).map_err(|e| format!("lstat {}: {e}", src.display()))?;
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                return fs::hard_link(first, dst)
                    .map_err(|e| format!("link {} to {}: {e}", dst.display(), first.display()));
            }
            self.links.insert((md.dev(), md.ino()), dst.to_path_buf());
        }
        let made = if ft.is_dir() {
            fs::create_dir(dst).and_then(|()| {
                // Writable while it is filled, whatever its final mode.
                fs::set_permissions(dst, fs::Permissions::from_mode(0o700))
            })
        } else if ft.is_file() {
            fs::copy(src, dst).map(drop)
        } else if ft.is_symlink() {
            fs::read_link(src).and_then(|target| std::os::unix::fs::symlink(target, dst))
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                FileType::Fifo
            } else if ft.is_char_device() {
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else {
                FileType::Socket
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                dst,
                kind,
                Mode::from_raw_mode(md.mode() & 0o7777),
                md.rdev(),
            )
            .map_err(std::io::Error::from)
        };
        made.map_err(|e| format!("copy {} to {}: {e}", src.display(), dst.display()))?;
        if ft.is_dir() {
            self.dir_contents(src, dst)?;
            copy_metadata(src, dst, &md)?;
            self.dirs.push((dst.to_path_buf(), md));
            return Ok(());
        }
        copy_metadata(src, dst, &md)?;
        set_times(dst, &md)
    }
}

/// Owner (as root), then mode (a chown clears set-id bits), then xattrs (a chown clears
/// `security.capability`) of `src` onto `dst`, not following symlinks.
fn copy_metadata(src: &Path, dst: &Path, md: &fs::Metadata) -> Outcome {
    if super::is_root() {
        std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))
            .map_err(|e| format!("chown {}: {e}", dst.display()))?;
    }
    if !md.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(|e| format!("chmod {}: {e}", dst.display()))?;
    }
    for (name, value) in xattrs(src)? {
        xattr::set(dst, &name, &value)
            .map_err(|e| format!("setxattr {name:?} on {}: {e}", dst.display()))?;
    }
    Ok(())
}

/// Every extended attribute of `p` (not following a symlink), by name, read with the `xattr`
/// crate (not our own xattr code); none where the filesystem has no xattrs.
fn xattrs(p: &Path) -> Outcome<Vec<(std::ffi::OsString, Vec<u8>)>> {
    let names = match xattr::list(p) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return Ok(Vec::new()),
        Err(e) => return Err(format!("listxattr {}: {e}", p.display())),
    };
    let mut out = Vec::new();
    for name in names {
        // A name listed a moment ago has no value now only if something removed it meanwhile.
        if let Some(value) = xattr::get(p, &name)
            .map_err(|e| format!("getxattr {name:?} of {}: {e}", p.display()))?
        {
            out.push((name, value));
        }
    }
    Ok(out)
}

/// Sets `dst`'s access and modification times to `md`'s, to the nanosecond, not following a
/// symlink.
fn set_times(dst: &Path, md: &fs::Metadata) -> Outcome {
    let ts = |sec: i64, nsec: i64| rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts(md.atime(), md.atime_nsec()),
        last_modification: ts(md.mtime(), md.mtime_nsec()),
    };
    rustix::fs::utimensat(rustix::fs::CWD, dst, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| format!("set times of {}: {e}", dst.display()))
}

/// Compares the tree `actual` with the reference `expected`: every path with every option of
/// `archive::compare` (type, mode, owner, size, content, symlink target, rdev, hardlink group,
/// xattrs, file and directory mtimes); for the root itself mode, owner and xattrs but not the
/// mtime. `Err` lists every difference, one per line.
pub fn compare_trees(expected: &Path, actual: &Path) -> Outcome {
    let e = snapshot(expected).map_err(|err| format!("snapshot {}: {err}", expected.display()))?;
    let a = snapshot(actual).map_err(|err| format!("snapshot {}: {err}", actual.display()))?;
    let opts = CompareOptions {
        root_metadata: false,
        ..CompareOptions::default()
    };
    let mut diffs = differences(&e, &a, &opts);
    if let Err(root) = compare_trees_root(&e, &a) {
        diffs.push(root);
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

/// Like [`compare_trees`], but directory mtimes are compared only for the directories in
/// `dirs_with_mtime` (paths written `/a/b`). For trees rebuilt from a diff: the change rules
/// (moby's) ignore a directory whose only difference is its mtime, so no diff carries it.
pub fn compare_trees_for_diff(
    expected: &Path,
    actual: &Path,
    dirs_with_mtime: &[&Path],
    hardlinks: bool,
) -> Outcome {
    let e = snapshot(expected).map_err(|err| format!("snapshot {}: {err}", expected.display()))?;
    let a = snapshot(actual).map_err(|err| format!("snapshot {}: {err}", actual.display()))?;
    let opts = CompareOptions {
        root_metadata: false,
        dir_mtimes: false,
        ..CompareOptions::default()
    };
    let mut diffs = differences(&e, &a, &opts);
    if !hardlinks {
        diffs.retain(|d| !d.contains(": hardlink group expected"));
    }
    for p in dirs_with_mtime {
        if let (Some(x), Some(y)) = (e.get(p), a.get(p))
            && x.kind == archive::compare::Kind::Dir
            && x.mtime != y.mtime
        {
            diffs.push(format!(
                "{}: mtime expected {}, found {}",
                p.display(),
                x.mtime,
                y.mtime
            ));
        }
    }
    if let Err(root) = compare_trees_root(&e, &a) {
        diffs.push(root);
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

fn compare_trees_root(e: &archive::compare::Snapshot, a: &archive::compare::Snapshot) -> Outcome {
    let mut diffs = Vec::new();
    if let (Some(re), Some(ra)) = (e.get("/"), a.get("/")) {
        if re.mode != ra.mode {
            diffs.push(format!(
                "/: mode expected {:04o}, found {:04o}",
                re.mode, ra.mode
            ));
        }
        if (re.uid, re.gid) != (ra.uid, ra.gid) {
            diffs.push(format!(
                "/: owner expected {}:{}, found {}:{}",
                re.uid, re.gid, ra.uid, ra.gid
            ));
        }
        if re.xattrs != ra.xattrs {
            diffs.push(format!(
                "/: xattrs expected {:?}, found {:?}",
                re.xattrs, ra.xattrs
            ));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{PermissionsExt, symlink};

    use rustix::fs::XattrFlags;

    use super::*;

    /// Every kind of entry and attribute the comparison looks at survives the copy; the copy is
    /// then compared with the same strict comparison the suite uses.
    #[test]
    fn copy_keeps_everything_the_comparison_sees() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/f"), b"data").unwrap();
        fs::hard_link(src.join("d/f"), src.join("d/e/link")).unwrap();
        fs::write(src.join("setuid"), b"x").unwrap();
        fs::set_permissions(src.join("setuid"), fs::Permissions::from_mode(0o4750)).unwrap();
        symlink("../nowhere", src.join("d/sym")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        let user_xattrs = rustix::fs::lsetxattr(
            src.join("d/f").as_path(),
            c"user.test",
            b"v",
            XattrFlags::empty(),
        )
        .is_ok();
        if crate::is_root() {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                src.join("null").as_path(),
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(1, 3),
            )
            .unwrap();
            std::os::unix::fs::lchown(src.join("d/sym"), Some(7), Some(8)).unwrap();
            std::os::unix::fs::chown(src.join("d/e"), Some(1), Some(2)).unwrap();
            rustix::fs::lsetxattr(
                src.join("d/sym").as_path(),
                c"trusted.on-a-symlink",
                b"t",
                XattrFlags::empty(),
            )
            .unwrap();
        }
        fs::set_permissions(src.join("d/e"), fs::Permissions::from_mode(0o555)).unwrap();
        let stamp = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 5,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_100_000_000,
                tv_nsec: 123_456_789,
            },
        };
        for p in ["d/f", "d/sym", "fifo", "d/e", "d"] {
            rustix::fs::utimensat(
                rustix::fs::CWD,
                src.join(p).as_path(),
                &stamp,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        let dst = t.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        compare_trees(&src, &dst).unwrap();
        let copied = fs::symlink_metadata(dst.join("d/f")).unwrap();
        assert_eq!(copied.mtime_nsec(), 123_456_789);
        assert_eq!(
            copied.ino(),
            fs::metadata(dst.join("d/e/link")).unwrap().ino()
        );
        assert_eq!(
            fs::metadata(dst.join("setuid")).unwrap().mode() & 0o7777,
            0o4750
        );
        if user_xattrs {
            assert_eq!(xattrs(&dst.join("d/f")).unwrap().len(), 1);
        }
        // The comparison has teeth: a changed mtime is seen.
        rustix::fs::utimensat(
            rustix::fs::CWD,
            dst.join("d/f").as_path(),
            &rustix::fs::Timestamps {
                last_access: stamp.last_access,
                last_modification: stamp.last_access,
            },
            AtFlags::empty(),
        )
        .unwrap();
        assert!(compare_trees(&src, &dst).is_err());
    }
}
