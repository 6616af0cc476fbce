//! End to end on each driver: import the sample image, mount a read-write layer, write through
//! it, `changes`, `diff` then `apply` into a second store, compare the trees, remove in order.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use archive::compare::{CompareOptions, assert_same_tree, snapshot};

use crate::util::{Store, is_mount_point, sample_image};

/// Imports the sample image and returns the layer ids, bottom first.
fn import_sample(s: &Store) -> Vec<String> {
    let top = s.ok(&["import", sample_image().to_str().unwrap()]);
    let top = top.trim().to_string();
    assert_eq!(top.len(), 64, "{top}");
    let ls = s.ok(&["ls"]);
    // Walk the parent chain down from the top.
    let parents: std::collections::HashMap<&str, &str> =
        ls.lines().map(|l| l.split_once(' ').unwrap()).collect();
    let mut chain = vec![top.clone()];
    while let Some(p) = parents
        .get(chain.last().unwrap().as_str())
        .filter(|p| **p != "-")
    {
        chain.push(p.to_string());
    }
    chain.reverse();
    assert_eq!(chain.len(), 3, "{ls}");
    chain
}

/// Checks the sample image's features through a mounted tree of its top layer.
fn check_sample_tree(root: &Path) {
    assert!(!root.join("etc/remove-me").exists(), "whiteout not applied");
    assert!(
        !root.join("var/cache/old/one").exists(),
        "deleted dir came back"
    );
    assert!(!root.join("var/cache/old/nested").exists());
    assert!(root.join("var/cache/old/fresh").is_file());
    assert!(
        !root.join("etc/config/a.conf").exists(),
        "opaque dir leaked"
    );
    assert!(root.join("etc/config/c.conf").is_file());
    assert_eq!(
        fs::read_to_string(root.join("etc/motd")).unwrap(),
        "welcome to layer 1\n"
    );
    let su = fs::metadata(root.join("bin/sutool")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    let a = fs::metadata(root.join("bin/tool")).unwrap();
    let b = fs::metadata(root.join("bin/tool-hardlink")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "hardlink broken");
    assert_eq!(
        fs::read_link(root.join("usr/local/bin/tool")).unwrap(),
        PathBuf::from("/bin/tool")
    );
    let snap = snapshot(root).unwrap();
    let tagged = snap.get("/app/tagged").unwrap();
    assert!(
        tagged
            .xattrs
            .iter()
            .any(|(k, v)| k == "user.layer" && v == b"2"),
        "{:?}",
        tagged.xattrs
    );
}

driver_test!(import_mount_write_diff_apply_rm, |driver| {
    let s = Store::new(driver);
    let ids = import_sample(&s);
    let top = ids[2].as_str();

    // A container layer on top, written through its mount.
    s.ok(&["create", "--rw", "--parent", top, "ctr"]);
    let mnt = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    check_sample_tree(&mnt);
    fs::write(mnt.join("new.txt"), "hello\n").unwrap();
    fs::write(mnt.join("etc/motd"), "changed\n").unwrap();
    fs::remove_file(mnt.join("etc/hostname")).unwrap();
    fs::create_dir(mnt.join("data")).unwrap();
    fs::write(mnt.join("data/file"), "x").unwrap();

    let changes = s.ok(&["changes", "ctr"]);
    assert_eq!(
        changes, "A /data\nA /data/file\nC /etc\nD /etc/hostname\nC /etc/motd\nA /new.txt\n",
        "{changes}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["--json", "changes", "ctr"])).unwrap();
    assert_eq!(
        json["changes"][0],
        serde_json::json!({"kind": "add", "path": "/data"})
    );

    let size: u64 = s.ok(&["diff-size", "ctr"]).trim().parse().unwrap();
    assert_eq!(size, "hello\n".len() as u64 + "changed\n".len() as u64 + 1);

    // diff, then apply into a second store holding the same image.
    let tar = s.scratch("ctr.tar");
    s.ok(&["diff", "ctr", "-o", tar.to_str().unwrap()]);
    let s2 = Store::new(driver);
    let ids2 = import_sample(&s2);
    assert_eq!(ids, ids2, "chain ids must not depend on the store");
    let applied = s2.ok(&["apply", "--parent", top, "ctr2", tar.to_str().unwrap()]);
    assert_eq!(applied.trim().parse::<u64>().unwrap(), size);
    let mnt2 = PathBuf::from(s2.ok(&["mount", "ctr2"]).trim());
    let opts = CompareOptions {
        dir_mtimes: false,
        root_metadata: false,
        ..CompareOptions::default()
    };
    assert_same_tree(&mnt, &mnt2, &opts).unwrap();
    // The diff on stdout is the same tar.
    let (stdout_tar, _) = {
        let out = s.cmd(&["diff", "ctr"]).output();
        assert!(out.status.success());
        (out.stdout, ())
    };
    assert_eq!(stdout_tar, fs::read(&tar).unwrap());
    s2.ok(&["unmount", "ctr2"]);

    // Removal: refused while mounted, refused with children, fine in order.
    assert!(s.err(&["rm", "ctr"]).contains("in use"));
    s.ok(&["unmount", "ctr"]);
    let msg = s.err(&["rm", top]);
    assert!(msg.contains("children") && msg.contains("ctr"), "{msg}");
    s.ok(&["rm", "ctr"]);
    assert!(s.err(&["rm", &ids[0]]).contains("children"));
    for id in ids.iter().rev() {
        s.ok(&["rm", id]);
    }
    assert_eq!(s.ok(&["ls"]), "");

    // A second import of the same image into a store that has it skips every layer.
    let json: serde_json::Value =
        serde_json::from_str(&s2.ok(&["--json", "import", sample_image().to_str().unwrap()]))
            .unwrap();
    assert_eq!(json["top"], top);
    assert!(
        json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["applied"] == false)
    );
});

driver_test!(mount_is_shared_across_processes, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "base"]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let first = s.ok(&["mount", "ctr"]);
    let second = s.ok(&["mount", "ctr"]);
    assert_eq!(first, second);
    let path = PathBuf::from(first.trim());
    s.ok(&["unmount", "ctr"]);
    // One get is still outstanding: the layer stays mounted and cannot be removed.
    assert!(path.is_dir());
    if driver == "overlay" {
        assert!(is_mount_point(&path), "{} was unmounted", path.display());
    }
    assert!(s.err(&["rm", "ctr"]).contains("in use"));
    s.ok(&["unmount", "ctr"]);
    if driver == "overlay" {
        assert!(!is_mount_point(&path));
    }
    s.ok(&["rm", "ctr"]);
});

driver_test!(cleanup_unmounts_everything, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "base"]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    if driver == "overlay" {
        assert!(is_mount_point(&path));
    }
    s.ok(&["cleanup"]);
    if driver == "overlay" {
        assert!(!is_mount_point(&path));
    }
    // vfs mounts nothing, so cleanup leaves its reference counts; a put is harmless either way.
    s.ok(&["unmount", "ctr"]);
    s.ok(&["rm", "ctr"]);
});

driver_test!(tree_shows_the_graph, |driver| {
    let s = Store::new(driver);
    let ids = import_sample(&s);
    s.ok(&["create", "--rw", "--parent", &ids[2], "ctr"]);
    s.ok(&["create", "--parent", &ids[0], "other"]);
    let tree = s.ok(&["tree"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 5, "{tree}");
    assert!(lines[0].starts_with(&format!("{} (", ids[0])), "{tree}");
    assert!(tree.contains("ctr (0 B) rw"), "{tree}");
    assert!(tree.contains("── other (0 B)"), "{tree}");
});

driver_test!(apply_from_stdin_and_compressed, |driver| {
    let s = Store::new(driver);
    let tar = crate::util::layer_tar(&[("etc/", b""), ("etc/a", b"abc")]);
    let out = s.cmd(&["apply", "base", "-"]).stdin(tar.clone()).ok();
    assert_eq!(out.trim(), "3");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &crate::util::layer_tar(&[("b", b"12345")])).unwrap();
    let gz = gz.finish().unwrap();
    let file = s.scratch("l.tar.gz");
    fs::write(&file, gz).unwrap();
    let out = s.ok(&["apply", "--parent", "base", "child", file.to_str().unwrap()]);
    assert_eq!(out.trim(), "5");
    assert_eq!(s.ok(&["ls"]), "base -\nchild base\n");
    assert_eq!(s.ok(&["changes", "child"]), "A /b\n");
});
