//! `changes`, `changes_size`: kinds, ordering, the same-second rule and hardlink-copied trees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use archive::{Change, ChangeKind, changes, changes_size};
use filetime::FileTime;

fn c(kind: char, p: &str) -> Change {
    let kind = match kind {
        'A' => ChangeKind::Add,
        'C' => ChangeKind::Modify,
        'D' => ChangeKind::Delete,
        _ => unreachable!(),
    };
    Change {
        path: PathBuf::from(p),
        kind,
    }
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

/// Copies `src` to `dst` the way image drivers build a child: a new directory (same mode and
/// owner) per directory, a hardlink per everything else.
fn hardlink_copy(src: &Path, dst: &Path) {
    let md = fs::symlink_metadata(src).unwrap();
    fs::create_dir(dst).unwrap();
    fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777)).unwrap();
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid())).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            hardlink_copy(&s, &d);
        } else {
            fs::hard_link(&s, &d).unwrap();
        }
    }
}

/// Replaces the hardlink at `p` with an independent copy with the same metadata (mtime to the
/// nanosecond), so it can be changed without touching the other tree.
fn unshare(p: &Path) {
    let md = fs::symlink_metadata(p).unwrap();
    let data = fs::read(p).unwrap();
    fs::remove_file(p).unwrap();
    fs::write(p, &data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(md.mode() & 0o7777)).unwrap();
    std::os::unix::fs::lchown(p, Some(md.uid()), Some(md.gid())).unwrap();
    filetime::set_file_mtime(p, FileTime::from_last_modification_time(&md)).unwrap();
}

/// A base tree: /a/{f1,f2}, /b, /c/x/y, /c/z, /d, /l -> d.
fn base(root: &Path) {
    write(&root.join("a/f1"), b"one");
    write(&root.join("a/f2"), b"two");
    write(&root.join("b"), b"bee");
    write(&root.join("c/x/y"), b"why");
    write(&root.join("c/z"), b"zed");
    write(&root.join("d"), b"dee");
    symlink("d", root.join("l")).unwrap();
}

fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let old = t.path().join("old");
    let new = t.path().join("new");
    fs::create_dir(&old).unwrap();
    base(&old);
    hardlink_copy(&old, &new);
    (t, old, new)
}

#[test]
fn identical_hardlinked_tree_has_no_changes() {
    let (_t, old, new) = pair();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![]);
}

#[test]
fn kinds_order_parent_once_and_deleted_dir_once() {
    let (_t, old, new) = pair();
    write(&new.join("a/new1"), b"n1");
    write(&new.join("a/new2"), b"n2");
    fs::remove_file(new.join("b")).unwrap();
    write(&new.join("b"), b"bee but longer");
    fs::remove_dir_all(new.join("c")).unwrap();
    write(&new.join("e/f"), b"f");
    write(&new.join("e/g/h"), b"h");
    let got = changes(&new, Some(&old)).unwrap();
    assert_eq!(
        got,
        vec![
            c('C', "/a"),
            c('A', "/a/new1"),
            c('A', "/a/new2"),
            c('C', "/b"),
            c('D', "/c"),
            c('A', "/e"),
            c('A', "/e/f"),
            c('A', "/e/g"),
            c('A', "/e/g/h"),
        ]
    );
    let shown: Vec<String> = got.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown[0], "C /a");
}

#[test]
fn deep_change_reports_every_ancestor_once_before_it() {
    let (_t, old, new) = pair();
    fs::remove_file(new.join("c/x/y")).unwrap();
    assert_eq!(
        changes(&new, Some(&old)).unwrap(),
        vec![c('C', "/c"), c('C', "/c/x"), c('D', "/c/x/y")]
    );
}

#[test]
fn type_changes() {
    let (_t, old, new) = pair();
    // file -> dir
    fs::remove_file(new.join("b")).unwrap();
    write(&new.join("b/inner"), b"i");
    // dir -> file
    fs::remove_dir_all(new.join("c")).unwrap();
    write(&new.join("c"), b"now a file");
    // file -> symlink
    fs::remove_file(new.join("d")).unwrap();
    symlink("b", new.join("d")).unwrap();
    // symlink -> file
    fs::remove_file(new.join("l")).unwrap();
    write(&new.join("l"), b"d");
    assert_eq!(
        changes(&new, Some(&old)).unwrap(),
        vec![
            c('C', "/b"),
            c('A', "/b/inner"),
            c('C', "/c"),
            c('C', "/d"),
            c('C', "/l")
        ]
    );
}

#[test]
fn symlink_target_change_with_same_length() {
    let (_t, old, new) = pair();
    fs::remove_file(new.join("l")).unwrap();
    symlink("b", new.join("l")).unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![c('C', "/l")]);
}

#[test]
fn metadata_changes_mode_owner_capability() {
    let (_t, old, new) = pair();
    // An unshared but otherwise identical copy is not a change.
    unshare(&new.join("a/f1"));
    unshare(&new.join("a/f2"));
    unshare(&new.join("b"));
    unshare(&new.join("d"));
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![]);

    fs::set_permissions(new.join("a/f1"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::lchown(new.join("b"), Some(1234), Some(5678)).unwrap();
    // v2 capability: cap_net_bind_service permitted + effective.
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr::set(new.join("d"), "security.capability", &cap).unwrap();
    fs::set_permissions(new.join("c/x"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        changes(&new, Some(&old)).unwrap(),
        vec![
            c('C', "/a"),
            c('C', "/a/f1"),
            c('C', "/b"),
            c('C', "/c"),
            c('C', "/c/x"),
            c('C', "/d"),
        ]
    );
}

#[test]
fn user_xattrs_alone_are_not_a_change() {
    let (_t, old, new) = pair();
    unshare(&new.join("d"));
    xattr::set(new.join("d"), "user.note", b"hello").unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![]);
}

#[test]
fn directory_mtime_alone_is_ignored() {
    let (_t, old, new) = pair();
    filetime::set_file_mtime(new.join("a"), FileTime::from_unix_time(1_000_000, 0)).unwrap();
    filetime::set_file_mtime(new.join("c/x"), FileTime::from_unix_time(12, 5)).unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![]);
}

#[test]
fn file_mtime_change_is_a_change_but_tar_truncation_is_not() {
    let (_t, old, new) = pair();
    filetime::set_file_mtime(
        old.join("d"),
        FileTime::from_unix_time(1_700_000_000, 123_456_789),
    )
    .unwrap();
    unshare(&new.join("d"));
    unshare(&new.join("b"));
    // Whole seconds on one side only: equal (tar truncation).
    filetime::set_file_mtime(new.join("d"), FileTime::from_unix_time(1_700_000_000, 0)).unwrap();
    // Different seconds: a change.
    filetime::set_file_mtime(new.join("b"), FileTime::from_unix_time(1_600_000_000, 0)).unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![c('C', "/b")]);
    // Same seconds, both non-zero and different nanoseconds: a change.
    filetime::set_file_mtime(new.join("d"), FileTime::from_unix_time(1_700_000_000, 5)).unwrap();
    assert_eq!(
        changes(&new, Some(&old)).unwrap(),
        vec![c('C', "/b"), c('C', "/d")]
    );
}

/// The case moby misses without its sleep: a same-size rewrite within the mtime's tick.
#[test]
fn same_second_same_size_rewrite_is_a_modify() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("old"), t.path().join("new"));
    fs::create_dir(&old).unwrap();
    fs::create_dir(&new).unwrap();
    write(&old.join("f"), b"content-A");
    let mt = FileTime::from_last_modification_time(&fs::metadata(old.join("f")).unwrap());
    // Copy preserving the mtime to the nanosecond.
    fs::copy(old.join("f"), new.join("f")).unwrap();
    filetime::set_file_mtime(new.join("f"), mt).unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![]);
    // Rewrite with the same size and restore the same mtime.
    fs::write(new.join("f"), b"content-B").unwrap();
    filetime::set_file_mtime(new.join("f"), mt).unwrap();
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![c('C', "/f")]);
}

/// Tar-extracted trees (whole-second mtimes on both sides) compare content too.
#[test]
fn zero_nanosecond_mtimes_compare_content() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("old"), t.path().join("new"));
    write(&old.join("f"), b"aaaa");
    write(&new.join("f"), b"bbbb");
    write(&old.join("g"), b"same");
    write(&new.join("g"), b"same");
    for p in [old.join("f"), new.join("f"), old.join("g"), new.join("g")] {
        filetime::set_file_mtime(&p, FileTime::from_unix_time(1_000_000_000, 0)).unwrap();
    }
    assert_eq!(changes(&new, Some(&old)).unwrap(), vec![c('C', "/f")]);
}

#[test]
fn no_parent_means_everything_is_added() {
    let t = tempfile::tempdir().unwrap();
    base(t.path());
    let got = changes(t.path(), None).unwrap();
    let want = [
        "/a", "/a/f1", "/a/f2", "/b", "/c", "/c/x", "/c/x/y", "/c/z", "/d", "/l",
    ];
    assert_eq!(got, want.iter().map(|p| c('A', p)).collect::<Vec<_>>());
}

#[test]
fn changes_size_counts_regular_files_and_hardlinked_inodes_once() {
    let (_t, old, new) = pair();
    write(&new.join("big"), &[7u8; 100]);
    fs::hard_link(new.join("big"), new.join("big2")).unwrap();
    write(&new.join("e/small"), &[1u8; 50]);
    symlink("a-long-symlink-target", new.join("s")).unwrap();
    fs::remove_file(new.join("b")).unwrap();
    let ch = changes(&new, Some(&old)).unwrap();
    assert_eq!(
        ch,
        vec![
            c('D', "/b"),
            c('A', "/big"),
            c('A', "/big2"),
            c('A', "/e"),
            c('A', "/e/small"),
            c('A', "/s"),
        ]
    );
    assert_eq!(changes_size(&new, &ch).unwrap(), 150);
}

/// moby graphtest `Changes`: 20 files in /directory-0 (64 bytes each); in the child every 3rd
/// file (j % 3 == 0) is rewritten with other 64 bytes, j % 3 == 1 adds `file-6-<j>`, j % 3 == 2
/// deletes `file-<j>`: exactly 21 changes including the directory.
#[test]
fn graphtest_changes_twenty_files() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("base"), t.path().join("upper"));
    let content = |seed: usize| -> Vec<u8> { (0..64).map(|k| (seed * 31 + k * 7) as u8).collect() };
    for j in 0..20 {
        write(&old.join(format!("directory-0/file-{j}")), &content(3 + j));
    }
    // A real (not hardlinked) copy preserving mtimes to the nanosecond, as vfs would.
    fs::create_dir_all(new.join("directory-0")).unwrap();
    for j in 0..20 {
        let (s, d) = (
            old.join(format!("directory-0/file-{j}")),
            new.join(format!("directory-0/file-{j}")),
        );
        fs::copy(&s, &d).unwrap();
        let mt = FileTime::from_last_modification_time(&fs::metadata(&s).unwrap());
        filetime::set_file_mtime(&d, mt).unwrap();
    }
    let mut want = vec![c('C', "/directory-0")];
    for j in 0..20 {
        let dir = new.join("directory-0");
        match j % 3 {
            0 => {
                let p = dir.join(format!("file-{j}"));
                let mt = FileTime::from_last_modification_time(&fs::metadata(&p).unwrap());
                fs::write(&p, content(6 + j)).unwrap();
                // Hide the rewrite from a size+mtime comparison.
                filetime::set_file_mtime(&p, mt).unwrap();
                want.push(c('C', &format!("/directory-0/file-{j}")));
            }
            1 => {
                fs::write(dir.join(format!("file-6-{j}")), content(6 + j)).unwrap();
                want.push(c('A', &format!("/directory-0/file-6-{j}")));
            }
            _ => {
                fs::remove_file(dir.join(format!("file-{j}"))).unwrap();
                want.push(c('D', &format!("/directory-0/file-{j}")));
            }
        }
    }
    want.sort();
    let got = changes(&new, Some(&old)).unwrap();
    assert_eq!(got.len(), 21);
    assert_eq!(got, want);
}
