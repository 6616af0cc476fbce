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
