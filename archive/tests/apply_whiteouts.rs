//! Whiteouts (OCI and overlay form), opaque directories, plnk staging, limits, untar filters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use apply_util::Tb;
use archive::{ApplyOptions, Error, OverlayXattr, TarOptions, WhiteoutFormat, apply_layer, untar};

fn lower(p: &Path) {
    std::fs::create_dir_all(p.join("dir/sub")).unwrap();
    std::fs::write(p.join("dir/old"), b"lower").unwrap();
    std::fs::write(p.join("dir/sub/deep"), b"lower").unwrap();
    std::fs::write(p.join("gone"), b"lower").unwrap();
    std::fs::create_dir_all(p.join("gonedir/x")).unwrap();
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[test]
fn oci_whiteouts_delete_files_and_dirs() {
    let d = tempfile::tempdir().unwrap();
    lower(d.path());
    let tar = Tb::new()
        .file(".wh.gone", b"")
        .file(".wh.gonedir", b"")
        .file("dir/.wh.nothere", b"")
        .finish();
    apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert!(!exists(&d.path().join("gone")));
    assert!(!exists(&d.path().join("gonedir")));
    assert!(!exists(&d.path().join("dir/.wh.nothere")));
    assert!(exists(&d.path().join("dir/old")));
}

#[test]
fn opaque_marker_before_and_after_entries() {
    for before in [true, false] {
        let d = tempfile::tempdir().unwrap();
        lower(d.path());
        let mut t = Tb::new();
        t.dir("dir");
        if before {
            t.file("dir/.wh..wh..opq", b"");
        }
        t.file("dir/new", b"mine").file("dir/sub/mine", b"mine");
        if !before {
            t.file("dir/.wh..wh..opq", b"");
        }
        let tar = t.finish();
        apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
        let p = d.path();
        assert!(!exists(&p.join("dir/old")), "before={before}");
        assert!(
            !exists(&p.join("dir/sub/deep")),
            "lower entry below a kept dir is hidden too"
        );
        assert_eq!(std::fs::read(p.join("dir/new")).unwrap(), b"mine");
        assert_eq!(std::fs::read(p.join("dir/sub/mine")).unwrap(), b"mine");
        assert!(!exists(&p.join("dir/.wh..wh..opq")));
        assert!(
            exists(&p.join("gone")),
            "outside the opaque dir nothing changes"
        );
    }
}

#[test]
fn plnk_staging_is_linked_and_removed() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .dir(".wh..wh.plnk")
        .file(".wh..wh.plnk/1234.5", b"shared")
        .hardlink("a", ".wh..wh.plnk/1234.5")
        .hardlink("b/c", ".wh..wh.plnk/1234.5")
        .finish();
    apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert!(!exists(&d.path().join(".wh..wh.plnk")));
    assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"shared");
    assert_eq!(std::fs::read(d.path().join("b/c")).unwrap(), b"shared");
}

#[test]
fn overlay_form_whiteouts() {
    for ns in [OverlayXattr::Trusted, OverlayXattr::User] {
        let d = tempfile::tempdir().unwrap();
        let tar = Tb::new()
            .dir("dir")
            .file("dir/.wh..wh..opq", b"")
            .file("dir/.wh.x", b"")
            .file("dir/keep", b"k")
            .file(".wh.y", b"")
            .finish();
        let mut o = ApplyOptions::default();
        o.whiteout_format = WhiteoutFormat::Overlay(ns);
        apply_layer(d.path(), &tar[..], &o).unwrap();
        // Outside an opaque directory a whiteout is a char device 0/0 ...
        let md = std::fs::symlink_metadata(d.path().join("y")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), 0);
        // ... inside one it hides nothing, and overlayfs would list it as an unopenable name.
        assert!(!exists(&d.path().join("dir/x")));
        assert_eq!(
            xattr::get(d.path().join("dir"), ns.opaque_name())
                .unwrap()
                .unwrap(),
            b"y"
        );
        assert!(exists(&d.path().join("dir/keep")));
    }
}

#[test]
fn forged_overlay_xattrs_are_dropped() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
        .dir("d")
        .finish();
    apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert!(
        xattr::get(d.path().join("d"), "trusted.overlay.redirect")
            .unwrap()
            .is_none()
    );
}

#[test]
fn bad_whiteout_names_are_refused() {
    for name in [".wh.", "d/.wh..", ".wh..."] {
        let d = tempfile::tempdir().unwrap();
        let tar = Tb::new().file(name, b"").finish();
        let err = apply_layer(d.path(), &tar[..], &ApplyOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::BadEntry { entry, .. } if entry == name),
            "{name}: {err}"
        );
    }
}

#[test]
fn limits() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .file("a", b"12345")
        .file("b", b"67890")
        .file("c", b"")
        .finish();
    let mut o = ApplyOptions::default();
    o.max_entries = Some(2);
    let err = apply_layer(d.path(), &tar[..], &o).unwrap_err();
    assert!(
        matches!(err, Error::LimitExceeded { ref what, limit: 2 } if what == "max_entries"),
        "{err}"
    );
    let d = tempfile::tempdir().unwrap();
    let mut o = ApplyOptions::default();
    o.max_bytes = Some(9);
    let err = apply_layer(d.path(), &tar[..], &o).unwrap_err();
    assert!(
        matches!(err, Error::LimitExceeded { ref what, limit: 9 } if what == "max_bytes"),
        "{err}"
    );
    assert!(
        !exists(&d.path().join("b")),
        "the file over the limit is not written"
    );
    let mut o = ApplyOptions::default();
    o.max_bytes = Some(10);
    o.max_entries = Some(3);
    assert_eq!(apply_layer(d.path(), &tar[..], &o).unwrap(), 10);
}

#[test]
fn untar_filters_and_keeps_wh_names() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tb::new()
        .dir("a")
        .file("a/.wh.file", b"plain")
        .file("a/x", b"x")
        .dir("a/skip")
        .file("a/skip/y", b"y")
        .file("b", b"b")
        .finish();
    let mut o = TarOptions::default();
    o.include = vec![PathBuf::from("/a")];
    o.exclude = vec![PathBuf::from("a/skip")];
    untar(d.path(), &tar[..], &o).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("a/.wh.file")).unwrap(),
        b"plain"
    );
    assert!(exists(&d.path().join("a/x")));
    assert!(!exists(&d.path().join("a/skip")));
    assert!(!exists(&d.path().join("b")));
}

/// Overlay-form apply over lowers: a whiteout is written where a lower shows the name, not
/// where nothing is hidden (a name no lower has; anywhere below a directory this layer made
/// opaque). 40 levels with whiteouts on each (ustar names), the opaque marker halfway: the
/// lookups follow the stream from directory to directory.
#[test]
fn overlay_whiteouts_are_written_only_where_a_lower_shows_the_name() {
    if !test_support::root_or_skip("overlay whiteouts over lowers (mknod, trusted.* xattrs)") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    let levels = 40;
    let mut dir = lower.clone();
    for _ in 0..levels {
        dir = dir.join("d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x"), b"lower").unwrap();
    }
    std::fs::create_dir(&upper).unwrap();
    let mut tb = Tb::new();
    let mut rel = String::new();
    for k in 1..=levels {
        rel.push_str(if k == 1 { "d" } else { "/d" });
        tb.dir(&rel);
        if k == levels / 2 {
            tb.file(&format!("{rel}/.wh..wh..opq"), b"");
        }
        tb.file(&format!("{rel}/.wh.x"), b"")
            .file(&format!("{rel}/.wh.n"), b"");
    }
    let mut o = ApplyOptions::default();
    o.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
    o.link_lowers = vec![std::sync::Arc::new(
        std::fs::File::open(&lower).unwrap().into(),
    )];
    apply_layer(&upper, &tb.finish()[..], &o).unwrap();
    let mut dir = upper.clone();
    for k in 1..=levels {
        dir = dir.join("d");
        let x = std::fs::symlink_metadata(dir.join("x"));
        if k < levels / 2 {
            let md = x.unwrap_or_else(|e| panic!("level {k}: expected a whiteout: {e}"));
            assert!(
                md.file_type().is_char_device() && md.rdev() == 0,
                "level {k}"
            );
        } else {
            assert!(
                x.is_err(),
                "level {k}: below the opaque directory nothing is hidden"
            );
        }
        assert!(!exists(&dir.join("n")), "level {k}: no lower has n");
    }
}

/// A hardlink to a file only a lower has: the file is copied up (content, mode, mtime) with
/// its parent directory, then linked, as overlayfs does; a target hidden by a directory this
/// layer made opaque is not copied and the link fails naming it.
#[test]
fn overlay_hardlinks_to_lower_files_copy_them_up_first() {
    if !test_support::root_or_skip("overlay hardlink copy-up (trusted.* xattrs)") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    std::fs::create_dir_all(lower.join("a")).unwrap();
    std::fs::create_dir_all(lower.join("hidden")).unwrap();
    std::fs::write(lower.join("a/f"), b"lower bytes").unwrap();
    std::fs::write(lower.join("hidden/h"), b"h").unwrap();
    std::fs::set_permissions(
        lower.join("a/f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let mtime = std::fs::metadata(lower.join("a/f")).unwrap().mtime();
    std::fs::create_dir(&upper).unwrap();
    let mut o = ApplyOptions::default();
    o.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
    o.link_lowers = vec![std::sync::Arc::new(
        std::fs::File::open(&lower).unwrap().into(),
    )];
    let tar = Tb::new().dir("b").hardlink("b/g", "a/f").finish();
    apply_layer(&upper, &tar[..], &o).unwrap();
    let (f, g) = (
        std::fs::metadata(upper.join("a/f")).unwrap(),
        std::fs::metadata(upper.join("b/g")).unwrap(),
    );
    assert_eq!((f.dev(), f.ino()), (g.dev(), g.ino()), "linked to the copy");
    assert_eq!(std::fs::read(upper.join("b/g")).unwrap(), b"lower bytes");
    assert_eq!(f.mode() & 0o7777, 0o640);
    assert_eq!(f.mtime(), mtime);
    assert_eq!(std::fs::read(lower.join("a/f")).unwrap(), b"lower bytes");

    let upper2 = t.path().join("upper2");
    std::fs::create_dir(&upper2).unwrap();
    let tar = Tb::new()
        .dir("hidden")
        .file("hidden/.wh..wh..opq", b"")
        .hardlink("x", "hidden/h")
        .finish();
    let err = apply_layer(&upper2, &tar[..], &o).unwrap_err().to_string();
    assert!(err.contains("hidden/h"), "{err}");
    assert!(!upper2.join("hidden/h").exists());
}
