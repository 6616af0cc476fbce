//! `changes` on a generated 100 000-file tree (1 000 directories × 100 files) against its
//! hardlink-copied child (the image-layer case: files shared, directories copied), against a real
//! copy, and `tar_tree` export. `ARCHIVE_BENCH_DIRS=100` makes a 10 000-file tree for a quick run.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::path::Path;

use archive::{TarOptions, changes, tar_tree};
use criterion::{Criterion, criterion_group, criterion_main};

/// Directories in the generated tree (100 files each).
fn dirs() -> usize {
    std::env::var("ARCHIVE_BENCH_DIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn generate(root: &Path) {
    for d in 0..dirs() {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(
                dir.join(format!("f{f:03}")),
                format!("file {d}/{f}\n").repeat(8),
            )
            .unwrap();
        }
    }
}

/// New directories, hardlinked files (how image drivers build a child).
fn hardlink_copy(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            hardlink_copy(&s, &d);
        } else {
            fs::hard_link(&s, &d).unwrap();
        }
    }
}

/// Independent copies of every file with the same mtimes.
fn real_copy(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (s, d) = (e.path(), dst.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            real_copy(&s, &d);
        } else {
            fs::copy(&s, &d).unwrap();
            let mt = filetime::FileTime::from_last_modification_time(&e.metadata().unwrap());
            filetime::set_file_mtime(&d, mt).unwrap();
        }
    }
}

fn bench(c: &mut Criterion) {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    let child = t.path().join("child");
    let copy = t.path().join("copy");
    generate(&base);
    hardlink_copy(&base, &child);
    real_copy(&base, &copy);
    // A few real changes in the child.
    fs::remove_file(child.join("d050/f050")).unwrap();
    fs::write(child.join("d050/f050"), "changed").unwrap();
    fs::write(child.join("d099/new"), "new").unwrap();
    // d010 is removed (one Delete); d050 and d099 are reported as Modify with their changes.
    fs::remove_dir_all(child.join("d010")).unwrap();
    assert_eq!(changes(&child, Some(&base)).unwrap().len(), 5);

    let mut g = c.benchmark_group(format!("walk_{}_files", dirs() * 100));
    g.sample_size(10);
    g.bench_function("changes_hardlinked_child", |b| {
        b.iter(|| changes(&child, Some(&base)).unwrap())
    });
    g.bench_function("changes_real_copy", |b| {
        b.iter(|| changes(&copy, Some(&base)).unwrap())
    });
    g.bench_function("changes_no_parent", |b| {
        b.iter(|| changes(&base, None).unwrap())
    });
    g.bench_function("tar_tree", |b| {
        b.iter(|| {
            let mut s = tar_tree(&base, &TarOptions::default()).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
