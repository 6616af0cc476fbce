//! Interop: trees packed by GNU tar (gnu, pax, posix formats, xattrs, sparse) and by python's
//! tarfile apply to identical trees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use archive::compare::{CompareOptions, assert_same_tree};
use archive::{ApplyOptions, apply_layer};

/// A source tree with every kind of entry; mtimes set to whole seconds.
fn source_tree(root: &Path) {
    let p = root;
    std::fs::create_dir_all(p.join("dir/sub")).unwrap();
    std::fs::write(p.join("dir/file"), b"content").unwrap();
    std::fs::write(p.join("dir/sub/big"), vec![b'q'; 300_000]).unwrap();
    std::fs::write(p.join("suid"), b"#!/bin/sh\n").unwrap();
    std::fs::hard_link(p.join("dir/file"), p.join("hard")).unwrap();
    std::os::unix::fs::symlink("dir/file", p.join("sym")).unwrap();
    std::os::unix::fs::symlink("/absolute/elsewhere", p.join("abs")).unwrap();
    let long = format!("dir/{}", "n".repeat(180));
    std::fs::write(p.join(&long), b"long").unwrap();
    xattr::set(p.join("dir/file"), "user.color", b"blue").unwrap();
    xattr::set(p.join("dir"), "trusted.dirattr", b"d").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::chown(
        p.join("suid"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(p.join("fifo"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(p.join("dir/sub"), std::fs::Permissions::from_mode(0o2775)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for e in ["dir/file", "dir/sub/big", "suid", "fifo", "null", &long] {
        filetime::set_symlink_file_times(p.join(e), t, t).unwrap();
    }
    for e in ["sym", "abs"] {
        filetime::set_symlink_file_times(p.join(e), t, t).unwrap();
    }
    for e in ["dir/sub", "dir", "."] {
        filetime::set_symlink_file_times(p.join(e), t, t).unwrap();
    }
}

fn gnu_tar(src: &Path, args: &[&str]) -> Vec<u8> {
    // --xattrs forces PAX format: the old-GNU (`--format=gnu`) sparse test goes without.
    let xattrs: &[&str] = if args.contains(&"--format=gnu") && args.contains(&"-S") {
        &[]
    } else {
        &["--xattrs", "--xattrs-include=*"]
    };
    let out = Command::new("tar")
        .args(args)
        .args(xattrs)
        .args(["--numeric-owner", "-C"])
        .arg(src)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn check(tar: &[u8], src: &Path, what: &str) {
    let dest = tempfile::tempdir().unwrap();
    apply_layer(dest.path(), tar, &ApplyOptions::default()).unwrap();
    if let Err(diff) = assert_same_tree(src, dest.path(), &CompareOptions::default()) {
        panic!("{what}:\n{diff}");
    }
}

#[test]
fn gnu_tar_formats_round_trip() {
    let src = tempfile::tempdir().unwrap();
    source_tree(src.path());
    for format in ["--format=gnu", "--format=pax", "--format=posix"] {
        check(&gnu_tar(src.path(), &[format]), src.path(), format);
    }
}

#[test]
fn gnu_sparse_round_trips_content() {
    let src = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(src.path().join("sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", 4 << 20).unwrap();
    f.write_all_at(b"end", (8 << 20) - 3).unwrap();
    drop(f);
    filetime::set_file_mtime(
        src.path().join("sparse"),
        filetime::FileTime::from_unix_time(1_500_000_000, 0),
    )
    .unwrap();
    filetime::set_file_mtime(
        src.path(),
        filetime::FileTime::from_unix_time(1_500_000_000, 0),
    )
    .unwrap();
    let tar = gnu_tar(src.path(), &["--format=gnu", "-S"]);
    assert!(tar.len() < 1 << 20, "GNU tar wrote a sparse archive");
    check(&tar, src.path(), "gnu sparse");
    let dest = tempfile::tempdir().unwrap();
    apply_layer(dest.path(), &tar[..], &ApplyOptions::default()).unwrap();
    assert_holes(&dest.path().join("sparse"), 8 << 20);
}

/// A 32 MiB sparse file with a few data islands (one unaligned, one at the very end), an
/// xattr, and a plain file beside it; mtimes whole seconds.
fn sparse_tree(root: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&[b'a'; 4096], 0).unwrap();
    let island: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&island, (5 << 20) + 123).unwrap();
    f.write_all_at(&vec![b'z'; 1 << 20], 20 << 20).unwrap();
    f.write_all_at(b"end", (32 << 20) - 3).unwrap();
    drop(f);
    std::fs::write(root.join("plain"), b"not sparse").unwrap();
    xattr::set(root.join("sparse"), "user.sparse", b"holey").unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for e in ["sparse", "plain", "."] {
        filetime::set_symlink_file_times(root.join(e), t, t).unwrap();
    }
}

/// The file at `p` has size `size` but far fewer blocks allocated: its holes stayed holes.
fn assert_holes(p: &Path, size: u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "{}: {} blocks allocated for {size} bytes: holes were written as data",
        p.display(),
        m.blocks()
    );
}

#[test]
fn pax_sparse_formats_round_trip_with_xattrs() {
    let src = tempfile::tempdir().unwrap();
    sparse_tree(src.path());
    for format in ["--format=posix", "--format=pax"] {
        for version in ["0.0", "0.1", "1.0"] {
            let v = format!("--sparse-version={version}");
            let tar = gnu_tar(src.path(), &[format, "-S", &v]);
            let what = format!("{format} {v}");
            assert!(
                tar.len() < 4 << 20,
                "{what}: GNU tar wrote a sparse archive"
            );
            assert!(
                tar.windows(11).any(|w| w == b"GNU.sparse."),
                "{what}: no GNU.sparse records"
            );
            assert!(tar.windows(18).any(|w| w == b"SCHILY.xattr.user."));
            check(&tar, src.path(), &what);
            let dest = tempfile::tempdir().unwrap();
            let n = apply_layer(dest.path(), &tar[..], &ApplyOptions::default()).unwrap();
            assert_eq!(n, (32 << 20) + 10, "{what}: bytes counted at the real size");
            assert_holes(&dest.path().join("sparse"), 32 << 20);
        }
    }
}

#[test]
fn old_gnu_sparse_with_many_segments() {
    // More than 4 segments: the old-GNU header overflows into extension blocks.
    use std::os::unix::fs::FileExt;
    let src = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(src.path().join("many")).unwrap();
    f.set_len(64 << 20).unwrap();
    for i in 0..40u64 {
        f.write_all_at(&[i as u8 + 1; 5000], i * (1 << 20) + 7)
            .unwrap();
    }
    drop(f);
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for e in ["many", "."] {
        filetime::set_symlink_file_times(src.path().join(e), t, t).unwrap();
    }
    for args in [
        &["--format=gnu", "-S"][..],
        &["--format=posix", "-S", "--sparse-version=1.0"],
    ] {
        let tar = gnu_tar(src.path(), args);
        check(&tar, src.path(), &format!("{args:?}"));
        let dest = tempfile::tempdir().unwrap();
        apply_layer(dest.path(), &tar[..], &ApplyOptions::default()).unwrap();
        assert_holes(&dest.path().join("many"), 64 << 20);
    }
}

#[test]
fn python_tarfile_round_trips() {
    let src = tempfile::tempdir().unwrap();
    source_tree(src.path());
    let out = Command::new("python3")
        .args(["-c", "import sys,tarfile\nt=tarfile.open(fileobj=sys.stdout.buffer,mode='w|',format=tarfile.PAX_FORMAT)\nt.add(sys.argv[1],arcname='.')\nt.close()"])
        .arg(src.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // python's tarfile writes no xattrs.
    let opts = CompareOptions {
        xattrs: false,
        ..CompareOptions::default()
    };
    let dest = tempfile::tempdir().unwrap();
    apply_layer(dest.path(), &out.stdout[..], &ApplyOptions::default()).unwrap();
    if let Err(diff) = assert_same_tree(src.path(), dest.path(), &opts) {
        panic!("python tarfile:\n{diff}");
    }
}
