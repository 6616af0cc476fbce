//! Fault-injection tests of the layer store through the real `graphctl` binary: processes
//! killed mid-apply, a full disk, a read-only root, a parent removed under a child, many
//! processes on one root at once, permissions, and `sync = true`.
//!
//! Each finding of issue 16's fault-injection campaign has a named regression test:
//!
//! | finding | test |
//! |---------|------|
//! | `mount` killed while writing the count: `rm` deletes a layer under its holders | `syscall_faults::mount` (kills at every write, rename and fsync of the count), `store_trust::graphctl_mount_is_durable_until_unmount` |
//! | `apply` killed after `create`: a listed layer without the diff | `sigkill_during_apply` (kill points from the start on), `syscall_faults::apply_new` |
//! | `import` killed there, re-run skips the half layer | `syscall_faults::import` (the re-run equals an uninterrupted import) |
//! | concurrent imports of images sharing a base: a wrong top layer | `import::concurrent_imports_share_layers` |
//! | `apply` into a layer whose child is mounted | `immutable::apply_into_a_committed_layer_is_refused` |
//! | power cut mid-`apply`/`import`: a listed partial layer | `crash` (all of it), under both `sync` modes |
//! | one crash bricks the store ("read parent id") | `immutable::one_damaged_layer_does_not_brick_the_store`, `crash` (`ls`/`tree`/`rm`/`apply` after every cut) |
//! | a long home: `apply` deletes the read-write layer | `immutable::a_too_long_home_fails_clearly_and_keeps_the_read_write_layer` |
//! | a killed `diff`/`changes` leaks references | `store_trust::rm_works_after_a_killed_changes`, `store_trust::cleanup_unmounts_what_a_killed_changes_left`, `syscall_faults::diff` |
//! | overlay: an apply killed at the confined child's fork leaves a mount | `a_killed_apply_through_a_mount_leaves_no_mount`, `syscall_faults::apply_into_read_write` (kill at `clone`) |
//! | a `mount` killed between mount(2) and the count | `syscall_faults::mount` (kills after the `mount` call), `store_trust::cleanup_unmounts_what_a_killed_changes_left` |
//! | a full filesystem fails every command in the overlay probe | `a_full_disk_can_still_list_and_free_space`, `full_disk_during_apply` |
//! | read-only remount during `rm` leaves a staging entry | `a_filesystem_turning_read_only_during_rm_breaks_nothing_after`, `read_only_root` |
//! | `diff -o /dev/null` deletes the device | `safety::diff_output_leaves_a_device_node_alone`, `safety::diff_output_refuses_fifos_symlinks_and_directories` |
//! | storms: unexpected errors and reads that did not match | `concurrent_processes_keep_the_store_consistent` (reads through mounts checked against the oracle), `unmount_of_a_mount_in_use_keeps_it_and_says_why` |
//!
//! Tests that need root run when root or when `CI=true`, and print why they skip otherwise.
//! Nothing here measures time: deadlines only detect hangs (a deadlock fails with a message).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The in-tree drivers, linked so that helpers which open a store directly see them.
use drivers as _;

#[macro_use]
#[path = "macros.rs"]
mod macros;
#[allow(dead_code)]
#[path = "util.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use archive::compare::{CompareOptions, Snapshot, differences, snapshot};

use util::{
    Store, TmpMount, layer_tar, ls_ids, mount_points, mounts_under, skip_root_test, test_tmp,
    under_strace,
};

/// How long any one process may take before the test calls it hung. Generous: the machine is
/// shared and slow; this detects deadlocks, it does not measure anything.
const HANG: Duration = Duration::from_secs(300);

// === helpers ===

/// Skips a test body that needs root (never under `CI=true`).
macro_rules! need_root {
    () => {
        if let Some(reason) = skip_root_test() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

/// Waits for `child`, killing it and failing if it outlives [`HANG`].
fn wait_or_fail(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + HANG;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {HANG:?}: hung or deadlocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdin closed) to completion under the hang detector.
fn run(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_or_fail(&mut child, what);
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Polls `cond` until it holds; fails with `what` if it does not within [`HANG`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn home(s: &Store) -> PathBuf {
    s.root.join(s.driver)
}

/// `graphctl ls` lines, parsed: id → parent.
fn ls_map(s: &Store) -> BTreeMap<String, Option<String>> {
    s.ok(&["ls"])
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            let id = it.next().unwrap().to_string();
            let p = it.next().unwrap();
            (id, (p != "-").then(|| p.to_string()))
        })
        .collect()
}

fn exists(s: &Store, id: &str) -> bool {
    let out = s.cmd(&["exists", id]).output();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "exists {id}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Entries of the driver home's `.staging`.
fn staging_entries(s: &Store) -> Vec<PathBuf> {
    match std::fs::read_dir(home(s).join(".staging")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Free blocks of the filesystem holding `path` (`stat -f`).
fn free_blocks(path: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A tar header for a regular file or a directory (`size` ignored for directories).
fn header(path: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    if path.ends_with('/') {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
    } else {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
    }
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A big layer written in pieces: `FILES` files of `FILE_SIZE` bytes under `big/`.
struct BigLayer;

impl BigLayer {
    const FILES: u64 = 16;
    const FILE_SIZE: u64 = 4 << 20;

    fn file_data(i: u64) -> Vec<u8> {
        (0..Self::FILE_SIZE)
            .map(|n| (n.wrapping_mul(31) ^ i) as u8)
            .collect()
    }

    /// The directory entry and the first file's header.
    fn headers() -> Vec<u8> {
        let mut v = header("big/", 0, 0o755).as_bytes().to_vec();
        v.extend_from_slice(header("big/f0", Self::FILE_SIZE, 0o644).as_bytes());
        v
    }

    /// Writes file `i` (header unless `i == 0`, whose header is in [`BigLayer::headers`]), up
    /// to `limit` bytes of its data (then stops without padding).
    fn write_file(w: &mut impl Write, i: u64, limit: Option<u64>) -> std::io::Result<()> {
        if i > 0 {
            w.write_all(header(&format!("big/f{i}"), Self::FILE_SIZE, 0o644).as_bytes())?;
        }
        let data = Self::file_data(i);
        match limit {
            Some(n) => w.write_all(&data[..n as usize]),
            None => w.write_all(&data), // FILE_SIZE is a multiple of 512: no padding
        }
    }
}

// === SIGKILL during apply ===

#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// Nothing written yet.
    Start,
    /// The first headers written and the layer marked incomplete.
    AfterHeaders,
    /// Several files and half of the next one.
    MidFile,
    /// Everything but the end-of-archive blocks.
    BeforeEof,
}

/// Every kill point, in stream order.
const KILL_POINTS: [KillPoint; 4] = [
    KillPoint::Start,
    KillPoint::AfterHeaders,
    KillPoint::MidFile,
    KillPoint::BeforeEof,
];

/// Children of process `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|pp| pp.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn kill_apply_at(driver: &'static str, point: KillPoint) {
    let s = Store::new(driver);
    let base = s.scratch("base.tar");
    std::fs::write(&base, layer_tar(&[("etc/", b""), ("etc/os", b"base\n")])).unwrap();
    s.ok(&["apply", "base", base.to_str().unwrap()]);

    let mut child = s
        .cmd(&["apply", "--parent", "base", "big", "-"])
        .cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let marker = home(&s).join("big").join("incomplete");
    let wrote = (|| -> std::io::Result<()> {
        match point {
            KillPoint::Start => {}
            KillPoint::AfterHeaders => {
                stdin.write_all(&BigLayer::headers())?;
                stdin.flush()?;
            }
            KillPoint::MidFile => {
                stdin.write_all(&BigLayer::headers())?;
                for i in 0..3 {
                    BigLayer::write_file(&mut stdin, i, None)?;
                }
                BigLayer::write_file(&mut stdin, 3, Some(BigLayer::FILE_SIZE / 2))?;
            }
            KillPoint::BeforeEof => {
                stdin.write_all(&BigLayer::headers())?;
                for i in 0..BigLayer::FILES {
                    BigLayer::write_file(&mut stdin, i, None)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = wrote {
        let _ = child.kill();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("graphctl stopped reading the layer at {point:?} ({e}): {err}");
    }
    if !matches!(point, KillPoint::Start) {
        wait_until("the layer to be marked incomplete", || marker.exists());
    }
    let helpers = children_of(child.id());
    if matches!(point, KillPoint::MidFile) {
        assert!(
            !helpers.is_empty(),
            "an apply that consumed megabytes must have its confined child"
        );
    }
    child.kill().unwrap(); // SIGKILL
    wait_or_fail(&mut child, "the killed graphctl");
    drop(stdin);
    // The confined child sees EOF on its input and EPIPE on its result pipe, and leaves.
    for pid in helpers {
        wait_until(&format!("the confined child {pid} to exit"), || !alive(pid));
    }

    // The next command sees no layer, recovers (and says so), and leaves nothing behind.
    let out = s.cmd(&["exists", "big"]).output();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{point:?}: a killed apply left a layer"
    );
    if !matches!(point, KillPoint::Start) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cleaned up after interrupted work") && stderr.contains("big"),
            "{point:?}: recovery was not reported: {stderr}"
        );
    }
    assert!(!ls_ids(&s).contains("big"));
    assert!(
        staging_entries(&s).is_empty(),
        "{point:?}: staging leftovers {:?}",
        staging_entries(&s)
    );
    assert!(!home(&s).join("big").exists(), "{point:?}: layer dir left");
    assert!(
        mounts_under(&s.root).is_empty(),
        "{point:?}: stray mounts {:?}",
        mounts_under(&s.root)
    );
    // The id can be applied again, and the parent is intact.
    let small = s.scratch("small.tar");
    std::fs::write(&small, layer_tar(&[("big/", b""), ("big/ok", b"ok\n")])).unwrap();
    s.ok(&["apply", "--parent", "base", "big", small.to_str().unwrap()]);
    assert!(exists(&s, "big"));
    let (path, held) = s.look("big");
    assert_eq!(std::fs::read(path.join("big/ok")).unwrap(), b"ok\n");
    assert_eq!(std::fs::read(path.join("etc/os")).unwrap(), b"base\n");
    s.unlook(&held);
}

/// Streams the big layer into `graphctl apply ID -` for an existing layer and SIGKILLs it at
/// `point` (after the layer is marked, except at `Start`); waits for its confined child too.
fn kill_apply_into(s: &Store, id: &str, point: KillPoint) {
    kill_apply_with(s, &["apply", id, "-"], id, point);
}

/// Like [`kill_apply_into`] for any apply command `args` that applies into layer `id`.
fn kill_apply_with(s: &Store, args: &[&str], id: &str, point: KillPoint) {
    let mut child = s
        .cmd(args)
        .cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let marker = home(s).join(id).join("incomplete");
    let wrote = (|| -> std::io::Result<()> {
        if !matches!(point, KillPoint::Start) {
            stdin.write_all(&BigLayer::headers())?;
        }
        let files = match point {
            KillPoint::Start | KillPoint::AfterHeaders => 0,
            KillPoint::MidFile => 3,
            KillPoint::BeforeEof => BigLayer::FILES,
        };
        for i in 0..files {
            BigLayer::write_file(&mut stdin, i, None)?;
        }
        stdin.flush()
    })();
    wrote.unwrap_or_else(|e| panic!("graphctl stopped reading at {point:?}: {e}"));
    if !matches!(point, KillPoint::Start) {
        wait_until("the layer to be marked incomplete", || marker.exists());
    }
    let helpers = children_of(child.id());
    child.kill().unwrap(); // SIGKILL
    wait_or_fail(&mut child, "the killed graphctl");
    drop(stdin);
    for pid in helpers {
        wait_until(&format!("the confined child {pid} to exit"), || !alive(pid));
    }
}

/// The names starting with `apply-` in layer `id`'s directory (an apply's staged entries).
fn staged_entries(s: &Store, id: &str) -> Vec<String> {
    std::fs::read_dir(home(s).join(id))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("apply-"))
        .collect()
}

// A read-write layer in use (and an image layer created by an earlier command) existed before
// the apply that was killed: after recovery it is exactly as it was, nothing staged is left,
// no mount stays, and it still takes a complete apply.
driver_test!(
    sigkill_during_apply_into_an_existing_layer_rolls_back,
    |driver| {
        if driver == "overlay" {
            need_root!();
        }
        for point in KILL_POINTS {
            let s = Store::new(driver);
            s.cmd(&["apply", "base", "-"])
                .stdin(layer_tar(&[("etc/", b""), ("etc/os", b"base\n")]))
                .ok();
            s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
            s.ok(&["create", "--parent", "base", "img"]);
            let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
            std::fs::write(path.join("mine"), b"kept\n").unwrap();
            std::fs::remove_file(path.join("etc/os")).unwrap();
            s.ok(&["unmount", "ctr"]);
            let before = s.ok(&["changes", "ctr"]);
            for id in ["ctr", "img"] {
                kill_apply_into(&s, id, point);
                let out = s.cmd(&["exists", id]).output();
                assert_eq!(out.status.code(), Some(0), "{point:?}: {id} was removed");
                if !matches!(point, KillPoint::Start) {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        stderr.contains("applies_rolled_back") && stderr.contains(id),
                        "{point:?}: the roll-back was not reported: {stderr}"
                    );
                }
                assert!(
                    staged_entries(&s, id).is_empty(),
                    "{point:?}: {:?}",
                    staged_entries(&s, id)
                );
                assert!(
                    mounts_under(&s.root).is_empty(),
                    "{point:?}: stray mounts {:?}",
                    mounts_under(&s.root)
                );
            }
            assert_eq!(s.ok(&["changes", "ctr"]), before, "{point:?}: ctr changed");
            assert_eq!(s.ok(&["changes", "img"]), "", "{point:?}: img changed");
            assert!(staging_entries(&s).is_empty(), "{:?}", staging_entries(&s));
            // Still usable: a complete apply goes in.
            s.cmd(&["apply", "ctr", "-"])
                .stdin(layer_tar(&[("late", b"1\n")]))
                .ok();
            let after = s.ok(&["changes", "ctr"]);
            assert!(
                after.contains("A /late") && after.contains("A /mine"),
                "{after}"
            );
        }
    }
);

driver_test!(sigkill_during_apply, |driver| {
    if driver == "overlay" {
        need_root!();
    }
    for point in KILL_POINTS {
        kill_apply_at(driver, point);
    }
});

// === ENOSPC ===

// Issue 16: on a completely full filesystem the commands that only read or free space work
// (no probe writes on the way), and freeing space makes the store usable again.
driver_test!(a_full_disk_can_still_list_and_free_space, |driver| {
    need_root!();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let mnt = TmpMount::tmpfs_with(tmp.path(), "size=8m,nr_inodes=2000");
    let s = Store::at(driver, mnt.path.join("root"));
    s.cmd(&["apply", "a", "-"])
        .stdin(layer_tar(&[("a/", b""), ("a/f", b"a\n")]))
        .ok();
    s.ok(&["create", "--rw", "--parent", "a", "ctr"]);
    let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    s.ok(&["unmount", "ctr"]);
    drop(path);
    // Fill every block, then every inode (tmpfs directories take inodes, not blocks).
    let filler = mnt.path.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 12];
        while f.write_all(&chunk).is_ok() {}
    }
    let inodes = mnt.path.join("inodes");
    std::fs::create_dir(&inodes).unwrap();
    for i in 0.. {
        if std::fs::create_dir(inodes.join(i.to_string())).is_err() {
            break;
        }
    }
    assert_eq!(free_blocks(&mnt.path), 0, "the filesystem is full");
    assert_eq!(s.ok(&["ls"]), "a -\nctr a\n");
    s.ok(&["status"]);
    s.ok(&["rm", "ctr"]);
    s.ok(&["cleanup"]);
    assert_eq!(s.ok(&["ls"]), "a -\n");
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_dir_all(&inodes).unwrap();
    s.ok(&["create", "--rw", "--parent", "a", "again"]);
});

// Issue 16: an apply through an overlay mount (a new layer on a read-write layer, applied in
// place) killed mid-way leaves its mount; recovery unmounts it before it deletes the layer,
// so nothing stays mounted in `.staging/` and the id can be applied again.
#[test]
fn a_killed_apply_through_a_mount_leaves_no_mount() {
    need_root!();
    let s = Store::new("overlay");
    s.cmd(&["apply", "base", "-"])
        .stdin(layer_tar(&[("etc/", b""), ("etc/os", b"base\n")]))
        .ok();
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    kill_apply_with(
        &s,
        &["apply", "--parent", "ctr", "child", "-"],
        "child",
        KillPoint::MidFile,
    );
    let merged = home(&s).join("child").join("merged");
    assert!(
        util::is_mount_point(&merged),
        "the killed apply left its mount (else this test tests nothing)"
    );
    assert!(!exists(&s, "child"), "the half-applied layer is not listed");
    assert!(!home(&s).join("child").exists());
    assert!(staging_entries(&s).is_empty(), "{:?}", staging_entries(&s));
    assert!(
        mounts_under(&s.root).is_empty(),
        "{:?}",
        mounts_under(&s.root)
    );
    s.cmd(&["apply", "--parent", "ctr", "child", "-"])
        .stdin(layer_tar(&[("ok", b"1\n")]))
        .ok();
    assert!(s.ok(&["changes", "child"]).contains("A /ok"));
}

driver_test!(full_disk_during_apply, |driver| {
    need_root!();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let mnt = TmpMount::tmpfs(tmp.path(), "24m");
    let s = Store::at(driver, mnt.path.join("root"));
    let small = s.scratch("a.tar");
    std::fs::write(&small, layer_tar(&[("a/", b""), ("a/f", b"a\n")])).unwrap();
    s.ok(&["apply", "a", small.to_str().unwrap()]);
    let before = ls_ids(&s);
    let free_before = free_blocks(&mnt.path);

    // 64 MiB into 24 MiB.
    let mut big = Vec::new();
    big.extend_from_slice(&BigLayer::headers());
    for i in 0..BigLayer::FILES {
        BigLayer::write_file(&mut big, i, None).unwrap();
    }
    big.extend_from_slice(&[0; 1024]);
    let (_, stderr) = s
        .cmd(&["apply", "--parent", "a", "big", "-"])
        .stdin(big)
        .status(1);
    assert!(
        stderr.contains("No space left on device"),
        "expected a clear ENOSPC error, got: {stderr}"
    );
    assert_eq!(ls_ids(&s), before, "the store changed");
    assert!(staging_entries(&s).is_empty());
    assert!(!home(&s).join("big").exists());
    let free_after = free_blocks(&mnt.path);
    eprintln!("free blocks: {free_before} before, {free_after} after the failed apply");
    // Slack for directory blocks and the lock and record files.
    assert!(
        free_after + 16 >= free_before,
        "space not returned: {free_before} free blocks before, {free_after} after"
    );
    let path = PathBuf::from(s.ok(&["mount", "a"]).trim());
    assert_eq!(std::fs::read(path.join("a/f")).unwrap(), b"a\n");
    s.ok(&["unmount", "a"]);
});

// === read-only root ===

driver_test!(read_only_root, |driver| {
    need_root!();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let mnt = TmpMount::tmpfs(tmp.path(), "64m");
    let s = Store::at(driver, mnt.path.join("root"));
    let tar = s.scratch("a.tar");
    std::fs::write(&tar, layer_tar(&[("a/", b""), ("a/f", b"a\n")])).unwrap();
    s.ok(&["apply", "a", tar.to_str().unwrap()]);
    s.ok(&["create", "--parent", "a", "b"]);
    let before = ls_map(&s);

    mnt.remount("ro");
    assert_eq!(ls_map(&s), before);
    assert!(exists(&s, "a"));
    assert!(!exists(&s, "zz"));
    let home = home(&s);
    for args in [
        vec!["create", "c"],
        vec!["apply", "d", tar.to_str().unwrap()],
        vec!["rm", "b"],
    ] {
        let err = s.err(&args);
        assert!(
            err.contains("Read-only file system") && err.contains(home.to_str().unwrap()),
            "{args:?}: expected an EROFS error naming a path in {}, got: {err}",
            home.display()
        );
    }
    mnt.remount("rw");
    assert_eq!(ls_map(&s), before, "something was lost");
    let path = PathBuf::from(s.ok(&["mount", "b"]).trim());
    assert_eq!(std::fs::read(path.join("a/f")).unwrap(), b"a\n");
    s.ok(&["unmount", "b"]);
    s.ok(&["rm", "b"]);
});

// === missing parent, parent removed concurrently ===

driver_test!(missing_parent_is_not_found, |driver| {
    if driver == "overlay" {
        need_root!();
    }
    let s = Store::new(driver);
    let tar = s.scratch("x.tar");
    std::fs::write(&tar, layer_tar(&[("x", b"x")])).unwrap();
    let err = s.err(&["create", "--parent", "nope", "x"]);
    assert!(err.contains("layer nope does not exist"), "{err}");
    let err = s.err(&["apply", "--parent", "nope", "x", tar.to_str().unwrap()]);
    assert!(err.contains("layer nope does not exist"), "{err}");
    assert!(!exists(&s, "x"));
    assert!(ls_ids(&s).is_empty());
    assert!(staging_entries(&s).is_empty());
});

driver_test!(parent_removed_while_child_is_applied, |driver| {
    if driver == "overlay" {
        need_root!();
    }
    let s = Store::new(driver);
    let ptar = s.scratch("p.tar");
    std::fs::write(&ptar, layer_tar(&[("p", b"p")])).unwrap();
    // A child big enough that the removal often lands while it is being applied.
    let mut ctar = Vec::new();
    ctar.extend_from_slice(&BigLayer::headers());
    BigLayer::write_file(&mut ctar, 0, None).unwrap();
    ctar.extend_from_slice(&[0; 1024]);
    let ctar_path = s.scratch("c.tar");
    std::fs::write(&ctar_path, ctar).unwrap();
    let mut outcomes = BTreeSet::new();
    for round in 0..8 {
        s.ok(&["apply", "p", ptar.to_str().unwrap()]);
        let mut apply = s
            .cmd(&["apply", "--parent", "p", "c", ctar_path.to_str().unwrap()])
            .cmd;
        let mut rm = s.cmd(&["rm", "p"]).cmd;
        // Alternate who starts first.
        let (a, r) = if round % 2 == 0 {
            let a = std::thread::spawn(move || run_cmd(&mut apply));
            let r = std::thread::spawn(move || run_cmd(&mut rm));
            (a, r)
        } else {
            let r = std::thread::spawn(move || run_cmd(&mut rm));
            let a = std::thread::spawn(move || run_cmd(&mut apply));
            (a, r)
        };
        let (a, r) = (a.join().unwrap(), r.join().unwrap());
        let (c, p) = (exists(&s, "c"), exists(&s, "p"));
        assert!(
            p || !c,
            "round {round}: orphan child\napply: {a:?}\nrm: {r:?}"
        );
        let ls = ls_map(&s);
        for (id, parent) in &ls {
            if let Some(parent) = parent {
                assert!(
                    ls.contains_key(parent),
                    "{id} lists missing parent {parent}"
                );
            }
        }
        assert_eq!(c, a.0, "apply succeeded iff the child exists: {a:?}");
        outcomes.insert((c, p));
        if c {
            s.ok(&["rm", "c"]);
        }
        if p {
            s.ok(&["rm", "p"]);
        }
        assert!(staging_entries(&s).is_empty());
    }
    eprintln!("outcomes (child, parent) seen: {outcomes:?}");
});

/// Runs a prepared command under the hang detector: (success, stderr).
fn run_cmd(cmd: &mut Command) -> (bool, String) {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = run(c, "graphctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// === concurrency ===

/// Image layers (applied from tars) and their parents.
const IMAGES: &[(&str, Option<&str>)] = &[
    ("i0", None),
    ("i1", Some("i0")),
    ("i2", Some("i1")),
    ("i3", Some("i0")),
];
/// Read-write layers (created, never applied) and their parents.
const RWS: &[(&str, &str)] = &[("w0", "i1"), ("w1", "i2"), ("w2", "i3")];

fn image_parent(id: &str) -> Option<&'static str> {
    IMAGES.iter().find(|(i, _)| *i == id).and_then(|(_, p)| *p)
}

/// The image layers under `id`, base first (a read-write layer adds nothing).
fn chain(id: &str) -> Vec<&'static str> {
    let mut top = RWS
        .iter()
        .find(|(w, _)| *w == id)
        .map(|(_, p)| *p)
        .or_else(|| IMAGES.iter().find(|(i, _)| *i == id).map(|(i, _)| *i));
    let mut out = Vec::new();
    while let Some(t) = top {
        out.push(t);
        top = image_parent(t);
    }
    out.reverse();
    out
}

/// The tar of image layer `id`: its own files, a shared file every layer overwrites, and a
/// bigger file so that applies take a while.
fn image_tar(id: &str) -> Vec<u8> {
    let own = format!("{id}/");
    let f = format!("{id}/f");
    let big = format!("{id}/big");
    let content = format!("{id}\n").into_bytes();
    let big_data: Vec<u8> = (0..256 * 1024u32).map(|n| (n % 251) as u8).collect();
    layer_tar(&[
        (own.as_str(), b""),
        (f.as_str(), &content),
        (big.as_str(), &big_data),
        ("shared", &content),
    ])
}

/// A tiny xorshift generator: the op sequence is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Errors the operations may legitimately meet when they race.
const EXPECTED_ERRORS: &[&str] = &[
    "does not exist",
    "already exists",
    "is in use",
    "has children",
    // An apply into a layer that another worker's apply or create committed meanwhile.
    "committed",
];

/// Views that the oracle can build for layer `id`: for every subset of its chain's applies
/// (a concurrent mount can make an apply fail after its layer was created, leaving it empty),
/// the same tars applied on vfs. Built lazily, all-applied first.
struct Oracle {
    store: Store,
    tars: HashMap<&'static str, PathBuf>,
}

impl Oracle {
    fn new(tars: HashMap<&'static str, PathBuf>) -> Oracle {
        Oracle {
            store: Store::new("vfs"),
            tars,
        }
    }

    /// The vfs view for `chain` with the applies selected by `mask` (bit i: chain[i] applied).
    fn view(&self, chain: &[&'static str], mask: u32) -> Snapshot {
        let mut prev: Option<String> = None;
        for (i, layer) in chain.iter().enumerate() {
            let applied = mask & (1 << i) != 0;
            let name = format!(
                "{}_{layer}{}",
                prev.as_deref().unwrap_or("o"),
                u8::from(applied)
            );
            if !exists(&self.store, &name) {
                let mut args = vec![if applied { "apply" } else { "create" }];
                if let Some(p) = &prev {
                    args.extend(["--parent", p.as_str()]);
                }
                args.push(&name);
                let tar = self.tars[layer].to_str().unwrap();
                if applied {
                    args.push(tar);
                }
                self.store.ok(&args);
            }
            prev = Some(name);
        }
        let name = prev.unwrap();
        let path = PathBuf::from(self.store.ok(&["mount", &name]).trim());
        let snap = snapshot(&path).unwrap();
        self.store.ok(&["unmount", &name]);
        snap
    }

    /// Empty if `actual` equals one of the views of `id`, else the differences from the
    /// all-applied view.
    fn check(&self, id: &str, actual: &Snapshot, opts: &CompareOptions) -> Vec<String> {
        let chain = chain(id);
        let full = (1u32 << chain.len()) - 1;
        let mut first = None;
        for mask in (0..=full).rev() {
            let diffs = differences(&self.view(&chain, mask), actual, opts);
            if diffs.is_empty() {
                eprintln!("{id}: equals the oracle with applies {mask:b} of {chain:?}");
                return diffs;
            }
            first.get_or_insert(diffs);
        }
        first.unwrap()
    }
}

driver_test!(concurrent_processes_keep_the_store_consistent, |driver| {
    // Both drivers: the workers and the oracle mount image layers, as read-only views.
    need_root!();
    // CI-sized by default; RELIABILITY_PROCS and RELIABILITY_OPS make the long storm (e.g. 12
    // processes of 1,000 operations each, by hand or nightly).
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let procs: u64 = env("RELIABILITY_PROCS", 8);
    let ops = env("RELIABILITY_OPS", 25);
    let s = Store::new(driver);
    let mut tars = HashMap::new();
    for (id, _) in IMAGES {
        let p = s.scratch(&format!("{id}.tar"));
        std::fs::write(&p, image_tar(id)).unwrap();
        tars.insert(*id, p);
    }
    // Create the home first so that every worker opens an existing store.
    s.ok(&["ls"]);
    // Fixed by default; RELIABILITY_SEED explores other interleavings.
    let seed = std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15u64);
    eprintln!("seed {seed}");

    // Trees read through a mount while this process held it: checked against the oracle after
    // the storm (a mounted layer cannot change or go, so a read must equal one of its views).
    let reads = std::sync::Mutex::new(Vec::new());
    let log = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..procs)
            .map(|w| {
                let s = &s;
                let tars = &tars;
                let reads = &reads;
                scope.spawn(move || {
                    let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x1234_5678));
                    let mut log = Vec::new();
                    for _ in 0..ops {
                        let all: Vec<&str> = IMAGES
                            .iter()
                            .map(|(i, _)| *i)
                            .chain(RWS.iter().map(|(w, _)| *w))
                            .collect();
                        let args: Vec<String> = match rng.below(11) {
                            0..=2 => {
                                let (id, parent) = IMAGES[rng.below(IMAGES.len())];
                                let mut a = vec!["apply".to_string()];
                                if let Some(p) = parent {
                                    a.extend(["--parent".to_string(), p.to_string()]);
                                }
                                a.push(id.to_string());
                                a.push(tars[id].to_str().unwrap().to_string());
                                a
                            }
                            3 => {
                                let (id, parent) = RWS[rng.below(RWS.len())];
                                ["create", "--rw", "--parent", parent, id]
                                    .map(str::to_string)
                                    .to_vec()
                            }
                            4 | 5 => vec!["mount".into(), all[rng.below(all.len())].into()],
                            6 | 7 => vec!["unmount".into(), all[rng.below(all.len())].into()],
                            8 | 9 => vec!["rm".into(), all[rng.below(all.len())].into()],
                            _ => {
                                // Read a layer through a mount of our own, then let it go.
                                let id = all[rng.below(all.len())];
                                let what = format!("worker {w}: read {id}");
                                let out = run(s.cmd(&["mount", id]).cmd, &what);
                                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                                log.push((
                                    vec!["mount".into(), id.into()],
                                    out.status.success(),
                                    stderr,
                                ));
                                if out.status.success() {
                                    let path = String::from_utf8(out.stdout).unwrap();
                                    let tree = snapshot(Path::new(path.trim())).unwrap();
                                    reads.lock().unwrap().push((id, tree));
                                }
                                vec!["unmount".into(), id.into()]
                            }
                        };
                        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                        let out = run(s.cmd(&refs).cmd, &format!("worker {w}: {args:?}"));
                        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                        log.push((args, out.status.success(), stderr));
                    }
                    log
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });

    let ok = log.iter().filter(|(_, ok, _)| *ok).count();
    eprintln!("{ok} of {} operations succeeded", log.len());
    let unexpected: Vec<_> = log
        .iter()
        .filter(|(_, ok, err)| !ok && !EXPECTED_ERRORS.iter().any(|e| err.contains(e)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected failures: {unexpected:#?}"
    );
    assert!(ok > 0, "no operation succeeded: {log:#?}");

    // `ls` matches the layer directories.
    let home = home(&s);
    let dirs: BTreeSet<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let ls = ls_map(&s);
    assert_eq!(
        ls.keys().cloned().collect::<BTreeSet<_>>(),
        dirs,
        "ls and the layer directories disagree"
    );
    for dir in &dirs {
        assert!(
            !home.join(dir).join("incomplete").exists(),
            "{dir} incomplete"
        );
    }
    for (id, parent) in &ls {
        if let Some(p) = parent {
            assert!(ls.contains_key(p), "{id} is an orphan of {p}");
        }
    }
    assert!(staging_entries(&s).is_empty(), "{:?}", staging_entries(&s));

    // Mount counts match mountinfo. A layer with no reference has nothing mounted. A counted
    // layer has its read-only view (`mount` of a committed layer), its writable overlay
    // (`mount` of an uncommitted overlay layer), or both (it became committed in between),
    // each at most once; vfs layers, overlay layers with a full root and overlay2 base layers
    // never have `merged`.
    let points = mount_points();
    let mut expected_mounts = 0;
    for id in ls.keys() {
        let dir = std::fs::canonicalize(home.join(id)).unwrap();
        let count: u32 = std::fs::read_to_string(home.join(".mounts").join(id))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        let merged = points.iter().filter(|m| **m == dir.join("merged")).count();
        let view = points.iter().filter(|m| **m == dir.join("view")).count();
        // overlay: a layer without a full root; overlay2: a layer with a parent (a base
        // layer's get is its diff/ itself).
        let can_merge = match driver {
            "overlay" => !dir.join("root").is_dir(),
            "overlay2" => dir.join("lower").is_file(),
            _ => false,
        };
        assert!(
            merged <= usize::from(can_merge) && view <= 1,
            "{id}: merged mounted {merged} time(s), view {view} time(s)"
        );
        if count == 0 {
            assert_eq!(merged + view, 0, "{id}: mounted with no reference");
        } else {
            // Only an overlay layer needs a mount for a writable get.
            assert!(
                merged + view > 0 || !can_merge,
                "{id}: count {count}, nothing mounted"
            );
        }
        expected_mounts += merged + view;
    }
    eprintln!("{expected_mounts} layer(s) left mounted by the workers");
    assert_eq!(
        mounts_under(&s.root).len(),
        expected_mounts,
        "mounts outside the layers: {:?}",
        mounts_under(&s.root)
    );

    // Every layer's view equals the vfs oracle built from the same tars, and so did every read
    // through a mount during the storm.
    let oracle = Oracle::new(tars.clone());
    let opts = CompareOptions {
        dir_mtimes: false,
        root_metadata: false,
        ..CompareOptions::default()
    };
    let reads = reads.into_inner().unwrap();
    eprintln!("{} reads through a mount during the storm", reads.len());
    for (id, tree) in &reads {
        let diffs = oracle.check(id, tree, &opts);
        assert!(
            diffs.is_empty(),
            "a read of {id} through its mount during the storm differs from the oracle:\n{diffs:#?}"
        );
    }
    for id in ls.keys() {
        let path = PathBuf::from(s.ok(&["mount", id]).trim());
        let actual = snapshot(&path).unwrap();
        let diffs = oracle.check(id, &actual, &opts);
        assert!(
            diffs.is_empty(),
            "{id} differs from the oracle:\n{diffs:#?}"
        );
        s.ok(&["unmount", id]);
    }

    s.ok(&["cleanup"]);
    assert!(
        mounts_under(&s.root).is_empty(),
        "cleanup left {:?}",
        mounts_under(&s.root)
    );
});

#[test]
fn mount_counts_are_shared_across_processes() {
    need_root!();
    let s = Store::new("overlay");
    let tar = s.scratch("a.tar");
    std::fs::write(&tar, layer_tar(&[("a", b"a")])).unwrap();
    s.ok(&["apply", "a", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "a", "w"]);
    let m1 = PathBuf::from(s.ok(&["mount", "w"]).trim());
    let m2 = PathBuf::from(s.ok(&["mount", "w"]).trim());
    assert_eq!(m1, m2);
    let merged = std::fs::canonicalize(&m1).unwrap();
    let count = || mount_points().iter().filter(|m| **m == merged).count();
    assert_eq!(count(), 1, "two gets share one mount");
    s.ok(&["unmount", "w"]);
    assert_eq!(count(), 1, "one unmount of two gets leaves it mounted");
    // A mount that vanished behind our back (manual umount) is detected, not trusted.
    assert!(
        Command::new("umount")
            .arg(&merged)
            .status()
            .unwrap()
            .success()
    );
    s.ok(&["rm", "w"]); // the next process repairs the count: nothing is mounted any more
    assert!(!exists(&s, "w"));
    s.ok(&["create", "--rw", "--parent", "a", "w"]);
    s.ok(&["mount", "w"]);
    assert!(
        Command::new("umount")
            .arg(&merged)
            .status()
            .unwrap()
            .success()
    );
    s.ok(&["mount", "w"]);
    assert_eq!(count(), 1, "a vanished mount is made again, once");
    s.ok(&["unmount", "w"]);
    assert_eq!(count(), 0);
}

// === permissions ===

driver_test!(layers_are_private_to_root, |driver| {
    need_root!();
    // A folder of its own that every user can reach (the checkout may sit under a 0700
    // directory such as /root), so that only the home's own mode keeps users out.
    let reachable = tempfile::Builder::new()
        .prefix("graphctl-private-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(reachable.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Store::at(driver, reachable.path().join("root"));
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header("bin/", 0, 0o755), "bin/", &[][..])
        .unwrap();
    b.append_data(&mut header("bin/su", 4, 0o4755), "bin/su", &b"#!x\n"[..])
        .unwrap();
    let tar = s.scratch("suid.tar");
    std::fs::write(&tar, b.into_inner().unwrap()).unwrap();
    s.ok(&["apply", "a", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "a", "w"]);
    let view = PathBuf::from(s.ok(&["mount", "w"]).trim());
    let su = view.join("bin/su");
    let meta = std::fs::metadata(&su).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o4755, "the setuid bit is kept");
    let home = home(&s);
    let mode = std::fs::metadata(&home).unwrap().mode() & 0o777;
    assert!(mode == 0o700 || mode == 0o710, "home mode {mode:o}");
    let layer_mode = std::fs::metadata(home.join("a")).unwrap().mode() & 0o777;
    assert_eq!(layer_mode & 0o007, 0, "layer dir mode {layer_mode:o}");

    let stat_as_nobody = |p: &Path| {
        Command::new("stat")
            .arg(p)
            .uid(65534)
            .gid(65534)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        stat_as_nobody(&s.root),
        "control: nobody must reach the (0755) root itself"
    );
    for p in [&su, &home.join("a")] {
        assert!(!stat_as_nobody(p), "nobody can reach {}", p.display());
    }
    s.ok(&["unmount", "w"]);
});

// === sync ===

driver_test!(sync_option_is_accepted_and_layers_work, |driver| {
    if driver == "overlay" {
        need_root!();
    }
    let s = Store::new(driver);
    let tar = s.scratch("a.tar");
    std::fs::write(&tar, layer_tar(&[("d/", b""), ("d/f", b"synced\n")])).unwrap();
    let sync = |args: &[&str]| {
        let mut all = vec!["-o", "sync=true"];
        all.extend_from_slice(args);
        s.ok(&all)
    };
    sync(&["apply", "a", tar.to_str().unwrap()]);
    sync(&["create", "--parent", "a", "b"]);
    sync(&["apply", "c", tar.to_str().unwrap()]);
    let path = PathBuf::from(sync(&["mount", "b"]).trim());
    assert_eq!(std::fs::read(path.join("d/f")).unwrap(), b"synced\n");
    sync(&["unmount", "b"]);
    assert_eq!(ls_ids(&s).len(), 3);
    let err = s.err(&["-o", "sync=maybe", "ls"]);
    assert!(err.contains("sync"), "{err}");
});

// === immutability under concurrency ===

// Committed layers never change, whatever runs against them at the same time: applies of
// other tars into them, `mount --rw`, writes through their views, children created, applied
// and removed, and writes and applies into a read-write layer on top.
driver_test!(
    committed_layers_never_change_under_concurrent_writers,
    |driver| {
        need_root!();
        const PROCS: u64 = 6;
        const OPS: usize = 16;
        let s = Store::new(driver);
        s.cmd(&["apply", "base", "-"])
            .stdin(layer_tar(&[("etc/", b""), ("etc/os", b"base\n")]))
            .ok();
        s.cmd(&["apply", "--parent", "base", "app", "-"])
            .stdin(image_tar("app"))
            .ok();
        s.ok(&["create", "--rw", "--parent", "app", "ctr"]);
        let rogue = s.scratch("rogue.tar");
        std::fs::write(
            &rogue,
            layer_tar(&[("etc/os", b"rogue\n"), ("app/f", b"rogue\n"), ("new", b"x")]),
        )
        .unwrap();
        let rogue = rogue.to_str().unwrap().to_string();
        let take = |id: &str| {
            let path = PathBuf::from(s.ok(&["mount", id]).trim());
            let snap = snapshot(&path).unwrap();
            s.ok(&["unmount", id]);
            snap
        };
        let before = [("base", take("base")), ("app", take("app"))];

        let failures = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..PROCS)
                .map(|w| {
                    let (s, rogue) = (&s, &rogue);
                    scope.spawn(move || {
                        let mut rng = Rng(0x5DEE_CE66_D1CE_F00D ^ (w + 1).wrapping_mul(0x9E37));
                        let mut bad = Vec::new();
                        let child = format!("c{w}");
                        for _ in 0..OPS {
                            let committed = ["base", "app"][rng.below(2)];
                            let args: Vec<String> = match rng.below(8) {
                                0 | 1 => vec!["apply".into(), committed.into(), rogue.clone()],
                                2 => vec!["mount".into(), "--rw".into(), committed.into()],
                                3 => {
                                    // A view: every write fails.
                                    let out = run(s.cmd(&["mount", committed]).cmd, "mount");
                                    if out.status.success() {
                                        let p =
                                            String::from_utf8_lossy(&out.stdout).trim().to_string();
                                        let p = PathBuf::from(p);
                                        if std::fs::write(p.join("etc/os"), b"w").is_ok()
                                            || std::fs::write(p.join("new"), b"w").is_ok()
                                        {
                                            bad.push(format!(
                                                "wrote through the view of {committed}"
                                            ));
                                        }
                                        run(s.cmd(&["unmount", committed]).cmd, "unmount");
                                    }
                                    continue;
                                }
                                4 => vec![
                                    "apply".into(),
                                    "--parent".into(),
                                    "app".into(),
                                    child.clone(),
                                    rogue.clone(),
                                ],
                                5 => vec!["rm".into(), child.clone()],
                                6 => vec!["apply".into(), "ctr".into(), rogue.clone()],
                                _ => {
                                    let out = run(s.cmd(&["mount", "ctr"]).cmd, "mount ctr");
                                    if out.status.success() {
                                        let p =
                                            String::from_utf8_lossy(&out.stdout).trim().to_string();
                                        let _ =
                                            std::fs::write(PathBuf::from(p).join("etc/os"), b"c");
                                        run(s.cmd(&["unmount", "ctr"]).cmd, "unmount ctr");
                                    }
                                    continue;
                                }
                            };
                            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                            let out = run(s.cmd(&refs).cmd, &format!("worker {w}: {args:?}"));
                            let err = String::from_utf8_lossy(&out.stderr).into_owned();
                            let writes_committed = refs.len() == 3
                                && refs[0] == "apply"
                                && (refs[1] == "base" || refs[1] == "app")
                                || refs.get(1) == Some(&"--rw");
                            if writes_committed && out.status.success() {
                                bad.push(format!("{args:?} succeeded on a committed layer"));
                            }
                            if !out.status.success()
                                && !EXPECTED_ERRORS.iter().any(|e| err.contains(e))
                            {
                                bad.push(format!("{args:?}: unexpected failure: {err}"));
                            }
                        }
                        bad
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert!(failures.is_empty(), "{failures:#?}");
        let opts = CompareOptions::default();
        for (id, snap) in &before {
            let diffs = differences(snap, &take(id), &opts);
            assert!(
                diffs.is_empty(),
                "committed layer {id} changed:\n{diffs:#?}"
            );
        }
        assert!(staging_entries(&s).is_empty(), "{:?}", staging_entries(&s));
        s.ok(&["cleanup"]);
        assert!(
            mounts_under(&s.root).is_empty(),
            "{:?}",
            mounts_under(&s.root)
        );
    }
);

driver_test!(unmount_of_a_mount_in_use_keeps_it_and_says_why, |driver| {
    // The storms' "unexpected" EBUSY: one process's `unmount` took the last reference while
    // another was reading through the mount.
    need_root!();
    let s = Store::new(driver);
    let tar = s.scratch("base.tar");
    std::fs::write(&tar, layer_tar(&[("etc/", b""), ("etc/hosts", b"x")])).unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    let mut reader = Command::new("sleep")
        .arg("600")
        .current_dir(&path)
        .spawn()
        .unwrap();
    let out = s.cmd(&["unmount", "ctr"]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mounted = !mounts_under(&home(&s).join("ctr")).is_empty();
    reader.kill().unwrap();
    reader.wait().unwrap();
    if driver == "vfs" && out.status.success() {
        // A vfs read-write layer is a plain directory: nothing to unmount, nothing busy.
        assert!(!mounted);
        return;
    }
    assert!(!out.status.success(), "unmount of a busy mount succeeded");
    assert!(
        stderr.contains("is in use") && stderr.contains("stays mounted"),
        "{stderr}"
    );
    assert!(mounted, "the busy mount is gone");
    let info = s.ok(&["--json", "info", "ctr"]);
    assert!(info.contains("\"mount_count\": 1"), "{info}");
    // Once the process is gone, the same unmount works and rm follows.
    s.ok(&["unmount", "ctr"]);
    assert!(mounts_under(&home(&s).join("ctr")).is_empty());
    s.ok(&["rm", "ctr"]);
});

driver_test!(
    a_filesystem_turning_read_only_during_rm_breaks_nothing_after,
    |driver| {
        // Issue 16: a filesystem remounted read-only during `rm` left a staging entry that later
        // commands tripped on. The deletion is failed with EROFS at its 200th unlink (strace
        // --inject: deterministic), then the filesystem really goes read-only and back.
        need_root!();
        let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
        let mnt = TmpMount::tmpfs(tmp.path(), "256m");
        let s = Store::at(driver, mnt.path.join("root"));
        let files: Vec<(String, Vec<u8>)> = (0..1000)
            .map(|i| (format!("d{}/f{i}", i % 10), vec![b'x'; 64]))
            .collect();
        let entries: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(p, d)| (p.as_str(), d.as_slice()))
            .collect();
        let tar = s.scratch("big.tar");
        std::fs::write(&tar, layer_tar(&entries)).unwrap();
        s.ok(&["apply", "big", tar.to_str().unwrap()]);
        s.ok(&["apply", "--parent", "big", "top", tar.to_str().unwrap()]);
        s.ok(&["rm", "top"]);
        s.ok(&["apply", "--parent", "big", "top", tar.to_str().unwrap()]);

        let rm = under_strace(
            &s.cmd(&["rm", "top"]).cmd,
            &[
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=unlinkat",
                "-e",
                "inject=unlinkat:error=EROFS:when=200",
            ],
        );
        let out = run(rm, "rm under strace");
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("rm with EROFS injected: {}: {stderr}", out.status);
        // The layer is gone at once (renamed away before the deletion): rm succeeds, and the
        // failed deletion is a warning that says what happens to the files.
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("Read-only file system") && stderr.contains("next command"),
            "{stderr}"
        );
        assert!(
            !exists(&s, "top"),
            "top still listed after its rm: {stderr}"
        );

        // Still read-only: reading commands work and say nothing about the leftover.
        mnt.remount("ro");
        let ls = s.cmd(&["ls"]).output();
        assert!(
            ls.status.success(),
            "{}",
            String::from_utf8_lossy(&ls.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&ls.stdout).lines().count(), 1);
        let status = s.cmd(&["status"]).output();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        mnt.remount("rw");

        // Writable again: the next commands work, and the leftover is gone.
        s.ok(&["apply", "--parent", "big", "top", tar.to_str().unwrap()]);
        assert!(
            staging_entries(&s).is_empty(),
            "left in .staging: {:?}",
            staging_entries(&s)
        );
        s.ok(&["rm", "top"]);
        s.ok(&["rm", "big"]);
        assert!(ls_ids(&s).is_empty());
    }
);
