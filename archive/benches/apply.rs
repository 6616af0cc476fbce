//! The apply hot paths on generated layers: 100 000 small files (1 000 directories × 100;
//! `ARCHIVE_BENCH_DIRS=100` for a quick 10 000-file run), the same count of empty files (header
//! parsing and entry creation only), and whiteout handling (`.wh.` deletions and opaque
//! directories applied onto an existing tree).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// Directories in the generated layers (100 files each).
fn dirs() -> usize {
    std::env::var("ARCHIVE_BENCH_DIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h
}

/// A layer of `dirs()` directories with 100 files each; `content` decides each file's data.
fn layer(content: impl Fn(usize, usize) -> String) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..dirs() {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("d{d}"), &b""[..]).unwrap();
        for f in 0..100 {
            let data = content(d, f);
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, format!("d{d}/f{f}"), data.as_bytes())
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// Deletes every other file of the tree `layer` wrote, and makes every tenth directory opaque
/// (keeping one file this layer writes there).
fn whiteout_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..dirs() {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("d{d}"), &b""[..]).unwrap();
        if d % 10 == 0 {
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, format!("d{d}/.wh..wh..opq"), &b""[..])
                .unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 4);
            b.append_data(&mut h, format!("d{d}/kept"), &b"kept"[..])
                .unwrap();
            continue;
        }
        for f in (0..100).step_by(2) {
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, format!("d{d}/.wh.f{f}"), &b""[..])
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn apply(dest: &Path, tar: &[u8]) -> u64 {
    archive::apply_layer(dest, tar, &archive::ApplyOptions::default()).unwrap()
}

fn bench(c: &mut Criterion) {
    let files = layer(|d, f| format!("file {d}/{f}\n").repeat(8));
    let empty = layer(|_, _| String::new());
    let whiteouts = whiteout_layer();
    let mut g = c.benchmark_group(format!("apply_{}_files", dirs() * 100));
    g.sample_size(10);
    g.bench_function("small_files", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                apply(dir.path(), &files);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("empty_files_headers", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                apply(dir.path(), &empty);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("whiteouts_and_opaque_dirs", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                apply(dir.path(), &empty);
                dir
            },
            |dir| {
                apply(dir.path(), &whiteouts);
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    // The whiteout layer did what it claims (checked once, outside the timings).
    let dir = tempfile::tempdir().unwrap();
    apply(dir.path(), &empty);
    apply(dir.path(), &whiteouts);
    assert!(!dir.path().join("d1/f0").exists());
    assert!(dir.path().join("d1/f1").exists());
    assert_eq!(fs::read_dir(dir.path().join("d0")).unwrap().count(), 1);
}

criterion_group!(benches, bench);
criterion_main!(benches);
