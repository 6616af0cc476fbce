//! `copy_tree` against `cp -a` / `cp -al` on 100k files. Ignored by default (slow); run with
//! `cargo test --release -p drivers --test copy_bench -- --ignored --nocapture`. Prints the
//! timings (never asserted) and checks that the copies are equal to the source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use archive::compare::{CompareOptions, assert_same_tree};
use drivers::copy::{CopyMode, copy_tree};

fn tree(root: &Path, files: usize) {
    for i in 0..files {
        let dir = root.join(format!("d{:03}/e{:02}", i % 1000, (i / 1000) % 100));
        if i < 100_000 && !dir.exists() {
            fs::create_dir_all(&dir).unwrap();
        }
        fs::write(dir.join(format!("f{i}")), [b'x'; 16]).unwrap();
    }
}

#[test]
#[ignore = "benchmark: 100k files"]
fn copy_tree_vs_cp_on_100k_files() {
    let t = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let src = t.path().join("src");
    tree(&src, 100_000);
    let opts = CompareOptions::default();
    for (mode, flag) in [(CopyMode::Hardlink, "-al"), (CopyMode::Content, "-a")] {
        let ours = t.path().join(format!("ours{flag}"));
        let start = Instant::now();
        copy_tree(&src, &ours, mode).unwrap();
        let ours_t = start.elapsed();
        let theirs = t.path().join(format!("cp{flag}"));
        let start = Instant::now();
        let st = Command::new("cp")
            .arg(flag)
            .arg(&src)
            .arg(&theirs)
            .status()
            .unwrap();
        let cp_t = start.elapsed();
        assert!(st.success());
        println!("{mode:?}: copy_tree {ours_t:?}, cp {flag} {cp_t:?}");
        assert_same_tree(&src, &ours, &opts).unwrap();
        fs::remove_dir_all(&ours).unwrap();
        fs::remove_dir_all(&theirs).unwrap();
    }
}
