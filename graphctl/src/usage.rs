//! `graphctl usage` and the usage line of `info`: the disk space and inodes a layer's own
//! storage holds, as `ctr snapshots usage` reports them.

use std::collections::HashSet;
use std::ffi::CStr;
use std::os::fd::BorrowedFd;
use std::path::Path;

use anyhow::{Context, Result};
use archive::fs::{self as layerfs, FileType, Stat, Visitor, WalkError};
use graphdriver::{LayerId, LayerStore};

/// What a layer's directory holds on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated (`st_blocks` × 512, as `du`), each inode counted once.
    pub bytes: u64,
    /// Inodes (files, directories, links…), each counted once.
    pub inodes: u64,
}

/// Counts unique inodes below one directory, staying on its filesystem (a layer's mount point
/// is not descended into).
struct Counter {
    dev: u64,
    seen: HashSet<u64>,
    usage: Usage,
}

impl Counter {
    fn count(&mut self, st: &Stat) {
        if self.seen.insert(st.st_ino) {
            self.usage.inodes += 1;
            self.usage.bytes += u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512);
        }
    }
}

impl Visitor for Counter {
    type Error = WalkError;

    fn entry(
        &mut self,
        _dir: BorrowedFd<'_>,
        _name: &CStr,
        _rel: &[u8],
        st: &Stat,
    ) -> Result<bool, WalkError> {
        if st.st_dev != self.dev {
            // A mount point (a layer's merged view): its contents are not this layer's storage.
            return Ok(false);
        }
        self.count(st);
        Ok(FileType::from_raw_mode(st.st_mode) == FileType::Directory)
    }
}

/// The usage of layer `id` of `store`: everything below its directory, without following
/// symbolic links or crossing into mounts.
pub fn layer_usage(store: &LayerStore, id: &LayerId) -> Result<Usage> {
    let dir = store.require(id)?;
    usage_of(&dir).with_context(|| format!("measure the disk usage of layer {id}"))
}

/// The usage of the tree at `dir` (the directory itself included).
fn usage_of(dir: &Path) -> Result<Usage> {
    let fd = layerfs::open_root_dir(dir).with_context(|| format!("open {}", dir.display()))?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("stat {}", dir.display()))?;
    let mut counter = Counter {
        dev: st.st_dev,
        seen: HashSet::new(),
        usage: Usage::default(),
    };
    counter.count(&st);
    layerfs::walk(fd, dir, &mut counter)?;
    Ok(counter.usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardlinks count once, directories and symlinks count as inodes, and the byte count is
    /// the allocation, not the apparent size of a sparse file.
    #[test]
    fn counts_each_inode_once_and_allocated_bytes() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/data"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(d.join("sub/data"), d.join("link")).unwrap();
        std::os::unix::fs::symlink("sub/data", d.join("sym")).unwrap();
        let sparse = std::fs::File::create(d.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let u = usage_of(d).unwrap();
        // The root, sub, data (with its link), sym, sparse.
        assert_eq!(u.inodes, 5);
        assert!(u.bytes >= 64 * 1024, "{u:?}");
        assert!(
            u.bytes < 1 << 20,
            "a sparse GiB counted as allocated: {u:?}"
        );
    }
}
