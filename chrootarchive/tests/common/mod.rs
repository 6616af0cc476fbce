//! Helpers shared by the integration tests: root checks and raw (hostile) tar building.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

/// Whether root-only tests should run: always when `CI=true`; otherwise only as root (with a
/// printed reason when skipping).
pub fn need_root(test: &str) -> bool {
    test_support::root_or_skip(&format!("{test} (CAP_SYS_ADMIN for mount namespaces)"))
}

/// One tar entry described by raw bytes, so names like `../x` and `/abs` can be written.
pub struct Raw<'a> {
    pub name: &'a [u8],
    pub kind: tar::EntryType,
    pub link: &'a [u8],
    pub data: &'a [u8],
    pub mode: u32,
}

pub fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind: tar::EntryType::Regular,
        link: b"",
        data,
        mode: 0o644,
    }
}

pub fn dir(name: &str) -> Raw<'_> {
    Raw {
        name: name.as_bytes(),
        kind: tar::EntryType::Directory,
        link: b"",
        data: b"",
        mode: 0o755,
    }
}

pub fn symlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind: tar::EntryType::Symlink,
        link: target.as_bytes(),
        data: b"",
        mode: 0o777,
    }
}

pub fn hardlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind: tar::EntryType::Link,
        link: target.as_bytes(),
        data: b"",
        mode: 0o644,
    }
}

/// Builds a tar of `entries`, writing names and link names byte for byte (no validation).
pub fn tar_of(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        assert!(
            e.name.len() <= 100 && e.link.len() <= 100,
            "names fit the old header"
        );
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..e.name.len()].copy_from_slice(e.name);
        old.linkname = [0; 100];
        old.linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Number of open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A host file the hostile layers aim at, with its original content and link count.
pub struct Victim {
    pub path: std::path::PathBuf,
    pub content: Vec<u8>,
}

impl Victim {
    pub fn new(path: &Path) -> Self {
        let content = b"host-original\n".to_vec();
        std::fs::write(path, &content).unwrap();
        Victim {
            path: path.to_owned(),
            content,
        }
    }

    /// Panics unless the file still has its content, one link and mode 0644.
    pub fn assert_untouched(&self) {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&self.path).unwrap();
        assert!(
            meta.is_file(),
            "{} is no longer a regular file",
            self.path.display()
        );
        assert_eq!(meta.nlink(), 1, "{} gained a hardlink", self.path.display());
        assert_eq!(std::fs::read(&self.path).unwrap(), self.content);
    }
}

/// Lists a directory's names, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
