//! moby graphtest's driver benchmarks on the overlay driver: DiffN (10/10, 10/10 000,
//! 10 000/10), DiffApplyN(100) and DeepLayerRead(20).
//!
//! Layers are filled the way graphtest's `addManyFiles` does it: through the driver's `get`
//! path, `directory-N/file-M`, 100 files per directory, 64 random bytes each. Needs root (the
//! overlay driver mounts); elsewhere, or where the driver cannot be opened, nothing is measured
//! and the reason is printed. `cargo xtask bench` runs the same operations on its scratch
//! filesystem with the rest of the side-by-side report.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use graphdriver::{Config, Driver, LayerId, MountOpts};

// Links the in-tree drivers so `graphdriver::open` finds "overlay".
use drivers as _;

fn open() -> Option<(tempfile::TempDir, Box<dyn Driver>)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("graphtest benches skipped: the overlay driver needs root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        driver: Some("overlay".into()),
        ..Config::new(dir.path())
    };
    match graphdriver::open(&cfg) {
        Ok(sel) => Some((dir, sel.driver)),
        Err(e) => {
            eprintln!("graphtest benches skipped: cannot open the overlay driver: {e}");
            None
        }
    }
}

fn id(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

/// SplitMix64 bytes for file `n` of `seed`.
fn content(seed: u64, n: u64) -> [u8; 64] {
    let mut state = seed.wrapping_mul(0x9E37_79B9).wrapping_add(n);
    let mut out = [0u8; 64];
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// graphtest's `addManyFiles`.
fn add_many_files(d: &dyn Driver, layer: &LayerId, count: usize, seed: u64) {
    let root = d.get(layer, &MountOpts::default()).unwrap();
    for i in (0..count).step_by(100) {
        let dir = root.join(format!("directory-{i}"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..100.min(count - i) {
            fs::write(dir.join(format!("file-{j}")), content(seed, (i + j) as u64)).unwrap();
        }
    }
    d.put(layer).unwrap();
}

fn layer_pair(d: &dyn Driver, tag: &str, bottom: usize, top: usize) -> (LayerId, LayerId) {
    let (base, upper) = (id(&format!("{tag}-base")), id(&format!("{tag}-upper")));
    d.create(&base, None).unwrap();
    add_many_files(d, &base, bottom, 3);
    d.create(&upper, Some(&base)).unwrap();
    add_many_files(d, &upper, top, 6);
    (base, upper)
}

fn diff_n(c: &mut Criterion) {
    let Some((_dir, d)) = open() else { return };
    let mut g = c.benchmark_group("graphtest/DiffN");
    g.sample_size(10);
    for (bottom, top) in [(10, 10), (10, 10_000), (10_000, 10)] {
        let (base, upper) = layer_pair(d.as_ref(), &format!("diffn-{bottom}-{top}"), bottom, top);
        g.bench_function(format!("{bottom}/{top}"), |b| {
            b.iter(|| {
                let mut r = d.diff(&upper, Some(&base)).unwrap();
                io::copy(&mut r, &mut io::sink()).unwrap()
            })
        });
    }
    g.finish();
    d.cleanup().unwrap();
}

fn diff_apply_n(c: &mut Criterion) {
    let Some((_dir, d)) = open() else { return };
    let (base, upper) = layer_pair(d.as_ref(), "diffapply", 100, 100);
    let mut diff = Vec::new();
    d.diff(&upper, Some(&base))
        .unwrap()
        .read_to_end(&mut diff)
        .unwrap();
    let mut n = 0u64;
    let mut g = c.benchmark_group("graphtest/DiffApplyN");
    g.sample_size(10);
    g.bench_function("100", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let l = id(&format!("applied-{n}"));
                let t = Instant::now();
                d.create(&l, Some(&base)).unwrap();
                d.apply_diff(&l, Some(&base), &mut &diff[..]).unwrap();
                total += t.elapsed();
                d.remove(&l).unwrap();
            }
            total
        })
    });
    g.finish();
    d.cleanup().unwrap();
}

fn deep_layer_read(c: &mut Criterion) {
    let Some((_dir, d)) = open() else { return };
    let mut parent: Option<LayerId> = None;
    for i in 0..20 {
        let l = id(&format!("deep-{i:02}"));
        d.create(&l, parent.as_ref()).unwrap();
        let root = d.get(&l, &MountOpts::default()).unwrap();
        if i == 0 {
            fs::write(root.join("testfile.txt"), content(1, 0)).unwrap();
        }
        fs::write(root.join(format!("layer-{i:02}")), [i as u8]).unwrap();
        d.put(&l).unwrap();
        parent = Some(l);
    }
    let top = parent.unwrap();
    let mut g = c.benchmark_group("graphtest/DeepLayerRead");
    g.sample_size(20);
    g.bench_function("20", |b| {
        b.iter(|| {
            let root = d.get(&top, &MountOpts::default()).unwrap();
            let data = fs::read(Path::new(&root).join("testfile.txt")).unwrap();
            d.put(&top).unwrap();
            assert_eq!(data, content(1, 0));
        })
    });
    g.finish();
    d.cleanup().unwrap();
}

criterion_group!(benches, diff_n, diff_apply_n, deep_layer_read);
criterion_main!(benches);
