//! The apply's bookkeeping spilled to its scratch file: every test here runs with a spill limit
//! of one byte (`set_spill_limit`, process-wide in this test binary), so the written paths,
//! the opaque directories and the directory times all go through sorted runs and the merge
//! instead of memory; what the apply does must not change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use apply_util::Tb;
use archive::{ApplyOptions, TarOptions, apply_layer, untar};
use tar::EntryType;

fn tiny_spill() {
    archive::set_spill_limit(1);
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn mtime(p: &Path) -> i64 {
    std::fs::symlink_metadata(p).unwrap().mtime()
}

fn dir_at(t: &mut Tb, name: &str, mtime: u64) {
    t.entry(EntryType::Directory, name, 0o755, (0, 0), mtime, None, b"");
}

/// An opaque marker at the very end of a long layer: everything the layer wrote in the
/// directory (and below it, and hardlinked from elsewhere) stays, lower content goes.
#[test]
fn opaque_after_many_files_keeps_what_the_layer_wrote() {
    tiny_spill();
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir_all(p.join("dir/sub")).unwrap();
    std::fs::create_dir_all(p.join("dir/lowerdir/x")).unwrap();
    std::fs::create_dir_all(p.join("other")).unwrap();
    std::fs::write(p.join("dir/old"), b"lower").unwrap();
    std::fs::write(p.join("dir/f-lower"), b"lower").unwrap();
    std::fs::write(p.join("dir/sub/deep"), b"lower").unwrap();
    std::fs::write(p.join("other/o"), b"lower").unwrap();
    let mut t = Tb::new();
    t.dir("dir");
    for i in 0..300 {
        t.file(&format!("dir/f{i}"), b"mine");
    }
    t.file("dir/sub/mine", b"mine");
    for i in 0..100 {
        t.file(&format!("else/e{i}"), b"e");
    }
    t.hardlink("else/link", "dir/f7");
    t.file("dir/late", b"late");
    t.file("dir/.wh..wh..opq", b"");
    let tar = t.finish();
    apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
    for i in 0..300 {
        assert_eq!(std::fs::read(p.join(format!("dir/f{i}"))).unwrap(), b"mine");
    }
    assert_eq!(std::fs::read(p.join("dir/sub/mine")).unwrap(), b"mine");
    assert_eq!(std::fs::read(p.join("dir/late")).unwrap(), b"late");
    assert_eq!(std::fs::read(p.join("else/link")).unwrap(), b"mine");
    for gone in ["dir/old", "dir/f-lower", "dir/sub/deep", "dir/lowerdir"] {
        assert!(!exists(&p.join(gone)), "{gone}");
    }
    assert!(!exists(&p.join("dir/.wh..wh..opq")));
    assert_eq!(std::fs::read(p.join("other/o")).unwrap(), b"lower");
    // The scratch file left nothing behind.
    let mut names: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dir", "else", "other"]);
}

/// Many opaque directories (more runs than are merged at once), some nested, one at the
/// root of another's kept subdirectory, markers before and after the entries.
#[test]
fn many_and_nested_opaque_directories() {
    tiny_spill();
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for i in 0..40 {
        std::fs::create_dir_all(p.join(format!("o{i}/sub/inner"))).unwrap();
        std::fs::write(p.join(format!("o{i}/old")), b"lower").unwrap();
        std::fs::write(p.join(format!("o{i}/sub/old")), b"lower").unwrap();
        std::fs::write(p.join(format!("o{i}/sub/inner/old")), b"lower").unwrap();
    }
    std::fs::write(p.join("keep"), b"lower").unwrap();
    let mut t = Tb::new();
    for i in 0..40 {
        if i % 2 == 0 {
            t.file(&format!("o{i}/.wh..wh..opq"), b"");
        }
        t.file(&format!("o{i}/new"), b"n");
        t.file(&format!("o{i}/sub/inner/new"), b"n");
    }
    for i in 0..40 {
        if i % 2 == 1 {
            t.file(&format!("o{i}/.wh..wh..opq"), b"");
        }
        if i % 3 == 0 {
            t.file(&format!("o{i}/sub/.wh..wh..opq"), b"");
        }
    }
    let tar = t.finish();
    apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
    for i in 0..40 {
        assert!(exists(&p.join(format!("o{i}/new"))), "{i}");
        assert!(exists(&p.join(format!("o{i}/sub/inner/new"))), "{i}");
        for gone in ["old", "sub/old", "sub/inner/old"] {
            assert!(!exists(&p.join(format!("o{i}/{gone}"))), "o{i}/{gone}");
        }
    }
    assert!(exists(&p.join("keep")));
}

/// An opaque marker at the root, after the layer wrote into lower directories.
#[test]
fn opaque_root() {
    tiny_spill();
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir_all(p.join("a/b")).unwrap();
    std::fs::write(p.join("a/b/old"), b"lower").unwrap();
    std::fs::write(p.join("a-b"), b"lower").unwrap();
    std::fs::write(p.join("z"), b"lower").unwrap();
    let tar = Tb::new()
        .file("a/b/new", b"n")
        .file("a-c", b"n")
        .file(".wh..wh..opq", b"")
        .finish();
    apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
    assert!(exists(&p.join("a/b/new")));
    assert!(exists(&p.join("a-c")));
    for gone in ["a/b/old", "a-b", "z"] {
        assert!(!exists(&p.join(gone)), "{gone}");
    }
}

/// An opaque directory named through a symlink the layer planted inside another opaque
/// directory: the outer walk keeps the symlink without entering it, and the inner directory
/// is pruned on its own, resolved beneath the target (as without spilling).
#[test]
fn opaque_through_a_symlink_inside_an_opaque_directory() {
    tiny_spill();
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir_all(p.join("b")).unwrap();
    std::fs::write(p.join("b/old"), b"lower").unwrap();
    std::fs::create_dir_all(p.join("a")).unwrap();
    std::fs::write(p.join("a/old"), b"lower").unwrap();
    let tar = Tb::new()
        .dir("a")
        .symlink("a/s", "/b")
        .file("a/.wh..wh..opq", b"")
        .file("a/s/.wh..wh..opq", b"")
        .file("a/s/new", b"n")
        .finish();
    apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
    assert!(!exists(&p.join("a/old")));
    assert_eq!(std::fs::read_link(p.join("a/s")).unwrap(), Path::new("/b"));
    assert!(!exists(&p.join("b/old")));
    assert_eq!(std::fs::read(p.join("b/new")).unwrap(), b"n");
}

/// Directory times are right after the apply although the stream leaves directories and
/// comes back into them, repeats their entries (the last metadata wins) and every record is
/// spilled; for layers and plain tars alike.
#[test]
fn directory_times_after_reentry_and_repeats() {
    tiny_spill();
    for plain in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mut t = Tb::new();
        for i in 0..50u64 {
            dir_at(&mut t, &format!("d{i}"), 1_000_000 + i);
            dir_at(&mut t, &format!("d{i}/sub"), 2_000_000 + i);
            t.file(&format!("d{i}/f"), b"x");
        }
        // Back into every directory after the stream left it.
        for i in 0..50u64 {
            t.file(&format!("d{i}/late"), b"x");
            t.file(&format!("d{i}/sub/late"), b"x");
        }
        // A repeated entry: its last metadata wins, writes after it included.
        dir_at(&mut t, "d7", 3_000_000);
        t.file("d7/later", b"x");
        dir_at(&mut t, "d8/sub", 3_000_001);
        // A whiteout that changes a directory after its entry.
        t.file("d9/.wh.f", b"");
        let tar = t.finish();
        if plain {
            untar(p, &tar[..], &TarOptions::default()).unwrap();
        } else {
            apply_layer(p, &tar[..], &ApplyOptions::default()).unwrap();
            assert!(!exists(&p.join("d9/f")));
        }
        for i in 0..50i64 {
            let want = match i {
                7 => 3_000_000,
                _ => 1_000_000 + i,
            };
            assert_eq!(mtime(&p.join(format!("d{i}"))), want, "plain={plain} d{i}");
            let want = match i {
                8 => 3_000_001,
                _ => 2_000_000 + i,
            };
            assert_eq!(
                mtime(&p.join(format!("d{i}/sub"))),
                want,
                "plain={plain} d{i}/sub"
            );
        }
    }
}
