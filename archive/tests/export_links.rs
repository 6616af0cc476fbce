//! `export_changes` keeps hardlinks between changed names and names outside the change list.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use archive::{
    ApplyOptions, Change, ChangeKind, TarOptions, apply_layer, changes, changes_size,
    export_changes,
};

/// (path, entry type, link target) of every entry of an archive, and the data of regular ones.
fn entries(r: impl Read) -> Vec<(String, tar::EntryType, Option<String>, Vec<u8>)> {
    let mut ar = tar::Archive::new(r);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let kind = e.header().entry_type();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((path, kind, link, data));
    }
    out
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn ino(p: &Path) -> (u64, u64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.dev(), m.ino())
}

/// Parent tree, child tree (built by `make_child` from a copy of the parent) and a second copy
/// of the parent to apply the diff onto.
struct Case {
    _t: tempfile::TempDir,
    parent: PathBuf,
    child: PathBuf,
    target: PathBuf,
}

fn case(make_parent: impl FnOnce(&Path), make_child: impl FnOnce(&Path)) -> Case {
    let t = tempfile::tempdir().unwrap();
    let parent = t.path().join("parent");
    fs::create_dir(&parent).unwrap();
    make_parent(&parent);
    let child = t.path().join("child");
    let target = t.path().join("target");
    cp_a(&parent, &child);
    cp_a(&parent, &target);
    make_child(&child);
    Case {
        _t: t,
        parent,
        child,
        target,
    }
}

fn ch(kind: ChangeKind, p: &str) -> Change {
    Change {
        path: PathBuf::from(p),
        kind,
    }
}

/// Exports `list` from the child, applies it onto the target, and checks that the bytes
/// applied equal `changes_size`. Returns the entries of the export.
fn export_apply(
    c: &Case,
    list: &[Change],
) -> Vec<(String, tar::EntryType, Option<String>, Vec<u8>)> {
    let mut bytes = Vec::new();
    export_changes(&c.child, list, &TarOptions::default())
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let applied = apply_layer(&c.target, &bytes[..], &ApplyOptions::default()).unwrap();
    assert_eq!(applied, changes_size(&c.child, list).unwrap(), "{list:?}");
    entries(&bytes[..])
}

/// A new name B for a lower inode whose name A is unchanged: only B (and its directory) is in
/// the change list, the export links B to A, and the applied tree has A and B sharing an inode.
#[test]
fn new_name_links_to_unchanged_name() {
    let c = case(
        |p| {
            fs::write(p.join("A"), b"hello").unwrap();
            fs::create_dir(p.join("sub")).unwrap();
        },
        |c| fs::hard_link(c.join("A"), c.join("sub/B")).unwrap(),
    );
    let list = changes(&c.child, Some(&c.parent)).unwrap();
    assert_eq!(
        list,
        [
            ch(ChangeKind::Modify, "/sub"),
            ch(ChangeKind::Add, "/sub/B")
        ]
    );
    assert_eq!(changes_size(&c.child, &list).unwrap(), 0);
    let es = export_apply(&c, &list);
    assert_eq!(es.len(), 2, "{es:?}");
    assert_eq!(es[0].0, "sub/");
    assert_eq!(
        (es[1].0.as_str(), es[1].1, es[1].2.as_deref()),
        ("sub/B", tar::EntryType::Link, Some("A"))
    );
    assert_eq!(ino(&c.target.join("A")), ino(&c.target.join("sub/B")));
    assert_eq!(fs::read(c.target.join("sub/B")).unwrap(), b"hello");
    assert_eq!(fs::metadata(c.target.join("A")).unwrap().nlink(), 2);
    assert!(changes(&c.target, Some(&c.child)).unwrap().is_empty());
}

/// An inode with two unchanged names (`y`, `d/x`) gains two new names and one replaced name
/// (`c`, a separate file in the parent): every changed name links to the bytewise-smallest
/// unchanged one, `d/x`, and the applied tree has one inode with all five names.
#[test]
fn several_names_link_to_smallest_unchanged_name() {
    let c = case(
        |p| {
            fs::create_dir(p.join("d")).unwrap();
            fs::write(p.join("y"), b"shared").unwrap();
            fs::hard_link(p.join("y"), p.join("d/x")).unwrap();
            fs::write(p.join("c"), b"other content").unwrap();
        },
        |c| {
            fs::create_dir(c.join("e")).unwrap();
            fs::hard_link(c.join("y"), c.join("e/new2")).unwrap();
            fs::hard_link(c.join("y"), c.join("new1")).unwrap();
            fs::remove_file(c.join("c")).unwrap();
            fs::hard_link(c.join("y"), c.join("c")).unwrap();
        },
    );
    let list = changes(&c.child, Some(&c.parent)).unwrap();
    let names: Vec<&Path> = list.iter().map(|c| c.path.as_path()).collect();
    assert_eq!(
        names,
        [
            Path::new("/c"),
            Path::new("/e"),
            Path::new("/e/new2"),
            Path::new("/new1")
        ]
    );
    let es = export_apply(&c, &list);
    let links: Vec<(&str, Option<&str>)> = es
        .iter()
        .filter(|e| e.1 == tar::EntryType::Link)
        .map(|e| (e.0.as_str(), e.2.as_deref()))
        .collect();
    assert_eq!(
        links,
        [
            ("c", Some("d/x")),
            ("e/new2", Some("d/x")),
            ("new1", Some("d/x"))
        ]
    );
    assert!(es.iter().all(|e| e.1 != tar::EntryType::Regular), "{es:?}");
    let want = ino(&c.target.join("y"));
    for n in ["d/x", "c", "e/new2", "new1"] {
        assert_eq!(ino(&c.target.join(n)), want, "{n}");
        assert_eq!(fs::read(c.target.join(n)).unwrap(), b"shared", "{n}");
    }
    assert_eq!(fs::metadata(c.target.join("y")).unwrap().nlink(), 5);
    assert!(changes(&c.target, Some(&c.child)).unwrap().is_empty());
}

/// The unchanged name is deeper than the walk holds directory descriptors for: found anyway.
#[test]
fn unchanged_name_deep_in_the_tree_is_found() {
    let deep: PathBuf = std::iter::repeat_n("d", 48).collect();
    let c = case(
        |p| {
            fs::create_dir_all(p.join(&deep)).unwrap();
            fs::write(p.join(&deep).join("A"), b"deep").unwrap();
        },
        |c| fs::hard_link(c.join(&deep).join("A"), c.join("B")).unwrap(),
    );
    let list = changes(&c.child, Some(&c.parent)).unwrap();
    assert_eq!(list, [ch(ChangeKind::Add, "/B")]);
    let es = export_apply(&c, &list);
    let want = deep.join("A").to_str().unwrap().to_string();
    assert_eq!(es.len(), 1);
    assert_eq!(
        (es[0].0.as_str(), es[0].1, es[0].2.as_deref()),
        ("B", tar::EntryType::Link, Some(want.as_str()))
    );
    assert_eq!(
        ino(&c.target.join("B")),
        ino(&c.target.join(&deep).join("A"))
    );
}

/// The other name was renamed in the same layer (it is in the list as an `Add` plus a
/// `Delete`): nothing outside the list to link to, so the first exported name is written in
/// full and the other links to it.
#[test]
fn other_name_renamed_in_the_layer_is_not_a_target() {
    let c = case(
        |p| fs::write(p.join("A"), b"moved").unwrap(),
        |c| {
            fs::rename(c.join("A"), c.join("A2")).unwrap();
            fs::hard_link(c.join("A2"), c.join("B")).unwrap();
        },
    );
    let list = changes(&c.child, Some(&c.parent)).unwrap();
    assert_eq!(
        list,
        [
            ch(ChangeKind::Delete, "/A"),
            ch(ChangeKind::Add, "/A2"),
            ch(ChangeKind::Add, "/B")
        ]
    );
    let es = export_apply(&c, &list);
    let got: Vec<(&str, tar::EntryType, Option<&str>)> = es
        .iter()
        .map(|e| (e.0.as_str(), e.1, e.2.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (".wh.A", tar::EntryType::Regular, None),
            ("A2", tar::EntryType::Regular, None),
            ("B", tar::EntryType::Link, Some("A2")),
        ]
    );
    assert!(!c.target.join("A").exists());
    assert_eq!(ino(&c.target.join("A2")), ino(&c.target.join("B")));
    assert_eq!(fs::read(c.target.join("B")).unwrap(), b"moved");
}

/// The only other name is deleted by the layer — listed as a `Delete` itself, or under a
/// deleted directory (a list that does not match the tree, as a caller may pass): never a link
/// target, the file falls back to a full copy.
#[test]
fn other_name_deleted_by_the_layer_falls_back_to_a_copy() {
    for (other, deleted) in [("A", "/A"), ("old/A", "/old")] {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("old")).unwrap();
        fs::write(root.join(other), b"data").unwrap();
        fs::hard_link(root.join(other), root.join("B")).unwrap();
        let list = [ch(ChangeKind::Add, "/B"), ch(ChangeKind::Delete, deleted)];
        let es = entries(export_changes(root, &list, &TarOptions::default()).unwrap());
        let b = es.iter().find(|e| e.0 == "B").unwrap();
        assert_eq!(
            (b.1, b.3.as_slice()),
            (tar::EntryType::Regular, &b"data"[..]),
            "{other}"
        );
        assert_eq!(changes_size(root, &list).unwrap(), 4, "{other}");
    }
}

/// A name under an added directory is new too (even when a caller's list omits it): not a
/// target. A name under a merely modified directory is.
#[test]
fn names_under_added_directories_are_not_targets() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    for d in ["added", "modified"] {
        fs::create_dir(root.join(d)).unwrap();
        fs::write(root.join(d).join("A"), d).unwrap();
        fs::hard_link(root.join(d).join("A"), root.join(format!("{d}-B"))).unwrap();
    }
    let list = [
        ch(ChangeKind::Add, "/added"),
        ch(ChangeKind::Add, "/added-B"),
        ch(ChangeKind::Modify, "/modified"),
        ch(ChangeKind::Add, "/modified-B"),
    ];
    let es = entries(export_changes(root, &list, &TarOptions::default()).unwrap());
    let got: Vec<(&str, tar::EntryType, Option<&str>)> = es
        .iter()
        .map(|e| (e.0.as_str(), e.1, e.2.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("added/", tar::EntryType::Directory, None),
            ("added-B", tar::EntryType::Regular, None),
            ("modified/", tar::EntryType::Directory, None),
            ("modified-B", tar::EntryType::Link, Some("modified/A")),
        ]
    );
}
