//! overlay2-specific behaviour: layout without copies, hardlinks to lower files, the mount
//! paths (`lowerdir+` and the `mount(2)` option string with its depth limit).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{id, root_or_skip, tar_of, write_files};
use drivers::overlay2::{MountApi, Overlay2, Overlay2Config};
use graphdriver::{DiffDriver, MountOpts, ProtoDriver};
use naive_diff::NaiveDiffDriver;

fn driver(home: &Path, legacy: bool) -> NaiveDiffDriver<Overlay2> {
    let config = Overlay2Config {
        legacy_mount_api: legacy,
        ..Overlay2Config::default()
    };
    Overlay2::driver(home, config).unwrap()
}

#[test]
fn a_layer_holds_only_its_own_files_and_overlay_whiteouts() {
    if !root_or_skip("a_layer_holds_only_its_own_files_and_overlay_whiteouts") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = driver(&t.path().join("home"), false);
    let src = t.path().join("base");
    write_files(
        &src,
        &[("etc/passwd", "root"), ("bin/sh", "sh"), ("keep", "k")],
    );
    let (base, top) = (id("base"), id("top"));
    d.create(&base, None).unwrap();
    d.apply_diff(&base, None, &mut &tar_of(&src)[..]).unwrap();
    let src2 = t.path().join("top");
    write_files(&src2, &[("etc/new", "n"), (".wh.keep", "")]);
    d.create(&top, Some(&base)).unwrap();
    d.apply_diff(&top, Some(&base), &mut &tar_of(&src2)[..])
        .unwrap();
    let diff = d.inner().layer_dir(&top).join("diff");
    // Only the layer's own files: no copy of the parent's bin/ or etc/passwd.
    assert!(diff.join("etc/new").is_file());
    assert!(!diff.join("bin").exists());
    assert!(!diff.join("etc/passwd").exists());
    let wh = fs::symlink_metadata(diff.join("keep")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "keep is an overlay whiteout"
    );
    // The merged view is the stack, and the diff converts back to `.wh.` entries.
    let merged = d.get(&top, &MountOpts::default()).unwrap();
    assert_eq!(
        fs::read_to_string(merged.join("etc/passwd")).unwrap(),
        "root"
    );
    assert!(!merged.join("keep").exists());
    d.put(&top).unwrap();
    let mut tar = Vec::new();
    d.diff(&top, Some(&base))
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().any(|n| n == ".wh.keep"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("passwd")), "{names:?}");
    d.cleanup().unwrap();
}

/// The model test's find: a hardlink group split across layers by a rename. The diff links
/// the renamed name to the unchanged one in the parent; applied into an upper, the target is
/// copied up first (as overlayfs does) and the group survives.
#[test]
fn a_diff_linking_to_a_parent_file_applies_and_keeps_the_group() {
    if !root_or_skip("a_diff_linking_to_a_parent_file_applies_and_keeps_the_group") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = driver(&t.path().join("home"), false);
    let src = t.path().join("l0");
    write_files(&src, &[("f0", "shared bytes")]);
    fs::create_dir(src.join("d1")).unwrap();
    fs::hard_link(src.join("f0"), src.join("d1/f0")).unwrap();
    let (l0, rw, l2) = (id("l0"), id("rw"), id("l2"));
    d.create(&l0, None).unwrap();
    d.apply_diff(&l0, None, &mut &tar_of(&src)[..]).unwrap();
    d.create_read_write(&rw, Some(&l0)).unwrap();
    let m = d.get(&rw, &MountOpts::default()).unwrap();
    fs::rename(m.join("d1"), m.join("f1")).unwrap_or_else(|e| {
        // Without redirect_dir a lower directory cannot be renamed (EXDEV); move its file.
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
        fs::create_dir(m.join("f1")).unwrap();
        fs::hard_link(m.join("f0"), m.join("f1/f0")).unwrap();
        fs::remove_file(m.join("d1/f0")).unwrap();
        fs::remove_dir(m.join("d1")).unwrap();
    });
    d.put(&rw).unwrap();
    let mut tar = Vec::new();
    d.diff(&rw, Some(&l0))
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    d.create(&l2, Some(&l0)).unwrap();
    d.apply_diff(&l2, Some(&l0), &mut &tar[..]).unwrap();
    let v = d.get(&l2, &MountOpts::default()).unwrap();
    assert_eq!(fs::read_to_string(v.join("f1/f0")).unwrap(), "shared bytes");
    assert!(!v.join("d1").exists());
    let (a, b) = (
        fs::metadata(v.join("f0")).unwrap(),
        fs::metadata(v.join("f1/f0")).unwrap(),
    );
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "one hardlink group");
    d.put(&l2).unwrap();
    // The copy-up is no change: f0 is not listed.
    let changes: Vec<String> = d
        .changes(&l2, Some(&l0))
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert!(!changes.iter().any(|c| c == "C /f0"), "{changes:?}");
    d.cleanup().unwrap();
}

/// Builds a chain of `depth` layers, each adding one file, and reads all of them through the
/// top layer.
fn chain(d: &NaiveDiffDriver<Overlay2>, t: &Path, depth: usize) -> Result<(), graphdriver::Error> {
    let mut parent = None;
    for n in 0..depth {
        let l = id(&format!("l{n}"));
        let src = t.join(format!("src{n}"));
        write_files(&src, &[(&format!("f{n}"), &n.to_string())]);
        d.create(&l, parent.as_ref())?;
        d.apply_diff(&l, parent.as_ref(), &mut &tar_of(&src)[..])?;
        parent = Some(l);
    }
    let top = parent.unwrap();
    let root = d.get(&top, &MountOpts::default())?;
    for n in 0..depth {
        assert_eq!(
            fs::read_to_string(root.join(format!("f{n}"))).unwrap(),
            n.to_string()
        );
    }
    d.put(&top)
}

#[test]
fn five_hundred_layers_mount_with_lowerdir_plus() {
    if !root_or_skip("five_hundred_layers_mount_with_lowerdir_plus") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = driver(&t.path().join("home"), false);
    if d.inner().mount_api() != MountApi::LowerdirPlus {
        // The 500-layer scenario of the conformance suite covers this kernel's path.
        eprintln!("skipping: this kernel has no lowerdir+ (Linux 6.8+)");
        assert!(!test_support::is_ci() || d.inner().mount_api() == MountApi::OptionString);
        return;
    }
    chain(&d, t.path(), 500).unwrap();
    d.cleanup().unwrap();
}

/// The `mount(2)` path, forced: short chains mount, and a chain too deep for one page of
/// options fails with an error that names the limit (never a truncated mount).
#[test]
fn the_option_string_path_mounts_and_names_its_depth_limit() {
    if !root_or_skip("the_option_string_path_mounts_and_names_its_depth_limit") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = driver(&t.path().join("home"), true);
    assert_eq!(d.inner().mount_api(), MountApi::OptionString);
    chain(&d, t.path(), 20).unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let d2 = driver(&t2.path().join("home"), true);
    let err = chain(&d2, t2.path(), 300).unwrap_err().to_string();
    assert!(
        err.contains("300 lower") || err.contains("299 lower"),
        "{err}"
    );
    assert!(err.contains("lowerdir+ has no limit"), "{err}");
    d.cleanup().unwrap();
    d2.cleanup().unwrap();
}

#[test]
fn selection_prefers_overlay2_but_a_root_with_overlay_layers_keeps_overlay() {
    if !root_or_skip("selection_prefers_overlay2_but_a_root_with_overlay_layers_keeps_overlay") {
        return;
    }
    assert!(graphdriver::registered().contains(&"overlay2"));
    let fresh = tempfile::tempdir().unwrap();
    fs::create_dir(fresh.path().join("root")).unwrap();
    let selected = graphdriver::open(&graphdriver::Config::new(fresh.path().join("root"))).unwrap();
    assert_eq!(selected.driver.name(), "overlay2");
    drop(selected);
    // A root where the seed's overlay driver holds layers: no migration, overlay stays.
    let old = tempfile::tempdir().unwrap();
    let root = old.path().join("root");
    fs::create_dir(&root).unwrap();
    {
        let ovl =
            drivers::overlay::Overlay::driver(&root.join("overlay"), Default::default()).unwrap();
        ovl.create(&id("seed-layer"), None).unwrap();
    }
    let selected = graphdriver::open(&graphdriver::Config::new(root)).unwrap();
    assert_eq!(selected.driver.name(), "overlay");
}
