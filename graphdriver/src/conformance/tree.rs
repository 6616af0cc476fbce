//! Reference trees: copying and comparing plain directories.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use archive::compare::{CompareOptions, differences, snapshot};

use super::Outcome;

/// Copies the tree `src` to the new directory `dst`, keeping everything the comparison looks
/// at (types, modes, owners, contents, symlinks, devices, hardlink groups, xattrs, mtimes) —
/// by streaming it through `archive::tar_tree` and `archive::untar`. The root's mode, owner and
/// xattrs are copied too; its mtime is not (see the module docs).
pub fn copy_tree(src: &Path, dst: &Path) -> Outcome {
    fs::create_dir(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    let md = fs::symlink_metadata(src).map_err(|e| format!("lstat {}: {e}", src.display()))?;
    if super::is_root() {
        std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))
            .map_err(|e| format!("chown {}: {e}", dst.display()))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", dst.display()))?;
    for (name, value) in root_xattrs(src)? {
        rustix::fs::lsetxattr(dst, name.as_str(), &value, rustix::fs::XattrFlags::empty())
            .map_err(|e| format!("setxattr {name} on {}: {e}", dst.display()))?;
    }
    let tar = archive::tar_tree(src, &archive::TarOptions::default())
        .map_err(|e| format!("tar {}: {e}", src.display()))?;
    archive::untar(dst, tar, &archive::TarOptions::default())
        .map_err(|e| format!("copy {} to {}: {e}", src.display(), dst.display()))
}

/// The root's xattrs as the comparator records them (reference trees are small, so a
/// snapshot is cheap).
fn root_xattrs(p: &Path) -> Outcome<Vec<(String, Vec<u8>)>> {
    let s = snapshot(p).map_err(|e| format!("snapshot {}: {e}", p.display()))?;
    Ok(s.get("/").map(|e| e.xattrs.clone()).unwrap_or_default())
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
        if let (Some(x), Some(y)) = (e.get(p), a.get(p)) {
            if x.kind == archive::compare::Kind::Dir && x.mtime != y.mtime {
                diffs.push(format!(
                    "{}: mtime expected {}, found {}",
                    p.display(),
                    x.mtime,
                    y.mtime
                ));
            }
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
