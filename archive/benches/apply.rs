//! Applying a generated layer of 10 000 small files into a fresh directory.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..100 {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_data(&mut h, format!("d{d}"), &b""[..]).unwrap();
        for f in 0..100 {
            let data = format!("file {d}/{f}\n").repeat(8);
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, format!("d{d}/f{f}"), data.as_bytes())
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn bench(c: &mut Criterion) {
    let tar = layer();
    let mut g = c.benchmark_group("apply");
    g.sample_size(10);
    g.bench_function("10k_small_files", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                archive::apply_layer(dir.path(), &tar[..], &archive::ApplyOptions::default())
                    .unwrap();
                dir
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
