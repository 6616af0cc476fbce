//! GNU tar extracts our `tar_tree` output back into the same tree (interop check).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use archive::{TarOptions, tar_tree};
use filetime::FileTime;

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
    content: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in walk order) sharing this node's inode.
    link_group: String,
}

fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(
        root: &Path,
        rel: &Path,
        out: &mut BTreeMap<String, Node>,
        inodes: &mut HashMap<u64, String>,
    ) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let key = r.to_string_lossy().into_owned();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else {
                "special"
            };
            let content = if ft.is_file() {
                fs::read(&p).unwrap()
            } else if ft.is_symlink() {
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            let mut xattrs = BTreeMap::new();
            for x in xattr::list(&p).unwrap() {
                let x = x.to_string_lossy().into_owned();
                if x.starts_with("user.") || x == "security.capability" {
                    xattrs.insert(x.clone(), xattr::get(&p, &x).unwrap().unwrap());
                }
            }
            let link_group = if ft.is_dir() {
                key.clone()
            } else {
                inodes
                    .entry(md.ino())
                    .or_insert_with(|| key.clone())
                    .clone()
            };
            out.insert(
                key,
                Node {
                    kind,
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime: md.mtime(),
                    rdev: md.rdev(),
                    content,
                    xattrs,
                    link_group,
                },
            );
            if ft.is_dir() {
                walk(root, &r, out, inodes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out, &mut HashMap::new());
    out
}

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn gnu_tar_extracts_our_tar_tree_output() {
    let root = rustix::process::geteuid().is_root();
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "needs root and CI=true forbids skipping"
        );
        eprintln!("skipping: needs root (owners, devices)");
        return;
    }
    if Command::new("tar").arg("--version").output().is_err() {
        panic!("GNU tar is required for this interop test");
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    fs::create_dir_all(&dst).unwrap();
    write(&src.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n");
    write(&src.join("bin/tool"), &vec![0xAB; 70_000]);
    fs::set_permissions(src.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(src.join("bin/tool"), src.join("bin/tool-alias")).unwrap();
    symlink("../etc/passwd", src.join("bin/pw")).unwrap();
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    write(&src.join("home/u/.profile"), b"export A=1\n");
    std::os::unix::fs::lchown(src.join("home/u"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::lchown(src.join("home/u/.profile"), Some(1000), Some(100)).unwrap();
    xattr::set(src.join("home/u/.profile"), "user.mime", b"text/plain").unwrap();
    xattr::set(src.join("home/u"), "user.dir", b"yes").unwrap();
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr::set(src.join("etc/passwd"), "security.capability", &cap).unwrap();
    let long = format!("{}/{}", "x".repeat(80), "y".repeat(80));
    write(&src.join(&long), b"long name");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("dev-null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Set mtimes last, directories bottom-up, with nanoseconds that tar drops.
    let snap = snapshot(&src);
    for (i, p) in snap.keys().rev().enumerate() {
        let ft = FileTime::from_unix_time(1_600_000_000 + i as i64 * 1000, 123_456_789);
        filetime::set_symlink_file_times(src.join(p), ft, ft).unwrap();
    }
    let want = snapshot(&src);

    let tarfile = t.path().join("out.tar");
    let mut stream = tar_tree(&src, &TarOptions::default()).unwrap();
    std::io::copy(&mut stream, &mut fs::File::create(&tarfile).unwrap()).unwrap();
    let out = Command::new("tar")
        .args([
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-f",
        ])
        .arg(&tarfile)
        .arg("-C")
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = snapshot(&dst);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert_eq!(&got[k], w, "entry {k}");
    }
}
