//! Helpers shared by the drivers' integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::path::Path;

use graphdriver::LayerId;

/// True if the test may run: root, or CI=true (where a non-root run must fail loudly).
pub fn root_or_skip(test: &str) -> bool {
    test_support::root_or_skip(&format!("{test} (mounts, mknod, chown)"))
}

pub fn id(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

/// The layer tar of the tree at `dir` (whole tree, `.wh.` files as they are).
pub fn tar_of(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    archive::tar_tree(dir, &archive::TarOptions::default())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Writes `files` (path, content) under `dir`, creating parents.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = dir.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, c).unwrap();
    }
}

/// Count of mount entries for `path` in /proc/self/mountinfo.
pub fn mounts_at(path: &Path) -> usize {
    drivers::mountinfo::mount_count(path).unwrap()
}
