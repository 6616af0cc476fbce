//! Files with holes export as GNU PAX 1.0 sparse members: the tar is small, GNU tar and our own
//! apply restore content and holes, and files without holes stay plain members.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use archive::{
    ApplyOptions, Change, ChangeKind, TarOptions, apply_layer, export_changes, tar_tree,
};

const GIB: u64 = 1 << 30;

/// Data segments written into the sparse file: (offset, byte, length).
const SEGMENTS: [(u64, u8, usize); 3] = [
    (0, b'a', 1000),
    (300 << 20, b'b', 4096),
    (GIB - 8192, b'c', 3000),
];

/// A 1 GiB file holding a few KiB of data at `SEGMENTS`, then a hole to the end. Returns
/// `false` when the filesystem did not keep the holes (the test then has nothing to check).
fn make_sparse(path: &Path) -> bool {
    let f = File::create(path).unwrap();
    f.set_len(GIB).unwrap();
    for (off, b, len) in SEGMENTS {
        f.write_all_at(&vec![b; len], off).unwrap();
    }
    drop(f);
    let md = fs::metadata(path).unwrap();
    md.blocks() * 512 < 1 << 20
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

/// Checks the content of a restored sparse file at and around every segment, and its size.
fn assert_sparse_content(path: &Path) {
    let md = fs::metadata(path).unwrap();
    assert_eq!(md.len(), GIB, "{}", path.display());
    let f = File::open(path).unwrap();
    for (off, b, len) in SEGMENTS {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&x| x == b), "segment at {off}");
        // Just after the segment: a hole, read as zeros.
        let mut after = [1u8; 64];
        f.read_exact_at(&mut after, off + len as u64).unwrap();
        assert_eq!(after, [0u8; 64], "after segment at {off}");
    }
    let mut tail = [1u8; 64];
    f.read_exact_at(&mut tail, GIB - 64).unwrap();
    assert_eq!(tail, [0u8; 64]);
}

fn gnu_tar() -> bool {
    Command::new("tar")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GNU"))
}

#[test]
fn sparse_file_exports_small_and_gnu_tar_and_apply_restore_it() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    // A name over 100 bytes once GNUSparseFile.0/ is inserted: the real name must still win.
    let long = format!("dir/{}", "l".repeat(90));
    if !make_sparse(&src.join("dir/sparse")) {
        eprintln!(
            "skipped: the filesystem of {} keeps no holes",
            t.path().display()
        );
        return;
    }
    assert!(make_sparse(&src.join(&long)));
    fs::write(src.join("dense"), b"no holes here").unwrap();

    let tar = read_all(tar_tree(&src, &TarOptions::default()).unwrap());
    assert!(tar.len() < 256 * 1024, "tar is {} bytes", tar.len());
    assert!(
        tar.windows(16).any(|w| w == b"GNU.sparse.major"),
        "no sparse member"
    );

    // Our apply.
    let ours = t.path().join("ours");
    fs::create_dir(&ours).unwrap();
    apply_layer(&ours, &tar[..], &ApplyOptions::default()).unwrap();
    assert_sparse_content(&ours.join("dir/sparse"));
    assert_sparse_content(&ours.join(&long));
    assert_eq!(fs::read(ours.join("dense")).unwrap(), b"no holes here");
    assert!(!ours.join("dir/GNUSparseFile.0").exists());

    // GNU tar.
    if !gnu_tar() {
        if std::env::var_os("CI").is_some() {
            panic!("GNU tar is needed for this test on CI");
        }
        eprintln!("skipped the GNU tar half: no GNU tar on PATH");
        return;
    }
    let gnu = t.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let tar_path = t.path().join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&tar_path)
        .arg("-C")
        .arg(&gnu)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [gnu.join("dir/sparse"), gnu.join(&long)] {
        assert_sparse_content(&p);
        let blocks = fs::metadata(&p).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "{}: {blocks} blocks", p.display());
    }
    assert_eq!(fs::read(gnu.join("dense")).unwrap(), b"no holes here");
    assert!(!gnu.join("dir/GNUSparseFile.0").exists());
}

#[test]
fn export_changes_writes_sparse_files_sparse() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    if !make_sparse(&src.join("s")) {
        eprintln!(
            "skipped: the filesystem of {} keeps no holes",
            t.path().display()
        );
        return;
    }
    let list = [Change {
        path: "/s".into(),
        kind: ChangeKind::Add,
    }];
    let tar = read_all(export_changes(&src, &list, &TarOptions::default()).unwrap());
    assert!(tar.len() < 256 * 1024, "tar is {} bytes", tar.len());
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    apply_layer(&dst, &tar[..], &ApplyOptions::default()).unwrap();
    assert_sparse_content(&dst.join("s"));
}

/// Files without holes (and a file that is all hole) keep their exact plain form: no sparse
/// records for dense files, and an all-hole file's map is one empty segment at its end.
#[test]
fn dense_files_stay_plain_and_an_all_hole_file_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), vec![7u8; 100_000]).unwrap();
    fs::write(src.join("b"), b"").unwrap();
    let tar = read_all(tar_tree(&src, &TarOptions::default()).unwrap());
    assert!(!tar.windows(10).any(|w| w == b"GNU.sparse"));
    // The tar crate sees two plain regular members with the right data.
    let mut a = tar::Archive::new(&tar[..]);
    let mut seen = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        assert_eq!(e.header().entry_type(), tar::EntryType::Regular);
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        seen.push((name, read_all(&mut e).len()));
    }
    assert_eq!(seen, [("a".to_string(), 100_000), ("b".to_string(), 0)]);

    let hole = src.join("hole");
    File::create(&hole).unwrap().set_len(GIB).unwrap();
    if fs::metadata(&hole).unwrap().blocks() != 0 {
        return;
    }
    let tar = read_all(tar_tree(&src, &TarOptions::default()).unwrap());
    // "a" is 100,000 bytes; the 1 GiB hole adds a header and a one-line map.
    assert!(tar.len() < 110_000, "tar is {} bytes", tar.len());
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    apply_layer(&dst, &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(fs::metadata(dst.join("hole")).unwrap().len(), GIB);
    let mut buf = [1u8; 4096];
    File::open(dst.join("hole"))
        .unwrap()
        .read_exact_at(&mut buf, GIB / 2)
        .unwrap();
    assert_eq!(buf, [0u8; 4096]);
}
