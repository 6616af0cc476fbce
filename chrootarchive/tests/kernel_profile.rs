//! The fallbacks for system calls older kernels lack, exercised in the confined child.
//!
//! CI runs this binary under every kernel profile (`cargo xtask kernel-profile`), which sets
//! `GRAPHDRIVER_KERNEL_PROFILE`; there the fallbacks must be chosen by the kernel's `ENOSYS`
//! and remembered. On a new kernel the test hooks force them instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use archive::ApplyOptions;
use chrootarchive::TestFault;
use common::*;

/// The kernel profile this process runs under, if any.
fn profile() -> Option<(u32, u32)> {
    let v = std::env::var("GRAPHDRIVER_KERNEL_PROFILE").ok()?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Whether the kernel (or the profile imitating one) predates `version`.
fn before(version: (u32, u32)) -> bool {
    profile().is_some_and(|p| p < version)
}

#[test]
fn confined_applies_close_fds_without_close_range() {
    if !need_root("confined_applies_close_fds_without_close_range") {
        return;
    }
    if before((5, 9)) {
        assert!(
            !chrootarchive::close_range_supported(),
            "the profile hides close_range"
        );
    } else {
        chrootarchive::force_close_range_missing();
    }
    let layer = tar_of(&[dir("d"), file("d/f", b"x"), symlink("d/l", "f")]);
    for _ in 0..3 {
        let t = tempfile::tempdir().unwrap();
        let before_fds = fd_count();
        chrootarchive::apply_layer_with_fault(
            t.path(),
            &layer[..],
            &ApplyOptions::default(),
            TestFault::None,
        )
        .unwrap();
        assert_eq!(std::fs::read(t.path().join("d/f")).unwrap(), b"x");
        assert_eq!(fd_count(), before_fds);
        // Remembered: the probe is not repeated and the answer does not flip.
        assert!(!chrootarchive::close_range_supported());
    }
}

/// A layer with `trusted.*` xattrs on a symlink, a FIFO and a directory, in PAX headers.
fn xattr_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>, mode: u32| {
        let value = format!("v-{name}");
        b.append_pax_extensions([("SCHILY.xattr.trusted.t", value.as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, name, &[][..]).unwrap();
    };
    add("d", tar::EntryType::Directory, None, 0o755);
    add(
        "d/l",
        tar::EntryType::Symlink,
        Some("missing-target"),
        0o777,
    );
    add("d/fifo", tar::EntryType::Fifo, None, 0o644);
    b.into_inner().unwrap()
}

fn trusted_t(path: &std::path::Path) -> Option<Vec<u8>> {
    // The `xattr` crate's `get` does not follow symlinks.
    let mut buf = vec![0u8; 64];
    let n = rustix::fs::lgetxattr(path, "trusted.t", &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn xattrs_of_symlinks_and_fifos_apply_without_xattrat_and_without_proc() {
    if !need_root("xattrs_of_symlinks_and_fifos_apply_without_xattrat_and_without_proc") {
        return;
    }
    if before((6, 13)) {
        assert!(
            !archive::fs::probe_xattr_at(),
            "the profile hides setxattrat"
        );
    } else {
        archive::fs::force_xattrat_missing();
    }
    for _ in 0..2 {
        let t = tempfile::tempdir().unwrap();
        chrootarchive::apply_layer(t.path(), &xattr_layer()[..], &ApplyOptions::default()).unwrap();
        for name in ["d", "d/l", "d/fifo"] {
            assert_eq!(
                trusted_t(&t.path().join(name)).as_deref(),
                Some(format!("v-{name}").as_bytes()),
                "{name}"
            );
        }
        assert!(!archive::fs::xattr_at_supported());
    }
}

#[test]
fn confined_applies_resolve_paths_without_openat2() {
    if !need_root("confined_applies_resolve_paths_without_openat2") {
        return;
    }
    if before((5, 6)) {
        assert!(!archive::fs::probe_openat2(), "the profile hides openat2");
    } else {
        archive::fs::force_openat2_missing();
    }
    let t = tempfile::tempdir().unwrap();
    // A symlinked directory inside the layer and an escape attempt through it.
    let layer = tar_of(&[
        dir("a"),
        dir("a/b"),
        file("a/b/f", b"x"),
        symlink("up", "../../../.."),
        file("up/escaped", b"no"),
    ]);
    let r = chrootarchive::apply_layer(t.path(), &layer[..], &ApplyOptions::default());
    assert_eq!(std::fs::read(t.path().join("a/b/f")).unwrap(), b"x");
    // Either refused or kept inside the target: never written above it.
    if r.is_ok() {
        assert!(t.path().join("escaped").exists() || !t.path().join("up").exists());
    }
    assert!(!t.path().parent().unwrap().join("escaped").exists());
    assert!(!archive::fs::openat2_supported());
}
