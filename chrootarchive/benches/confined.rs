//! Cost of the confinement: one confined apply of a small layer versus the in-process
//! `archive::apply_layer`, and the same confined apply after the process has grown its resident
//! memory by 512 MiB (fork copies page tables, so its cost grows with RSS).
//!
//! Needs root (mount namespaces); without it only the in-process number is reported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use archive::ApplyOptions;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h
}

/// A small layer: 3 directories, 20 files of 1–4 KiB, a symlink.
fn small_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in ["etc", "usr", "usr/lib"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, d, &[][..]).unwrap();
    }
    for i in 0..20 {
        let data = vec![i as u8; 1024 * (1 + i % 4)];
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, format!("usr/lib/f{i}"), &data[..])
            .unwrap();
    }
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "etc/link", "/usr/lib/f1").unwrap();
    b.into_inner().unwrap()
}

fn root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping the confined benchmarks: they need root for mount namespaces");
    }
    root
}

/// fork, `_exit(0)` in the child, waitpid: the floor under every confined apply.
fn bare_fork() {
    // SAFETY: the child only calls `_exit`, which is async-signal-safe.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: ends the child at once, running nothing of the parent's state.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::sys::wait::waitpid(child, None).unwrap();
        }
    }
}

fn bench_small_layer(c: &mut Criterion) {
    let layer = small_layer();
    let opts = ApplyOptions::default();
    let mut g = c.benchmark_group("apply_small_layer");
    g.bench_function("in_process", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |d| {
                black_box(archive::apply_layer(d.path(), &layer[..], &opts).unwrap());
                d
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("bare_fork_exit_wait", |b| b.iter(bare_fork));
    if root() {
        g.bench_function("confined", |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |d| {
                    black_box(chrootarchive::apply_layer(d.path(), &layer[..], &opts).unwrap());
                    d
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_large_rss(c: &mut Criterion) {
    let layer = small_layer();
    let opts = ApplyOptions::default();
    // Grow the resident set by 512 MiB: allocate and touch every page.
    let mut ballast = vec![0u8; 512 << 20];
    for i in (0..ballast.len()).step_by(4096) {
        ballast[i] = 1;
    }
    black_box(&ballast);
    let mut g = c.benchmark_group("apply_small_layer_rss_plus_512MiB");
    g.bench_function("bare_fork_exit_wait", |b| b.iter(bare_fork));
    if root() {
        g.bench_function("confined", |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |d| {
                    black_box(chrootarchive::apply_layer(d.path(), &layer[..], &opts).unwrap());
                    d
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.bench_function("in_process", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |d| {
                black_box(archive::apply_layer(d.path(), &layer[..], &opts).unwrap());
                d
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    drop(black_box(ballast));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench_small_layer, bench_large_rss
}
criterion_main!(benches);
