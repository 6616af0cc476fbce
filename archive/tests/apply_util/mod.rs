//! Test-only helpers: build layer tars entry by entry (raw names allowed, for hostile tests).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use tar::{Builder, EntryType, Header};

/// Builds a tar in memory.
pub struct Tb {
    b: Builder<Vec<u8>>,
}

pub const MTIME: u64 = 1_600_000_000;

impl Tb {
    pub fn new() -> Self {
        Tb {
            b: Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, name: &[u8], mode: u32, size: u64) -> Header {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    pub fn pax(&mut self, recs: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(recs.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    #[allow(clippy::too_many_arguments)] // mirrors the tar header fields one by one
    pub fn entry(
        &mut self,
        kind: EntryType,
        name: &str,
        mode: u32,
        owner: (u64, u64),
        mtime: u64,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(kind, name.as_bytes(), mode, data.len() as u64);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(mtime);
        if let Some(l) = link {
            let f = &mut h.as_old_mut().linkname;
            f.fill(0);
            f[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(EntryType::Regular, name, 0o644, (0, 0), MTIME, None, data)
    }
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(EntryType::Directory, name, 0o755, (0, 0), MTIME, None, b"")
    }
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            EntryType::Symlink,
            name,
            0o777,
            (0, 0),
            MTIME,
            Some(target),
            b"",
        )
    }
    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            EntryType::Link,
            name,
            0o644,
            (0, 0),
            MTIME,
            Some(target),
            b"",
        )
    }
    pub fn device(
        &mut self,
        kind: EntryType,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, name.as_bytes(), mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &b""[..]).unwrap();
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// A fresh target dir plus a sibling "host" dir holding `victim` (content "host").
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("dest")).unwrap();
        std::fs::create_dir(tmp.path().join("host")).unwrap();
        std::fs::write(tmp.path().join("host/victim"), b"host").unwrap();
        std::fs::write(tmp.path().join("victim"), b"host").unwrap();
        Sandbox { tmp }
    }
    pub fn dest(&self) -> std::path::PathBuf {
        self.tmp.path().join("dest")
    }
    pub fn host(&self) -> std::path::PathBuf {
        self.tmp.path().join("host")
    }
    /// Asserts that the host files are untouched and nothing new appeared next to them.
    pub fn assert_host_untouched(&self) {
        assert_eq!(
            std::fs::read(self.tmp.path().join("host/victim")).unwrap(),
            b"host"
        );
        assert_eq!(
            std::fs::read(self.tmp.path().join("victim")).unwrap(),
            b"host"
        );
        let mut names: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dest", "host", "victim"]);
        let host: Vec<_> = std::fs::read_dir(self.host())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(host, ["victim"]);
    }
}
