//! `changes_from_overlay_upper` on hand-built upper/lower directories (needs root for mknod and
//! `trusted.*` xattrs; runs whenever root, and must run under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use archive::{Change, ChangeKind, OverlayXattr, changes_from_overlay_upper};

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root and CI=true forbids skipping it"
    );
    eprintln!("skipping: needs root (mknod, trusted.* xattrs)");
    test_support::record_skip("needs root (mknod, trusted.* xattrs)");
    false
}

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
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn whiteout(p: &Path) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0),
        0,
    )
    .unwrap();
}

struct Layers {
    _t: tempfile::TempDir,
    upper: PathBuf,
    lowers: Vec<PathBuf>,
}

fn layers(opaque_ns: OverlayXattr) -> Layers {
    let t = tempfile::tempdir().unwrap();
    let l1 = t.path().join("l1");
    let l0 = t.path().join("l0");
    let up = t.path().join("upper");
    write(&l1.join("etc/passwd"), b"root:x:0:0");
    write(&l1.join("etc/group"), b"root:x:0:");
    write(&l1.join("opt/x/1"), b"1");
    write(&l1.join("opt/x/2"), b"2");
    write(&l1.join("var/log/a"), b"a");
    write(&l0.join("etc/hosts"), b"localhost");
    whiteout(&l0.join("opt/x/2"));
    write(&l0.join("usr/bin/tool"), b"tool");

    write(&up.join("etc/passwd"), b"root:x:0:0\nme:x:1:1");
    write(&up.join("etc/new"), b"new");
    whiteout(&up.join("etc/group"));
    write(&up.join("opt/x/3"), b"3");
    xattr::set(up.join("opt/x"), opaque_ns.opaque_name(), b"y").unwrap();
    fs::create_dir_all(up.join("usr/bin")).unwrap();
    whiteout(&up.join("usr/bin/tool"));
    fs::create_dir_all(up.join("var/log")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(up.join("var/log"), fs::Permissions::from_mode(0o700)).unwrap();
    write(&up.join("newdir/f"), b"f");
    // A copied-up directory with nothing changed in it is not a change.
    fs::create_dir_all(up.join("var")).unwrap();
    Layers {
        _t: t,
        upper: up,
        lowers: vec![l0, l1],
    }
}

fn expected() -> Vec<Change> {
    vec![
        c('C', "/etc"),
        c('D', "/etc/group"),
        c('A', "/etc/new"),
        c('C', "/etc/passwd"),
        c('A', "/newdir"),
        c('A', "/newdir/f"),
        c('C', "/opt"),
        c('C', "/opt/x"),
        c('D', "/opt/x/1"),
        c('A', "/opt/x/3"),
        c('C', "/usr"),
        c('C', "/usr/bin"),
        c('D', "/usr/bin/tool"),
        c('C', "/var"),
        c('C', "/var/log"),
    ]
}

#[test]
fn upper_changes_trusted_namespace() {
    if !root_or_skip() {
        return;
    }
    let l = layers(OverlayXattr::Trusted);
    let got = changes_from_overlay_upper(&l.upper, &l.lowers, OverlayXattr::Trusted).unwrap();
    assert_eq!(got, expected());
}

#[test]
fn upper_changes_user_namespace() {
    if !root_or_skip() {
        return;
    }
    let l = layers(OverlayXattr::User);
    let got = changes_from_overlay_upper(&l.upper, &l.lowers, OverlayXattr::User).unwrap();
    assert_eq!(got, expected());
}

#[test]
fn unchanged_copied_up_directory_is_not_reported() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    write(&lower.join("a/b/c"), b"c");
    fs::create_dir_all(upper.join("a/b")).unwrap();
    let got = changes_from_overlay_upper(&upper, &[lower], OverlayXattr::Trusted).unwrap();
    assert_eq!(got, vec![]);
}

#[test]
fn opaque_directory_without_lower_is_an_add() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    fs::create_dir_all(&lower).unwrap();
    write(&upper.join("d/e"), b"e");
    xattr::set(upper.join("d"), "trusted.overlay.opaque", b"y").unwrap();
    let got = changes_from_overlay_upper(&upper, &[lower], OverlayXattr::Trusted).unwrap();
    assert_eq!(got, vec![c('A', "/d"), c('A', "/d/e")]);
}

#[test]
fn redirect_dir_is_refused() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    write(&lower.join("old/f"), b"f");
    fs::create_dir_all(upper.join("renamed")).unwrap();
    xattr::set(upper.join("renamed"), "trusted.overlay.redirect", b"/old").unwrap();
    let err = changes_from_overlay_upper(&upper, &[lower], OverlayXattr::Trusted).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("trusted.overlay.redirect"), "{msg}");
    assert!(msg.contains("renamed"), "{msg}");
}

/// Builds `levels` nested directories `d/d/…` below `base` with mkdirat (deeper than PATH_MAX
/// as a path), and returns nothing; `leaf` is written in the deepest.
fn deep(base: &Path, levels: usize, leaf: Option<&[u8]>) {
    fs::create_dir_all(base).unwrap();
    let mut fd = rustix::fs::open(
        base,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    for _ in 0..levels {
        match rustix::fs::mkdirat(&fd, "d", rustix::fs::Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("mkdirat: {e}"),
        }
        fd = rustix::fs::openat(
            &fd,
            "d",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
    }
    if let Some(data) = leaf {
        let f = rustix::fs::openat(
            &fd,
            "leaf",
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, data).unwrap();
    }
}

/// A 5,000-level upper over two lowers: each lookup goes below a descriptor that follows the
/// walk (no path resolved from the root, which would be quadratic and exceed PATH_MAX), and the
/// answer is the plain one: the new leaf and every directory above it.
#[test]
fn deep_uppers_are_walked_in_step_with_their_lowers() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (l0, l1, upper) = (
        t.path().join("l0"),
        t.path().join("l1"),
        t.path().join("upper"),
    );
    let levels = 5_000;
    deep(&l1, levels, Some(b"old"));
    deep(&l0, levels / 2, None);
    deep(&upper, levels, Some(b"new"));
    let got = changes_from_overlay_upper(&upper, &[l0, l1], OverlayXattr::Trusted).unwrap();
    assert_eq!(
        got.len(),
        levels + 1,
        "every directory on the path, and the leaf"
    );
    assert!(got.iter().all(|ch| ch.kind == ChangeKind::Modify));
    assert!(got.iter().any(|ch| ch.path.ends_with("d/leaf")));
}

/// An opaque directory in an upper lower hides what the lowers below it have under it, also
/// for the names an opaque upper directory is compared with.
#[test]
fn an_opaque_lower_directory_hides_deeper_lowers_below_it() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (l0, l1, upper) = (
        t.path().join("l0"),
        t.path().join("l1"),
        t.path().join("upper"),
    );
    write(&l0.join("a/b/kept"), b"k");
    xattr::set(l0.join("a"), "trusted.overlay.opaque", b"y").unwrap();
    write(&l1.join("a/b/hidden"), b"h");
    write(&upper.join("a/b/new"), b"n");
    xattr::set(upper.join("a/b"), "trusted.overlay.opaque", b"y").unwrap();
    let got = changes_from_overlay_upper(&upper, &[l0, l1], OverlayXattr::Trusted).unwrap();
    assert_eq!(
        got,
        vec![
            c('C', "/a"),
            c('C', "/a/b"),
            c('D', "/a/b/kept"),
            c('A', "/a/b/new")
        ]
    );
}
