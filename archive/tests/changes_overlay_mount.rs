//! Real overlayfs mounts: the changes read from the upper dir, exported in overlay format and
//! applied onto a copy of the lower, reproduce the merged view (root only; must run under CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use archive::compare::{CompareOptions, differences, snapshot};
use archive::{
    ApplyOptions, OverlayXattr, TarOptions, WhiteoutFormat, apply_layer,
    changes_from_overlay_upper, export_changes,
};
use filetime::FileTime;
use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "needs root (mount) and CI=true forbids skipping"
    );
    eprintln!("skipping: needs root to mount overlayfs");
    test_support::record_skip("needs root to mount overlayfs");
    false
}

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// The same lower tree every time, mtimes included.
fn lower_tree(root: &Path) {
    write(&root.join("etc/passwd"), b"root:x:0:0");
    write(&root.join("etc/hosts"), b"127.0.0.1 localhost");
    write(&root.join("usr/bin/a"), b"a");
    write(&root.join("usr/bin/b"), b"b");
    write(&root.join("usr/lib/x/y"), b"y");
    write(&root.join("var/cache/c1"), b"c1");
    write(&root.join("var/cache/c2"), b"c2");
    write(&root.join("opt/keep"), b"keep");
    let mut all = Vec::new();
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    walk(root, &mut all);
    all.sort();
    for p in all.iter().rev() {
        filetime::set_file_mtime(p, FileTime::from_unix_time(1_600_000_000, 0)).unwrap();
    }
}

struct Mounted {
    merged: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = unmount(&self.merged, UnmountFlags::DETACH);
    }
}

fn mount_overlay(t: &Path, extra: &str) -> Mounted {
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(t.join(d)).unwrap();
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        t.join("lower").display(),
        t.join("upper").display(),
        t.join("work").display()
    );
    let merged = t.join("merged");
    let data = std::ffi::CString::new(data).unwrap();
    mount(
        "overlay",
        &merged,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )
    .unwrap();
    Mounted { merged }
}

#[test]
fn upper_changes_exported_and_applied_reproduce_the_merged_view() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tp = t.path();
    lower_tree(&tp.join("lower"));
    let expected = {
        let m = mount_overlay(tp, ",redirect_dir=off,metacopy=off,index=off");
        let mg = &m.merged;
        // Modify, add, delete a file, delete a directory, recreate a directory (opaque),
        // chmod a directory, add a directory tree.
        fs::write(mg.join("etc/passwd"), b"root:x:0:0\nuser:x:1000:1000").unwrap();
        write(&mg.join("etc/new.conf"), b"new");
        fs::remove_file(mg.join("usr/bin/b")).unwrap();
        fs::remove_dir_all(mg.join("usr/lib")).unwrap();
        fs::remove_dir_all(mg.join("var/cache")).unwrap();
        write(&mg.join("var/cache/fresh"), b"fresh");
        fs::set_permissions(mg.join("opt"), fs::Permissions::from_mode(0o700)).unwrap();
        write(&mg.join("srv/www/index.html"), b"<html>");
        xattr::set(mg.join("srv/www/index.html"), "user.mime", b"text/html").unwrap();
        snapshot(mg).unwrap()
    };
    let upper = tp.join("upper");
    let ch =
        changes_from_overlay_upper(&upper, &[tp.join("lower")], OverlayXattr::Trusted).unwrap();
    let shown: Vec<String> = ch.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        shown,
        [
            "C /etc",
            "A /etc/new.conf",
            "C /etc/passwd",
            "C /opt",
            "A /srv",
            "A /srv/www",
            "A /srv/www/index.html",
            "C /usr",
            "C /usr/bin",
            "D /usr/bin/b",
            "D /usr/lib",
            "C /var",
            "C /var/cache",
            "D /var/cache/c1",
            "D /var/cache/c2",
            "A /var/cache/fresh",
        ]
        .map(String::from)
        .to_vec(),
        "got {shown:?}"
    );
    let mut opts = TarOptions::default();
    opts.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
    let tar = export_changes(&upper, &ch, &opts).unwrap();
    let target = tp.join("target");
    lower_tree(&target);
    apply_layer(&target, tar, &ApplyOptions::default()).unwrap();
    let got = snapshot(&target).unwrap();
    let d = differences(
        &expected,
        &got,
        &CompareOptions {
            root_metadata: false,
            ..CompareOptions::default()
        },
    );
    assert!(d.is_empty(), "{}", d.join("\n"));
}

#[test]
fn renamed_directory_with_redirect_dir_is_an_error() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tp = t.path();
    lower_tree(&tp.join("lower"));
    {
        let m = mount_overlay(tp, ",redirect_dir=on,index=off");
        fs::rename(m.merged.join("usr/lib"), m.merged.join("usr/lib2")).unwrap();
    }
    let err = changes_from_overlay_upper(
        &tp.join("upper"),
        &[tp.join("lower")],
        OverlayXattr::Trusted,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("trusted.overlay.redirect"),
        "{err}"
    );
}
