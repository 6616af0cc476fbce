#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::*;

fn root_fd(p: &Path) -> OwnedFd {
    open_root_dir(p).unwrap()
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A temporary directory for a deep tree, removed with `crate::remove_tree` when dropped
/// (also when the test panics): `TempDir`'s own cleanup is std's recursive `remove_dir_all`,
/// which runs out of descriptors at this depth with the limit the test sets, and the tree
/// would stay behind.
struct DeepScratch(tempfile::TempDir);

impl DeepScratch {
    fn new() -> DeepScratch {
        DeepScratch(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for DeepScratch {
    fn drop(&mut self) {
        let _ = crate::remove_tree(self.0.path());
    }
}

/// Lowers the soft open-file limit to 1,024 (the common default) for this test process; each
/// test runs in its own process under nextest.
fn limit_fds() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: lim.maximum,
        },
    )
    .unwrap();
}

/// `levels` nested directories `d/d/…/d` below `root`, each holding a file `f` (made through
/// descriptors: the full path is far beyond `PATH_MAX`).
fn deep_tree(root: &Path, levels: usize) {
    let mut cur = root_fd(root);
    for i in 0..levels {
        rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).unwrap();
        let f = rustix::fs::openat(
            &cur,
            c"f",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, format!("{i}").as_bytes()).unwrap();
        cur = open_dir_at(cur.as_fd(), c"d").unwrap();
    }
}

#[test]
fn open_beneath_follows_no_symlink_and_stays_below() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("a/b")).unwrap();
    fs::write(t.path().join("a/b/f"), "in").unwrap();
    fs::write(outside.path().join("secret"), "host").unwrap();
    symlink(outside.path(), t.path().join("a/out")).unwrap();
    symlink("b", t.path().join("a/rel")).unwrap();
    let root = root_fd(t.path());
    for walk_only in [false, true] {
        if walk_only {
            super::open::force_openat2_missing();
        }
        let f = open_beneath(root.as_fd(), Path::new("a/b/f"), OFlags::RDONLY).unwrap();
        assert_eq!(rustix::fs::fstat(&f).unwrap().st_size, 2);
        for bad in [
            "a/out/secret",
            "a/rel/f",
            "../x",
            "/etc/passwd",
            "a/../a/b/f",
        ] {
            let e = open_beneath(root.as_fd(), Path::new(bad), OFlags::RDONLY)
                .expect_err(bad)
                .raw_os_error();
            assert!(
                matches!(e, Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR)),
                "{bad}: {e:?} (walk only: {walk_only})"
            );
        }
    }
    assert!(!openat2_supported() || cfg!(test));
}

#[test]
fn open_beneath_takes_paths_longer_than_path_max() {
    let t = DeepScratch::new();
    deep_tree(t.path(), 3000);
    let rel: Vec<&str> = std::iter::repeat_n("d", 2999).chain(["f"]).collect();
    let rel = rel.join("/");
    assert!(rel.len() > 4096);
    let f = open_beneath(root_fd(t.path()).as_fd(), Path::new(&rel), OFlags::RDONLY).unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut fs::File::from(f), &mut s).unwrap();
    assert_eq!(s, "2999");
}

#[test]
fn checked_opens_refuse_what_the_listing_did_not_see() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), "data").unwrap();
    fs::create_dir(t.path().join("d")).unwrap();
    let root = root_fd(t.path());
    let st_f = stat_at(root.as_fd(), c"f").unwrap();
    let st_d = stat_at(root.as_fd(), c"d").unwrap();
    open_file_checked(root.as_fd(), c"f", &st_f).unwrap();
    open_dir_checked(root.as_fd(), c"d", &st_d).unwrap();

    // The file becomes a FIFO: the open neither blocks nor is accepted.
    fs::remove_file(t.path().join("f")).unwrap();
    rustix::fs::mknodat(
        &root,
        c"f",
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let e = open_file_checked(root.as_fd(), c"f", &st_f).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");

    // The file becomes a symlink to a host file.
    fs::remove_file(t.path().join("f")).unwrap();
    fs::write(outside.path().join("f"), "host").unwrap();
    symlink(outside.path().join("f"), t.path().join("f")).unwrap();
    let e = open_file_checked(root.as_fd(), c"f", &st_f).unwrap_err();
    assert!(e.to_string().contains("found a symlink"), "{e}");

    // The directory becomes a symlink to a host directory, then another directory.
    fs::rename(t.path().join("d"), t.path().join("kept")).unwrap();
    symlink(outside.path(), t.path().join("d")).unwrap();
    let e = open_dir_checked(root.as_fd(), c"d", &st_d).unwrap_err();
    assert!(e.to_string().contains("found a symlink"), "{e}");
    fs::remove_file(t.path().join("d")).unwrap();
    // Moved into place, not removed and recreated: a new directory could reuse the old inode
    // number, and the listing's `d` (kept alive above as "kept") must differ from it.
    fs::create_dir(t.path().join("other")).unwrap();
    fs::rename(t.path().join("other"), t.path().join("d")).unwrap();
    let e = open_dir_checked(root.as_fd(), c"d", &st_d).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");
}

#[test]
fn dir_stack_holds_bounded_descriptors_at_any_depth() {
    limit_fds();
    let t = DeepScratch::new();
    let levels = 10_000;
    deep_tree(t.path(), levels);
    let before = open_fds();
    let mut stack = DirStack::new(root_fd(t.path())).unwrap();
    let mut peak = 0;
    for _ in 0..levels {
        stack.push(c"d", None).unwrap();
        peak = peak.max(open_fds());
    }
    assert_eq!(stack.depth(), levels);
    assert_eq!(stack.rel().len(), levels * 2 - 1);
    for i in (0..levels).rev() {
        let left = stack.pop().unwrap().unwrap();
        let st = stat_at(stack.top(), c"f").unwrap();
        assert_eq!(st.st_size, format!("{i}").len() as i64);
        drop(left);
        peak = peak.max(open_fds());
    }
    assert!(stack.pop().unwrap().is_none());
    assert!(
        peak <= before + MAX_HELD_FDS + 2,
        "peak {peak} descriptors, {before} before"
    );
}

#[test]
fn dir_stack_refuses_a_directory_moved_during_the_walk() {
    let t = tempfile::tempdir().unwrap();
    deep_tree(t.path(), MAX_HELD_FDS + 4);
    fs::create_dir(t.path().join("elsewhere")).unwrap();
    let mut stack = DirStack::new(root_fd(t.path())).unwrap();
    for _ in 0..MAX_HELD_FDS + 3 {
        stack.push(c"d", None).unwrap();
    }
    // Move the subtree below the first level elsewhere: `..` of the deep levels now leads to
    // another directory than the one walked through.
    fs::rename(t.path().join("d/d"), t.path().join("elsewhere/d")).unwrap();
    let mut err = None;
    for _ in 0..MAX_HELD_FDS + 3 {
        if let Err(e) = stack.pop() {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("a moved directory is noticed");
    assert!(e.to_string().contains("moved"), "{e}");
}

struct Count {
    files: usize,
    dirs_left: usize,
    max_depth: usize,
}

impl Visitor for Count {
    type Error = WalkError;

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &[u8],
        st: &Stat,
    ) -> Result<bool, WalkError> {
        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
            let f = open_file_checked(dir, name, st).unwrap();
            assert_eq!(f.metadata().unwrap().len(), st.st_size as u64);
            self.files += 1;
        }
        self.max_depth = self
            .max_depth
            .max(rel.iter().filter(|&&b| b == b'/').count() + 1);
        Ok(true)
    }

    fn leave(&mut self, _dir: BorrowedFd<'_>, _rel: &[u8], _st: &Stat) -> Result<(), WalkError> {
        self.dirs_left += 1;
        Ok(())
    }
}

#[test]
fn walk_handles_ten_thousand_levels_with_the_default_fd_limit() {
    limit_fds();
    let t = DeepScratch::new();
    let levels = 10_000;
    deep_tree(t.path(), levels);
    let mut c = Count {
        files: 0,
        dirs_left: 0,
        max_depth: 0,
    };
    walk(root_fd(t.path()), t.path(), &mut c).unwrap();
    assert_eq!(c.files, levels);
    assert_eq!(c.dirs_left, levels + 1);
    assert_eq!(c.max_depth, levels);
}

#[test]
fn walk_refuses_a_directory_swapped_for_a_symlink() {
    struct Swap<'a> {
        root: &'a Path,
        outside: &'a Path,
        seen: Vec<Vec<u8>>,
    }
    impl Visitor for Swap<'_> {
        type Error = WalkError;

        fn entry(
            &mut self,
            _dir: BorrowedFd<'_>,
            _name: &CStr,
            rel: &[u8],
            _st: &Stat,
        ) -> Result<bool, WalkError> {
            self.seen.push(rel.to_vec());
            if rel == b"d" {
                // Between the listing's lstat and the descent, the container swaps it.
                fs::rename(self.root.join("d"), self.root.join("d.old")).unwrap();
                symlink(self.outside, self.root.join("d")).unwrap();
            }
            Ok(true)
        }
    }
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("d")).unwrap();
    fs::write(outside.path().join("secret"), "host").unwrap();
    let mut v = Swap {
        root: t.path(),
        outside: outside.path(),
        seen: Vec::new(),
    };
    let e = walk(root_fd(t.path()), t.path(), &mut v).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");
    assert!(!v.seen.iter().any(|r| r.ends_with(b"secret")));
}

use test_support::{is_root, root_or_skip};

#[test]
fn xattrs_of_symlinks_and_fifos_are_read_through_the_parent_on_every_kernel() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("target"), "x").unwrap();
    symlink("target", t.path().join("l")).unwrap();
    fs::write(t.path().join("f"), "x").unwrap();
    ::xattr::set(t.path().join("f"), "user.k", b"file").unwrap_or(());
    let root = root_fd(t.path());
    // trusted.* can be set on symlinks (root only); user.* cannot.
    let on_link = is_root()
        && rustix::fs::lsetxattr(
            t.path().join("l").as_path(),
            "trusted.k",
            b"link",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
    for old_kernel in [false, true] {
        if old_kernel {
            super::xattr::force_xattrat_missing();
        }
        let at = XattrTarget::At(root.as_fd(), c"l");
        let names = list_xattrs(at).unwrap();
        if on_link {
            assert_eq!(names, [CString::new("trusted.k").unwrap()], "{old_kernel}");
            assert_eq!(
                get_xattr(at, c"trusted.k").unwrap().as_deref(),
                Some(&b"link"[..])
            );
        } else {
            assert!(names.is_empty());
        }
        // The symlink's target is never consulted.
        let target_names = list_xattrs(XattrTarget::At(root.as_fd(), c"target")).unwrap();
        assert!(target_names.is_empty());
        if ::xattr::get(t.path().join("f"), "user.k")
            .unwrap_or(None)
            .is_some()
        {
            let at = XattrTarget::At(root.as_fd(), c"f");
            assert_eq!(
                get_xattr(at, c"user.k").unwrap().as_deref(),
                Some(&b"file"[..])
            );
            assert_eq!(get_xattr(at, c"user.missing").unwrap(), None);
        }
    }
    assert!(!xattr_at_supported());
}

#[test]
fn large_xattr_values_are_read_in_full() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), "x").unwrap();
    let big: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    if ::xattr::set(t.path().join("f"), "user.big", &big).is_err() {
        eprintln!("skipping: the filesystem of the temp dir has no user xattrs");
        return;
    }
    let root = root_fd(t.path());
    let f = open_file_checked(root.as_fd(), c"f", &stat_at(root.as_fd(), c"f").unwrap()).unwrap();
    for target in [
        XattrTarget::Fd(f.as_fd()),
        XattrTarget::At(root.as_fd(), c"f"),
    ] {
        assert_eq!(get_xattr(target, c"user.big").unwrap(), Some(big.clone()));
    }
}

/// Runs `f` in a forked child and asserts it exits 0 (`f` returns whether it succeeded).
fn in_forked_child(f: impl FnOnce() -> bool) {
    // SAFETY: the child runs `f` (raw file system calls and glibc's fork-safe malloc) and
    // leaves with `_exit`, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(false);
        // SAFETY: ends the forked child without running the harness's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}

fn lget(path: &Path, attr: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    let n = rustix::fs::lgetxattr(path, attr, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Before Linux 6.13, xattrs of symlinks are set through `/proc/self/fd` in an ordinary
/// process and after an `fchdir` (cwd restored, no `/proc` needed) in a single-threaded one;
/// a name that is not one component is refused on both routes.
#[test]
fn xattrs_of_symlinks_are_set_on_both_routes_without_xattrat() {
    if !root_or_skip("trusted.* xattrs on symlinks need root") {
        return;
    }
    super::xattr::force_xattrat_missing();
    let t = tempfile::tempdir().unwrap();
    symlink("nowhere", t.path().join("l1")).unwrap();
    symlink("nowhere", t.path().join("l2")).unwrap();
    let root = root_fd(t.path());
    set_xattr_at(root.as_fd(), c"l1", c"trusted.r", b"proc").unwrap();
    assert_eq!(
        lget(&t.path().join("l1"), "trusted.r").as_deref(),
        Some(&b"proc"[..])
    );
    for bad in [c"..", c".", c"a/b", c""] {
        assert!(set_xattr_at(root.as_fd(), bad, c"trusted.r", b"x").is_err());
    }
    let path = t.path().to_path_buf();
    in_forked_child(|| {
        declare_single_threaded();
        let cwd = std::env::current_dir().unwrap();
        let set = set_xattr_at(root.as_fd(), c"l2", c"trusted.r", b"fchdir").is_ok();
        let read = get_xattr(XattrTarget::At(root.as_fd(), c"l2"), c"trusted.r")
            .ok()
            .flatten();
        let names = list_xattrs(XattrTarget::At(root.as_fd(), c"l2")).unwrap_or_default();
        let refused = set_xattr_at(root.as_fd(), c"..", c"trusted.r", b"x").is_err();
        set && read.as_deref() == Some(&b"fchdir"[..])
            && names == [CString::new("trusted.r").unwrap()]
            && refused
            && std::env::current_dir().unwrap() == cwd
            && lget(&path.join("l2"), "trusted.r").as_deref() == Some(&b"fchdir"[..])
    });
    assert!(!xattr_at_supported());
}

/// The probes have no effect and agree with what the kernel (or a kernel profile) has.
#[test]
fn probes_report_what_the_kernel_has() {
    let profile = std::env::var("GRAPHDRIVER_KERNEL_PROFILE")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('.')?;
            Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
        });
    let report = fallbacks();
    assert_eq!(report.len(), 3);
    if let Some(p) = profile {
        let want = |since: (u32, u32)| p >= since;
        assert_eq!(report[0].available, want((5, 6)), "openat2 under {p:?}");
        assert_eq!(report[1].available, want((6, 13)), "xattrat under {p:?}");
        assert_eq!(report[2].available, want((6, 6)), "fchmodat2 under {p:?}");
        assert_eq!(openat2_supported(), want((5, 6)));
    }
}

/// Before Linux 6.6, a mode-000 directory is made removable by chmod of its O_PATH-pinned
/// inode: through `/proc/self/fd` in an ordinary process (shown by an unprivileged user
/// removing such a tree), as `.` after an `fchdir` in a single-threaded one (which, like the
/// confined child, may enter it: root here).
#[test]
fn mode_000_directories_are_chmodded_without_fchmodat2() {
    if !root_or_skip("needs root to switch to an unprivileged user") {
        return;
    }
    super::remove::force_fchmodat2_missing();
    const NOBODY: u32 = 65534;
    let mode = |m| std::os::unix::fs::PermissionsExt::from_mode(m);
    let t = tempfile::tempdir().unwrap();
    let x = t.path().join("x");
    fs::create_dir_all(x.join("locked/inner")).unwrap();
    fs::write(x.join("locked/inner/f"), "f").unwrap();
    for p in [t.path(), &x, &x.join("locked"), &x.join("locked/inner")] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::chown(x.join("locked/inner/f"), Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(t.path(), mode(0o755)).unwrap();
    fs::set_permissions(x.join("locked"), mode(0o000)).unwrap();
    in_forked_child(|| {
        // SAFETY: plain credential calls in the forked child.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
                && libc::setresuid(NOBODY, NOBODY, NOBODY) == 0
        };
        dropped && remove_tree(&x).is_ok() && !x.exists()
    });
    assert!(!x.exists());

    fs::create_dir(&x).unwrap();
    fs::create_dir(x.join("locked")).unwrap();
    fs::set_permissions(x.join("locked"), mode(0o000)).unwrap();
    let dir = root_fd(&x);
    in_forked_child(|| {
        declare_single_threaded();
        super::remove::chmod_child_rwx(dir.as_fd(), c"locked").is_ok()
    });
    let m = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(x.join("locked")).unwrap().permissions(),
    );
    assert_eq!(m & 0o777, 0o700);
    assert!(!fchmodat2_supported());
}
