//! Deterministic corpora: the same spec and seed always give the same tree.
//!
//! * `small`: `files` regular files of 0..=`max_size` bytes spread round-robin over `dirs` leaf
//!   directories (`dNN/sNNN`, 100 per top-level directory), plus `symlinks` symlinks (one in
//!   four absolute and dangling, the others relative to a file in the same directory). Contents
//!   come from a per-file SplitMix64 stream, so any file can be regenerated on its own. Every
//!   7th file is mode 0755, the rest 0644; files and directories get a fixed mtime.
//! * `upper`: a hardlinked copy of `small` (`cp -al`, so unchanged files share inodes, as in
//!   an image layer built by the overlay driver) where file `i` is deleted when `i % 20 == 0`,
//!   rewritten (new inode, new content) when `i % 10 == 0` otherwise, the last leaf directory is
//!   removed, and `added` new files are created (one in ten in a new directory `new/`).
//!   That is 5 % of the files modified and 5 % deleted.
//! * `graphtest` files: the layout of moby's `addManyFiles` (`directory-N/file-M`, 100 per
//!   directory, 64 random bytes each), for the DiffN / DiffApplyN cases.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The fixed mtime of generated files and directories: 2023-11-14T22:13:20Z.
pub const MTIME: u64 = 1_700_000_000;

/// SplitMix64: tiny, fast and fully determined by its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the slight modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The shape of the `small` and `upper` corpora.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Regular files in `small`.
    pub files: usize,
    /// Leaf directories in `small`.
    pub dirs: usize,
    /// Symlinks in `small`.
    pub symlinks: usize,
    /// Largest file size in bytes (sizes are uniform in `0..=max_size`).
    pub max_size: usize,
    /// Files added in `upper`.
    pub added: usize,
    /// The seed everything derives from.
    pub seed: u64,
}

impl Spec {
    /// The corpus: 100 000 files of 0–8 KiB in 1 000 directories, 1 000 symlinks,
    /// 5 000 files added in `upper`.
    pub fn full() -> Spec {
        Spec {
            files: 100_000,
            dirs: 1_000,
            symlinks: 1_000,
            max_size: 8 * 1024,
            added: 5_000,
            seed: 0x6772_6170_6864_7276,
        }
    }

    /// The `--quick` corpus: a tenth of the full one.
    pub fn quick() -> Spec {
        Spec {
            files: 10_000,
            dirs: 100,
            symlinks: 100,
            added: 500,
            ..Spec::full()
        }
    }

    /// The leaf directory of index `d`, relative to the root.
    pub fn dir(&self, d: usize) -> PathBuf {
        PathBuf::from(format!("d{:02}/s{:03}", d / 100, d % 100))
    }

    /// The path of file `i` relative to the root (file `i` lives in directory `i % dirs`).
    pub fn file(&self, i: usize) -> PathBuf {
        self.dir(i % self.dirs).join(format!("f{i:06}"))
    }

    /// The content of file `i` in generation `gen` (0 for `small`, 1 for rewritten files).
    pub fn content(&self, i: usize, generation: u64) -> Vec<u8> {
        let mut rng =
            Rng::new(self.seed ^ (i as u64).wrapping_mul(0x100_0000_01B3) ^ (generation << 56));
        let len = rng.below(self.max_size as u64 + 1) as usize;
        let mut buf = vec![0; len];
        rng.fill(&mut buf);
        buf
    }

    /// The mode of file `i`.
    pub fn mode(&self, i: usize) -> u32 {
        if i.is_multiple_of(7) { 0o755 } else { 0o644 }
    }

    /// Symlink `j`: its path and its target.
    pub fn symlink(&self, j: usize) -> (PathBuf, PathBuf) {
        let d = j % self.dirs;
        let path = self.dir(d).join(format!("l{j:05}"));
        let target = if j.is_multiple_of(4) {
            PathBuf::from(format!("/nonexistent/target{j}"))
        } else {
            // File `d` lives in directory `d`.
            PathBuf::from(format!("f{d:06}"))
        };
        (path, target)
    }
}

fn mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(MTIME)
}

/// Writes `data` to a new file `path` with `mode` and the fixed mtime.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    // The umask may have cleared bits; the corpus must not depend on it.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.set_modified(mtime())?;
    Ok(())
}

/// Gives every directory under `root` (and `root`) the fixed mtime, children first.
fn fix_dir_mtimes(root: &Path) -> Result<()> {
    for e in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            fix_dir_mtimes(&e.path())?;
        }
    }
    File::open(root)?.set_modified(mtime())?;
    Ok(())
}

/// Creates the `small` tree at `root` (which must not exist).
pub fn generate_small(spec: &Spec, root: &Path) -> Result<()> {
    if root.exists() {
        bail!("corpus directory {} already exists", root.display());
    }
    fs::create_dir_all(root)?;
    for d in 0..spec.dirs {
        fs::create_dir_all(root.join(spec.dir(d)))?;
    }
    for i in 0..spec.files {
        write_file(&root.join(spec.file(i)), &spec.content(i, 0), spec.mode(i))?;
    }
    for j in 0..spec.symlinks {
        let (path, target) = spec.symlink(j);
        std::os::unix::fs::symlink(&target, root.join(&path))
            .with_context(|| format!("creating symlink {}", path.display()))?;
    }
    fix_dir_mtimes(root)
}

/// Creates the `upper` tree at `upper` from the `small` tree at `small` (see the module docs).
pub fn generate_upper(spec: &Spec, small: &Path, upper: &Path) -> Result<()> {
    super::run_cmd(
        std::process::Command::new("cp")
            .arg("-al")
            .arg(small)
            .arg(upper),
    )?;
    let removed_dir = spec.dirs - 1;
    for i in 0..spec.files {
        if i % spec.dirs == removed_dir {
            continue;
        }
        let p = upper.join(spec.file(i));
        if i % 20 == 0 {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if i % 10 == 0 {
            // Write a new inode and rename it over: never write through the hardlink.
            let tmp = p.with_extension("tmp");
            write_file(&tmp, &spec.content(i, 1), spec.mode(i))?;
            fs::rename(&tmp, &p)?;
        }
    }
    fs::remove_dir_all(upper.join(spec.dir(removed_dir)))?;
    fs::create_dir(upper.join("new"))?;
    for k in 0..spec.added {
        let i = spec.files + k;
        let p = if k % 10 == 0 {
            PathBuf::from(format!("new/n{i:06}"))
        } else {
            spec.dir(k % removed_dir.max(1)).join(format!("n{i:06}"))
        };
        write_file(&upper.join(p), &spec.content(i, 0), 0o644)?;
    }
    fix_dir_mtimes(upper)
}

/// Creates the `added` tree at `root`: the `spec.added` files that `upper` adds (same names,
/// same contents), spread over the leaf directories of `small`, plus one in ten in `new/`: a
/// layer of new files that lands in existing directories of the `small` base.
pub fn generate_added(spec: &Spec, root: &Path) -> Result<()> {
    if root.exists() {
        bail!("corpus directory {} already exists", root.display());
    }
    fs::create_dir_all(root.join("new"))?;
    for k in 0..spec.added {
        let i = spec.files + k;
        let p = if k % 10 == 0 {
            PathBuf::from(format!("new/n{i:06}"))
        } else {
            spec.dir(k % spec.dirs).join(format!("n{i:06}"))
        };
        let p = root.join(p);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        write_file(&p, &spec.content(i, 0), 0o644)?;
    }
    fix_dir_mtimes(root)
}

/// Writes `layers` layer tars of the `small` tree at `small` to `tar_path(k)`: layer `k`
/// holds the leaf directories `d` with `d * layers / spec.dirs == k` (with their files and
/// symlinks) and the top-level directories they need, so applied in sequence they rebuild
/// `small`. Entries come in sorted order; metadata is taken from the tree (fixed mtimes).
pub fn split_small_into_layers(
    spec: &Spec,
    small: &Path,
    layers: usize,
    mut tar_path: impl FnMut(usize) -> PathBuf,
) -> Result<()> {
    for k in 0..layers {
        let path = tar_path(k);
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, f));
        b.follow_symlinks(false);
        let mut last_top = None;
        for d in (0..spec.dirs).filter(|d| d * layers / spec.dirs.max(1) == k) {
            let rel = spec.dir(d);
            let top = rel.parent().map(Path::to_path_buf);
            if let Some(top) = top
                && last_top.as_ref() != Some(&top)
            {
                b.append_path_with_name(small.join(&top), &top)?;
                last_top = Some(top);
            }
            b.append_path_with_name(small.join(&rel), &rel)?;
            let mut names: Vec<_> = fs::read_dir(small.join(&rel))
                .with_context(|| format!("reading {}", small.join(&rel).display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                b.append_path_with_name(small.join(&rel).join(&name), rel.join(&name))?;
            }
        }
        b.into_inner()?.flush()?;
    }
    Ok(())
}

/// Creates one file of `size` random bytes at `path` (the big-layer corpus).
pub fn generate_big(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.set_modified(mtime())?;
    Ok(())
}

/// The shape of a many-entry layer for the memory rows of `cargo xtask bench`.
#[derive(Clone, Copy, Debug)]
pub enum EntriesShape {
    /// `count` empty files, 1,000 to a directory.
    Files,
    /// `count` directory entries alternating between two paths (`a/`, `b/`): what a layer that
    /// repeats entries looks like to the applier.
    RepeatedDirs,
}

/// Writes a layer tar of `count` entries of `shape` to `path`, streamed (bounded memory).
pub fn generate_entries_tar(path: &Path, count: usize, shape: EntriesShape) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, f));
    let header = |kind: tar::EntryType, mode: u32, mtime: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for i in 0..count {
        match shape {
            EntriesShape::Files => {
                let dir = format!("d{:04}", i / 1000);
                if i % 1000 == 0 {
                    let mut h = header(tar::EntryType::Directory, 0o755, 1_700_000_000);
                    b.append_data(&mut h, format!("{dir}/"), io::empty())?;
                }
                let mut h = header(tar::EntryType::Regular, 0o644, 1_700_000_000);
                b.append_data(&mut h, format!("{dir}/f{i:07}"), io::empty())?;
            }
            EntriesShape::RepeatedDirs => {
                let name = if i % 2 == 0 { "a/" } else { "b/" };
                let mut h = header(tar::EntryType::Directory, 0o755, i as u64);
                b.append_data(&mut h, name, io::empty())?;
            }
        }
    }
    b.into_inner()?.flush()?;
    Ok(())
}

/// moby graphtest's `addManyFiles`: `count` files of 64 random bytes in `directory-N/file-M`.
pub fn graphtest_files(count: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(count);
    for i in (0..count).step_by(100) {
        for j in 0..100.min(count - i) {
            let mut rng = Rng::new(seed.wrapping_add((i + j) as u64));
            let mut data = vec![0; 64];
            rng.fill(&mut data);
            out.push((format!("directory-{i}/file-{j}"), data));
        }
    }
    out
}

/// A plain layer tar holding `files` (with their parent directories), built in memory.
pub fn layer_tar(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut last_dir = String::new();
    for (path, data) in files {
        if let Some((dir, _)) = path.rsplit_once('/')
            && dir != last_dir
        {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_mtime(MTIME);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            b.append_data(&mut h, format!("{dir}/"), &b""[..])?;
            last_dir = dir.to_string();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, &data[..])?;
    }
    Ok(b.into_inner()?)
}

/// A digest of the tree under `root`: every path with its type, permission bits, size, content
/// digest and link target, in sorted order. Two trees with equal digests have equal listings.
pub fn tree_digest(root: &Path) -> Result<String> {
    fn walk(root: &Path, rel: &Path, h: &mut Sha256, count: &mut u64) -> Result<()> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let p = root.join(&rel);
            let md = fs::symlink_metadata(&p)?;
            *count += 1;
            let ft = md.file_type();
            let line = if ft.is_symlink() {
                format!("l {} -> {}\n", rel.display(), fs::read_link(&p)?.display())
            } else if ft.is_dir() {
                format!(
                    "d {} {:o}\n",
                    rel.display(),
                    md.permissions().mode() & 0o7777
                )
            } else {
                let data = fs::read(&p)?;
                format!(
                    "f {} {:o} {} {:x}\n",
                    rel.display(),
                    md.permissions().mode() & 0o7777,
                    md.len(),
                    Sha256::digest(&data)
                )
            };
            h.update(line.as_bytes());
            if ft.is_dir() {
                walk(root, &rel, h, count)?;
            }
        }
        Ok(())
    }
    let mut h = Sha256::new();
    let mut count = 0;
    walk(root, Path::new(""), &mut h, &mut count)?;
    Ok(format!("{count} entries, sha256 {:x}", h.finalize()))
}

/// The number of entries under `root` (not counting `root`), without following symlinks.
pub fn count_entries(root: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let e = e?;
        n += 1;
        if e.file_type()?.is_dir() {
            n += count_entries(&e.path())?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> Spec {
        Spec {
            files: 230,
            dirs: 7,
            symlinks: 9,
            max_size: 300,
            added: 25,
            seed,
        }
    }

    #[test]
    fn same_seed_same_tree_other_seed_other_tree() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        generate_small(&tiny(1), &a).unwrap();
        generate_small(&tiny(1), &b).unwrap();
        generate_small(&tiny(2), &c).unwrap();
        let da = tree_digest(&a).unwrap();
        assert_eq!(da, tree_digest(&b).unwrap());
        assert_ne!(da, tree_digest(&c).unwrap());
        // 230 files + 9 symlinks + 7 leaf dirs + 1 top-level dir.
        assert!(da.starts_with("247 entries"), "{da}");
        assert_eq!(count_entries(&a).unwrap(), 247);
    }

    #[test]
    fn upper_is_deterministic_and_shares_unchanged_inodes() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let spec = tiny(5);
        let small = t.path().join("small");
        generate_small(&spec, &small).unwrap();
        let (u1, u2) = (t.path().join("u1"), t.path().join("u2"));
        generate_upper(&spec, &small, &u1).unwrap();
        generate_upper(&spec, &small, &u2).unwrap();
        assert_eq!(tree_digest(&u1).unwrap(), tree_digest(&u2).unwrap());
        let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
        // File 1 is unchanged (hardlinked), 10 rewritten, 40 deleted, directory 6 removed.
        assert_eq!(ino(&small.join(spec.file(1))), ino(&u1.join(spec.file(1))));
        assert_ne!(
            ino(&small.join(spec.file(10))),
            ino(&u1.join(spec.file(10)))
        );
        assert_ne!(
            fs::read(small.join(spec.file(10))).unwrap(),
            fs::read(u1.join(spec.file(10))).unwrap()
        );
        assert!(!u1.join(spec.file(40)).exists());
        assert!(!u1.join(spec.dir(6)).exists());
        assert!(u1.join(format!("new/n{:06}", spec.files)).exists());
        // The small tree was not touched through the hardlinks.
        assert_eq!(
            fs::read(small.join(spec.file(10))).unwrap(),
            spec.content(10, 0)
        );
    }

    #[test]
    fn graphtest_layout_and_rng_are_stable() {
        let f = graphtest_files(250, 3);
        assert_eq!(f.len(), 250);
        assert_eq!(f[0].0, "directory-0/file-0");
        assert_eq!(f[249].0, "directory-200/file-49");
        assert_eq!(f, graphtest_files(250, 3));
        assert_ne!(f[0].1, graphtest_files(1, 4)[0].1);
        // SplitMix64's published first output for seed 0.
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
