use std::fs;

use super::*;
use crate::IoContext;

fn id(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

fn store() -> (tempfile::TempDir, LayerStore) {
    let dir = tempfile::tempdir().unwrap();
    let (s, rec) = LayerStore::open(&dir.path().join("home"), Durability::None).unwrap();
    assert!(rec.is_empty());
    (dir, s)
}

#[test]
fn create_list_remove() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    s.create(&id("b"), Some(&id("a")), true, |p| {
        fs::write(p.join("data"), "x").ctx("write", p)
    })
    .unwrap();
    assert!(s.exists(&id("b")));
    assert!(s.is_read_write(&id("b")));
    assert_eq!(s.parent(&id("b")).unwrap(), Some(id("a")));
    let list = s.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].parent, Some(id("a")));
    assert!(matches!(
        s.remove(&id("a"), |_| Ok(())),
        Err(Error::HasChildren { .. })
    ));
    s.remove(&id("b"), |_| Ok(())).unwrap();
    s.remove(&id("a"), |_| Ok(())).unwrap();
    assert!(s.list().unwrap().is_empty());
    assert!(matches!(
        s.remove(&id("a"), |_| Ok(())),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn duplicate_and_missing_parent() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    assert!(matches!(
        s.create(&id("a"), None, false, |_| Ok(())),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create(&id("c"), Some(&id("zz")), false, |_| Ok(())),
        Err(Error::NotFound(p)) if p == id("zz")
    ));
}

#[test]
fn a_child_being_built_pins_its_parent() {
    let (_d, s) = store();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    s.create(&id("c"), Some(&id("p")), false, |_| {
        // While the child copies the parent, the parent can be neither removed nor changed.
        match s.remove(&id("p"), |_| Ok(())) {
            Err(Error::HasChildren { children, .. }) => assert_eq!(children, vec![id("c")]),
            other => panic!("expected HasChildren, found {other:?}"),
        }
        assert!(matches!(s.begin_apply(&id("p")), Err(Error::InUse { .. })));
        Ok(())
    })
    .unwrap();
    assert_eq!(s.children(&id("p")).unwrap(), vec![id("c")]);
}

#[test]
fn failed_populate_leaves_nothing() {
    let (_d, s) = store();
    let err = s
        .create(&id("a"), None, false, |p| {
            fs::write(p.join("half"), "x").unwrap();
            Err(Error::io("boom", p, io::Error::other("injected")))
        })
        .unwrap_err();
    assert!(err.to_string().contains("injected"));
    assert!(!s.exists(&id("a")));
    assert!(!s.layer_dir(&id("a")).exists());
    assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
}

#[test]
fn failed_apply_keeps_the_layer() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    // Another store (another process): the layer is not fresh for it.
    let (s, _) = LayerStore::open(s.home(), Durability::None).unwrap();
    {
        let _g = s.begin_apply(&id("a")).unwrap();
        assert!(!s.exists(&id("a")), "an applying layer counts as absent");
        assert!(matches!(s.begin_apply(&id("a")), Err(Error::NotFound(_))));
    }
    assert!(s.exists(&id("a")), "a failed apply never removes the layer");
    assert!(!s.is_committed(&id("a")).unwrap());
    s.begin_apply(&id("a")).unwrap().finish().unwrap();
    assert!(s.exists(&id("a")));
    assert!(s.is_committed(&id("a")).unwrap(), "a finished image layer");
    match s.begin_apply(&id("a")) {
        Err(e @ Error::WrongLayerKind { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("committed") && msg.contains("--parent a"),
                "{msg}"
            );
        }
        other => panic!("expected WrongLayerKind, found {other:?}"),
    }
    // A read-write layer without children stays open to applies.
    s.create(&id("rw"), Some(&id("a")), true, |_| Ok(()))
        .unwrap();
    s.begin_apply(&id("rw")).unwrap().finish().unwrap();
    assert!(!s.is_committed(&id("rw")).unwrap());
    s.begin_apply(&id("rw")).unwrap().finish().unwrap();
}

/// A fake mount: `is_active` reports the cell, `activate` sets it.
fn acquire(s: &LayerStore, l: &str, mounted: &std::cell::Cell<bool>, calls: &mut u32) -> u32 {
    s.acquire_ref(
        &id(l),
        Holder::Process,
        || Ok(mounted.get()),
        || {
            *calls += 1;
            mounted.set(true);
            Ok(())
        },
    )
    .unwrap()
}

#[test]
fn mount_counts_nest_and_block_removal() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let mounted = std::cell::Cell::new(false);
    let mut activations = 0;
    for _ in 0..2 {
        acquire(&s, "a", &mounted, &mut activations);
    }
    assert_eq!(activations, 1);
    assert_eq!(s.mount_count(&id("a")).unwrap(), 2);
    assert_eq!(s.mounted().unwrap(), vec![(id("a"), 2)]);
    assert!(matches!(
        s.remove(&id("a"), |_| Ok(())),
        Err(Error::InUse { .. })
    ));
    let mut deactivations = 0;
    assert_eq!(s.release_ref(&id("a"), || Ok(())).unwrap(), 1);
    assert_eq!(
        s.release_ref(&id("a"), || {
            deactivations += 1;
            Ok(())
        })
        .unwrap(),
        0
    );
    assert_eq!(deactivations, 1);
    assert_eq!(s.release_ref(&id("a"), || Ok(())).unwrap(), 0);
    s.remove(&id("a"), |_| Ok(())).unwrap();
    assert!(!s.home().join(MOUNTS_DIR).join("a").exists());
    assert!(!s.home().join(MOUNTS_DIR).join(".refs-a").exists());
}

#[test]
fn vanished_mount_is_activated_again() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let mounted = std::cell::Cell::new(false);
    let mut activations = 0;
    acquire(&s, "a", &mounted, &mut activations);
    mounted.set(false); // a manual umount
    acquire(&s, "a", &mounted, &mut activations);
    assert_eq!(activations, 2);
    assert_eq!(s.mount_count(&id("a")).unwrap(), 2);
}

#[test]
fn an_uncounted_mount_is_adopted_not_stacked() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    // A process was killed after mounting and before counting.
    let mounted = std::cell::Cell::new(true);
    let mut activations = 0;
    assert_eq!(acquire(&s, "a", &mounted, &mut activations), 1);
    assert_eq!(activations, 0);
}

#[test]
fn repair_mounts_resets_counts_of_vanished_mounts_only() {
    let (_d, s) = store();
    for l in ["a", "b", "c"] {
        s.create(&id(l), None, false, |_| Ok(())).unwrap();
        s.acquire_ref(&id(l), Holder::Durable, || Ok(false), || Ok(()))
            .unwrap();
    }
    s.acquire_ref(&id("a"), Holder::Durable, || Ok(true), || Ok(()))
        .unwrap();
    s.release_ref(&id("c"), || Ok(())).unwrap();
    // "a" (2 gets) lost its mount, "b" still has it, "c" has no gets.
    let repaired = s.repair_mounts(|l| Ok(l.as_str() != "a")).unwrap();
    assert_eq!(repaired, vec![(id("a"), 2)]);
    assert_eq!(s.mount_count(&id("a")).unwrap(), 0);
    assert_eq!(s.mount_count(&id("b")).unwrap(), 1);
    s.remove(&id("a"), |_| Ok(())).unwrap();
    assert!(s.repair_mounts(|_| Ok(false)).unwrap() == vec![(id("b"), 1)]);
}

#[test]
fn remove_refuses_a_layer_being_applied_and_a_parent_of_one() {
    let (_d, s) = store();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    s.create(&id("c"), Some(&id("p")), false, |_| Ok(()))
        .unwrap();
    let guard = s.begin_apply(&id("c")).unwrap();
    assert!(matches!(
        s.remove(&id("c"), |_| Ok(())),
        Err(Error::InUse { .. })
    ));
    // The applying child is not listed, but it still pins its parent.
    assert!(s.children(&id("p")).unwrap().is_empty());
    assert!(matches!(
        s.remove(&id("p"), |_| Ok(())),
        Err(Error::HasChildren { children, .. }) if children == vec![id("c")]
    ));
    guard.finish().unwrap();
    s.remove(&id("c"), |_| Ok(())).unwrap();
    s.remove(&id("p"), |_| Ok(())).unwrap();
    assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
}

#[test]
fn no_layer_is_copied_from_a_half_applied_one() {
    let (_d, s) = store();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    // A child being created (copying p) blocks an apply to p...
    s.create(&id("c"), Some(&id("p")), false, |_| {
        match s.begin_apply(&id("p")) {
            Err(Error::InUse { reason, .. }) => assert!(reason.contains("being created")),
            other => panic!("apply during a child's create: {other:?}"),
        }
        Ok(())
    })
    .unwrap();
    // ...a child being applied blocks it too, and once the child exists p is committed.
    let child = s.begin_apply(&id("c")).unwrap();
    assert!(matches!(s.begin_apply(&id("p")), Err(Error::InUse { .. })));
    child.finish().unwrap();
    assert!(s.is_committed(&id("p")).unwrap());
    assert!(matches!(
        s.begin_apply(&id("p")),
        Err(Error::WrongLayerKind { .. })
    ));
    // A create on a parent being applied finds it absent.
    s.create(&id("q"), None, false, |_| Ok(())).unwrap();
    let parent = s.begin_apply(&id("q")).unwrap();
    assert!(matches!(
        s.create(&id("d"), Some(&id("q")), false, |_| Ok(())),
        Err(Error::NotFound(p)) if p == id("q")
    ));
    parent.finish().unwrap();
    assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
}

#[test]
fn a_removal_in_progress_is_not_recovered_by_another_opener() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let grave = s.bury(&id("a")).unwrap();
    assert!(!s.exists(&id("a")));
    let (_s2, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert!(rec.staging_removed.is_empty(), "{rec:?}");
    assert!(grave.path.exists());
    grave.delete().unwrap();
    assert_eq!(fs::read_dir(home.join(STAGING_DIR)).unwrap().count(), 0);
}

#[test]
fn an_undeletable_leftover_does_not_brick_the_store() {
    if !test_support::root_or_skip("mounting a tmpfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    // A dead process's staging dir with something mounted inside.
    let stale = home.join(STAGING_DIR).join("new-x-1-1");
    fs::create_dir_all(stale.join("m")).unwrap();
    rustix::mount::mount(
        "tmpfs",
        stale.join("m"),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    let opened = LayerStore::open(&home, Durability::None);
    rustix::mount::unmount(stale.join("m"), rustix::mount::UnmountFlags::empty()).unwrap();
    let (s2, rec) = opened.unwrap();
    assert_eq!(rec.failed.len(), 1, "{rec:?}");
    assert!(rec.failed[0].contains("new-x-1-1"), "{rec:?}");
    assert!(s2.exists(&id("a")));
    // The next open retries and succeeds.
    let (_, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(rec.staging_removed, vec![stale]);
}

#[test]
fn home_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&home), 0o700);
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    assert_eq!(mode(&s.layer_dir(&id("a"))), 0o700);
    // 0710 (group traversal for a remapped root) is a deliberate choice and kept.
    fs::set_permissions(&home, fs::Permissions::from_mode(0o710)).unwrap();
    LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(mode(&home), 0o710);
}

#[test]
fn sync_stores_work() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = LayerStore::open(&dir.path().join("home"), Durability::Full).unwrap();
    s.create(&id("a"), None, false, |p| {
        fs::write(p.join("f"), "x").ctx("write", p)
    })
    .unwrap();
    s.begin_apply(&id("a")).unwrap().finish().unwrap();
    assert_eq!(
        fs::read_to_string(s.layer_dir(&id("a")).join("f")).unwrap(),
        "x"
    );
}

#[test]
fn concurrent_threads_keep_counts_and_layers_consistent() {
    // flock is per open file description, so threads contend like processes do.
    let (_d, s) = store();
    s.create(&id("base"), None, false, |_| Ok(())).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = s.clone();
            scope.spawn(move || {
                for i in 0..30 {
                    let l = id(&format!("l{}", (t + i) % 5));
                    let _ = s.create(&l, Some(&id("base")), false, |_| Ok(()));
                    let holder = if i % 2 == 0 {
                        Holder::Process
                    } else {
                        Holder::Durable
                    };
                    if s.acquire_ref(&l, holder, || Ok(true), || Ok(())).is_ok() {
                        s.release_ref(&l, || Ok(())).unwrap();
                    }
                    if let Ok(g) = s.begin_apply(&l) {
                        if i % 3 == 0 {
                            drop(g);
                        } else {
                            g.finish().unwrap();
                        }
                    }
                    let _ = s.remove(&l, |_| Ok(()));
                    let _ = s.remove(&id("base"), |_| Ok(()));
                }
            });
        }
    });
    let list = s.list().unwrap();
    for l in &list {
        assert!(
            l.id.as_str() == "base" || l.parent == Some(id("base")),
            "{l:?}"
        );
    }
    assert!(s.mounted().unwrap().is_empty());
    assert_eq!(fs::read_dir(s.home().join(STAGING_DIR)).unwrap().count(), 0);
}

#[test]
fn recovery_removes_leftovers_but_not_live_work() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    s.create(&id("b"), None, false, |_| Ok(())).unwrap();
    // A dead process's staging dir and incomplete layer: nobody holds their locks.
    fs::create_dir(home.join(STAGING_DIR).join("new-x-1-1")).unwrap();
    fs::write(home.join("a").join(INCOMPLETE_FILE), "").unwrap();
    fs::write(home.join("a").join(super::atomic::FRESH_FILE), "").unwrap();
    fs::write(home.join(MOUNTS_DIR).join("gone"), "1").unwrap();
    fs::create_dir(home.join(MOUNTS_DIR).join(".refs-gone")).unwrap();
    fs::write(home.join(MOUNTS_DIR).join(".refs-gone").join("ref-1-1"), "").unwrap();
    // Live work: a guard held by "another process" (same effect: the flock is held).
    let live = s.begin_apply(&id("b")).unwrap();
    let (_s2, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(rec.staging_removed.len(), 1);
    assert_eq!(rec.incomplete_removed, vec![id("a")]);
    let mut stale = rec.stale_mount_records.clone();
    stale.sort();
    assert_eq!(stale, [".refs-gone", "gone"]);
    assert!(!home.join(MOUNTS_DIR).join(".refs-gone").exists());
    assert!(home.join("b").exists(), "live apply must be left alone");
    live.finish().unwrap();
    assert!(s.exists(&id("b")));
}

// === trust: the home, the root above it, and symlinks planted inside ===

/// A directory outside the store with a file in it; `intact` checks both are unchanged.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new(base: &Path) -> Canary {
        let dir = base.join("canary");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("file"), "precious").unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        Canary { dir }
    }
    fn file(&self) -> PathBuf {
        self.dir.join("file")
    }
    fn assert_intact(&self) {
        assert_eq!(fs::read_to_string(self.file()).unwrap(), "precious");
        assert!(self.dir.join("sub").is_dir());
        let mut names: Vec<_> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["file", "sub"],
            "something was added to the canary dir"
        );
    }
}

/// Asserts that `r` failed with a message naming `path` and containing `what`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T>, path: &Path, what: &str) {
    let msg = match r {
        Ok(v) => panic!("expected an error naming {}, got {v:?}", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&path.display().to_string()),
        "{msg:?} does not name {}",
        path.display()
    );
    assert!(msg.contains(what), "{msg:?} does not say {what:?}");
}

const FOUND_SYMLINK: &str = "expected a directory, found a symlink";

#[test]
fn a_symlinked_home_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    std::os::unix::fs::symlink(&canary.dir, &home).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home,
        FOUND_SYMLINK,
    );
    canary.assert_intact();
}

#[test]
fn a_symlinked_root_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    fs::create_dir(&real).unwrap();
    let root = t.path().join("root");
    std::os::unix::fs::symlink(&real, &root).unwrap();
    assert_refused(
        LayerStore::open(&root.join("home"), Durability::None),
        &root,
        FOUND_SYMLINK,
    );
    assert!(
        !real.join("home").exists(),
        "nothing is created through the link"
    );
}

#[test]
fn a_writable_home_or_root_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &root,
        "writable by group/others (mode 0777)",
    );
    fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &root,
        "mode 1777",
    );
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o770)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home,
        "writable by group/others (mode 0770)",
    );
    // Nothing was "repaired" behind the refusal: the mode is the user's to fix.
    let mode = fs::metadata(&home).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o770);
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    LayerStore::open(&home, Durability::None).unwrap();
}

#[test]
fn a_missing_home_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    // Whatever the umask lets through, the new home is 0700.
    LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(
        fs::metadata(&home).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

#[test]
fn a_home_or_root_owned_by_another_user_is_refused() {
    if !test_support::root_or_skip("chown") {
        return;
    }
    let nobody = rustix::fs::Uid::from_raw(65534);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    rustix::fs::chown(&home, Some(nobody), None).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home,
        "expected owner uid 0, found uid 65534",
    );
    rustix::fs::chown(&home, Some(rustix::fs::Uid::ROOT), None).unwrap();
    rustix::fs::chown(&root, Some(nobody), None).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &root,
        "expected owner uid 0, found uid 65534",
    );
}

#[test]
fn an_unprivileged_user_cannot_plant_a_home_in_a_shared_root() {
    use std::os::unix::process::CommandExt;
    if !test_support::root_or_skip("running the attacker as uid 65534") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let canary = Canary::new(t.path());
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
    let home = root.join("home");
    // The attacker (uid 65534) makes the home a link to a directory of root's.
    let st = std::process::Command::new("/bin/ln")
        .arg("-s")
        .arg(&canary.dir)
        .arg(&home)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &root,
        "mode 1777",
    );
    // Even with the root fixed, the planted link is refused, not followed.
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home,
        FOUND_SYMLINK,
    );
    // And a real directory the attacker made is not the caller's.
    fs::remove_file(&home).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
    let st = std::process::Command::new("/bin/mkdir")
        .arg(&home)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home,
        "expected owner uid 0, found uid 65534",
    );
    canary.assert_intact();
}

#[test]
fn a_symlinked_staging_dir_is_refused_and_never_cleaned_through() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    LayerStore::open(&home, Durability::None).unwrap();
    fs::remove_dir(home.join(STAGING_DIR)).unwrap();
    std::os::unix::fs::symlink(&canary.dir, home.join(STAGING_DIR)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home.join(STAGING_DIR),
        FOUND_SYMLINK,
    );
    canary.assert_intact();
    // Same for .mounts.
    fs::remove_file(home.join(STAGING_DIR)).unwrap();
    fs::remove_dir_all(home.join(MOUNTS_DIR)).unwrap();
    std::os::unix::fs::symlink(&canary.dir, home.join(MOUNTS_DIR)).unwrap();
    assert_refused(
        LayerStore::open(&home, Durability::None),
        &home.join(MOUNTS_DIR),
        FOUND_SYMLINK,
    );
    canary.assert_intact();
}

#[test]
fn symlinks_planted_in_staging_are_reported_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    let planted = home.join(STAGING_DIR).join("new-x-1-1");
    std::os::unix::fs::symlink(&canary.dir, &planted).unwrap();
    let (s, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert!(
        rec.failed
            .iter()
            .any(|f| f.contains(&planted.display().to_string()) && f.contains(FOUND_SYMLINK)),
        "{rec:?}"
    );
    assert!(rec.staging_removed.is_empty(), "{rec:?}");
    // Operations that look into staging report it too.
    assert_refused(s.remove(&id("p"), |_| Ok(())), &planted, FOUND_SYMLINK);
    canary.assert_intact();
}

#[test]
fn a_symlinked_layer_is_refused_by_every_operation() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("ok"), None, false, |_| Ok(())).unwrap();
    let layer = home.join("evil");
    std::os::unix::fs::symlink(&canary.dir, &layer).unwrap();
    // The canary looks like an abandoned apply: recovery must not delete it.
    fs::write(canary.dir.join(INCOMPLETE_FILE), "").unwrap();
    let (s2, rec) = LayerStore::open(&home, Durability::None).unwrap();
    fs::remove_file(canary.dir.join(INCOMPLETE_FILE)).unwrap();
    assert!(
        rec.failed
            .iter()
            .any(|f| f.contains(&layer.display().to_string())),
        "{rec:?}"
    );
    assert!(rec.incomplete_removed.is_empty());
    let evil = id("evil");
    assert!(!s2.exists(&evil));
    assert!(!s2.is_read_write(&evil));
    assert_refused(s2.require(&evil), &layer, FOUND_SYMLINK);
    assert_refused(s2.parent(&evil), &layer, FOUND_SYMLINK);
    assert_refused(s2.list(), &layer, FOUND_SYMLINK);
    assert_refused(s2.remove(&evil, |_| Ok(())), &layer, FOUND_SYMLINK);
    assert_refused(s2.begin_apply(&evil), &layer, FOUND_SYMLINK);
    assert_refused(
        s2.acquire_ref(&evil, Holder::Process, || Ok(true), || Ok(())),
        &layer,
        FOUND_SYMLINK,
    );
    assert_refused(s2.layer_subdir(&evil, "root"), &layer, FOUND_SYMLINK);
    assert!(matches!(
        s2.create(&evil, None, false, |_| Ok(())),
        Err(Error::AlreadyExists(_))
    ));
    // A child of a real layer cannot be created on the link either.
    assert_refused(
        s2.create(&id("c"), Some(&evil), false, |_| Ok(())),
        &layer,
        FOUND_SYMLINK,
    );
    // Operations that scan the home for relatives report it too; the real layer stays.
    assert_refused(s.begin_apply(&id("ok")), &layer, FOUND_SYMLINK);
    assert!(s.exists(&id("ok")));
    canary.assert_intact();
}

#[test]
fn symlinks_inside_a_layer_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    s.create(&id("c"), None, false, |p| {
        fs::create_dir(p.join("upper")).ctx("mkdir", p)
    })
    .unwrap();
    let dir = s.layer_dir(&id("c"));
    // <id>/root: drivers ask layer_subdir before they apply, mount or copy into it.
    std::os::unix::fs::symlink(&canary.dir, dir.join("root")).unwrap();
    assert_refused(
        s.layer_subdir(&id("c"), "root"),
        &dir.join("root"),
        FOUND_SYMLINK,
    );
    assert_eq!(
        s.layer_subdir(&id("c"), "upper").unwrap(),
        Some(dir.join("upper"))
    );
    assert_eq!(s.layer_subdir(&id("c"), "nope").unwrap(), None);
    assert!(s.layer_subdir(&id("c"), "../p").is_err());
    // <id>/parent pointing at a host file.
    std::os::unix::fs::symlink(canary.file(), dir.join(PARENT_FILE)).unwrap();
    let parent = dir.join(PARENT_FILE);
    assert_refused(
        s.parent(&id("c")),
        &parent,
        "expected a regular file, found a symlink",
    );
    assert_refused(s.list(), &parent, "found a symlink");
    assert_refused(s.remove(&id("p"), |_| Ok(())), &parent, "found a symlink");
    // <id>/incomplete as a link: the layer counts as busy, nothing is deleted through it.
    fs::remove_file(&parent).unwrap();
    std::os::unix::fs::symlink(canary.file(), dir.join(INCOMPLETE_FILE)).unwrap();
    let (_, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert!(rec.incomplete_removed.is_empty(), "{rec:?}");
    assert!(matches!(
        s.remove(&id("c"), |_| Ok(())),
        Err(Error::InUse { .. })
    ));
    // The store lock as a link.
    fs::remove_file(dir.join(INCOMPLETE_FILE)).unwrap();
    fs::remove_file(home.join(LOCK_FILE)).unwrap();
    std::os::unix::fs::symlink(canary.file(), home.join(LOCK_FILE)).unwrap();
    assert_refused(
        s.list(),
        &home.join(LOCK_FILE),
        "expected a regular file, found a symlink",
    );
    canary.assert_intact();
}

#[test]
fn a_symlinked_mount_record_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let canary = Canary::new(t.path());
    let home = t.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let record = home.join(MOUNTS_DIR).join("a");
    std::os::unix::fs::symlink(canary.file(), &record).unwrap();
    let (s, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert!(
        rec.failed
            .iter()
            .any(|f| f.contains(&record.display().to_string())),
        "{rec:?}"
    );
    let what = "expected a regular file, found a symlink";
    assert_refused(s.mount_count(&id("a")), &record, what);
    assert_refused(
        s.acquire_ref(&id("a"), Holder::Durable, || Ok(true), || Ok(())),
        &record,
        what,
    );
    assert_refused(s.release_ref(&id("a"), || Ok(())), &record, what);
    assert_refused(s.remove(&id("a"), |_| Ok(())), &record, what);
    assert_refused(s.begin_apply(&id("a")), &record, what);
    // The per-layer directory as a link.
    let refs = home.join(MOUNTS_DIR).join(".refs-a");
    fs::remove_file(&record).unwrap();
    fs::remove_dir_all(&refs).ok();
    std::os::unix::fs::symlink(&canary.dir, &refs).unwrap();
    assert_refused(s.mount_count(&id("a")), &refs, FOUND_SYMLINK);
    assert_refused(
        s.acquire_ref(&id("a"), Holder::Process, || Ok(true), || Ok(())),
        &refs,
        FOUND_SYMLINK,
    );
    assert_refused(s.remove(&id("a"), |_| Ok(())), &refs, FOUND_SYMLINK);
    canary.assert_intact();
}

// === mount references that die with their holder ===

#[test]
fn process_references_pair_with_puts_and_durable_ones_outlive_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    s.acquire_ref(&id("a"), Holder::Durable, || Ok(true), || Ok(()))
        .unwrap();
    let clone = s.clone();
    assert_eq!(
        clone
            .acquire_ref(&id("a"), Holder::Process, || Ok(true), || Ok(()))
            .unwrap(),
        2
    );
    // Another opener (as another process would) sees both.
    let (other, _) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(other.mount_count(&id("a")).unwrap(), 2);
    // Dropping every clone of the holder releases its process reference, not the durable one.
    drop(s);
    drop(clone);
    assert_eq!(other.mount_count(&id("a")).unwrap(), 1);
    assert!(matches!(
        other.remove(&id("a"), |_| Ok(())),
        Err(Error::InUse { .. })
    ));
    // A put in a store without process references releases the durable one; the last runs
    // `deactivate`.
    let mut deactivated = false;
    assert_eq!(
        other
            .release_ref(&id("a"), || {
                deactivated = true;
                Ok(())
            })
            .unwrap(),
        0
    );
    assert!(deactivated);
    assert!(
        !home.join(MOUNTS_DIR).join("a").exists(),
        "a zero count is no file"
    );
    other.remove(&id("a"), |_| Ok(())).unwrap();
}

#[test]
fn a_failed_deactivate_releases_nothing() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    s.acquire_ref(&id("a"), Holder::Process, || Ok(true), || Ok(()))
        .unwrap();
    let err = s
        .release_ref(&id("a"), || {
            Err(Error::io("unmount", "/x", io::Error::other("busy")))
        })
        .unwrap_err();
    assert!(err.to_string().contains("busy"));
    assert_eq!(s.mount_count(&id("a")).unwrap(), 1);
    assert_eq!(s.release_ref(&id("a"), || Ok(())).unwrap(), 0);
}

#[test]
fn release_all_drops_every_reference_and_deactivates() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    for h in [Holder::Process, Holder::Durable, Holder::Durable] {
        s.acquire_ref(&id("a"), h, || Ok(true), || Ok(())).unwrap();
    }
    let mut n = 0;
    s.release_all(&id("a"), || {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(s.mount_count(&id("a")).unwrap(), 0);
    assert!(s.mounted().unwrap().is_empty());
    // A later put is a no-op.
    assert_eq!(
        s.release_ref(&id("a"), || panic!("nothing to deactivate"))
            .unwrap(),
        0
    );
    s.remove(&id("a"), |_| Ok(())).unwrap();
}

#[test]
fn a_corrupt_durable_count_is_an_error_not_zero() {
    let (_d, s) = store();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let record = s.home().join(MOUNTS_DIR).join("a");
    fs::write(&record, "lots").unwrap();
    assert_refused(s.mount_count(&id("a")), &record, "expected a decimal count");
    assert!(matches!(
        s.remove(&id("a"), |_| Ok(())),
        Err(Error::Io { .. })
    ));
    // The empty file of an older version's interrupted rewrite counts as zero.
    fs::write(&record, "").unwrap();
    assert_eq!(s.mount_count(&id("a")).unwrap(), 0);
}

/// What the helper process does, from `STORE_HELPER`: `process` takes a process-owned
/// reference and waits to be killed; `durable` takes durable references in a loop, printing
/// each new count once it is on disk.
const HELPER_ENV: &str = "STORE_HELPER";
const HELPER_HOME_ENV: &str = "STORE_HELPER_HOME";

/// Not a test: the body of the helper process the tests below start (and kill).
#[test]
#[ignore = "a helper process of other tests, started by them"]
fn helper_process() {
    use std::io::Write;
    let (Ok(mode), Ok(home)) = (std::env::var(HELPER_ENV), std::env::var(HELPER_HOME_ENV)) else {
        return;
    };
    let (s, _) = LayerStore::open(Path::new(&home), Durability::None).unwrap();
    let mut out = std::io::stdout();
    match mode.as_str() {
        "process" => {
            s.acquire_ref(&id("a"), Holder::Process, || Ok(true), || Ok(()))
                .unwrap();
            writeln!(out, "held").unwrap();
            out.flush().unwrap();
        }
        "durable" => loop {
            let n = s
                .acquire_ref(&id("a"), Holder::Durable, || Ok(true), || Ok(()))
                .unwrap();
            writeln!(out, "count {n}").unwrap();
            out.flush().unwrap();
        },
        other => panic!("unknown helper mode {other}"),
    }
    loop {
        std::thread::park();
    }
}

/// The helper process, SIGKILLed when dropped (so a failing test does not leave it behind).
struct Helper(std::process::Child);

impl Helper {
    /// SIGKILL: no destructor runs in the helper.
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The helper's lines of output, without libtest's `test … ... ` prefix on the first one.
type HelperLines = std::iter::Map<
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    fn(std::io::Result<String>) -> String,
>;

fn strip_libtest(line: std::io::Result<String>) -> String {
    let line = line.unwrap();
    match line.rsplit_once(" ... ") {
        Some((_, rest)) => rest.to_string(),
        None => line,
    }
}

/// Starts the helper in `mode` on `home`, with its stdout piped.
fn spawn_helper(mode: &str, home: &Path) -> (Helper, HelperLines) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::helper_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, mode)
        .env(HELPER_HOME_ENV, home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(strip_libtest as fn(std::io::Result<String>) -> String);
    (Helper(child), lines)
}

#[test]
fn a_killed_holder_leaks_no_reference() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let (mut child, mut lines) = spawn_helper("process", &home);
    let ready = lines.find(|l| l == "held");
    assert!(ready.is_some(), "the helper did not take its reference");
    // While it lives, its reference counts and pins the layer.
    assert_eq!(s.mount_count(&id("a")).unwrap(), 1);
    assert_eq!(s.mounted().unwrap(), vec![(id("a"), 1)]);
    assert!(matches!(
        s.remove(&id("a"), |_| Ok(())),
        Err(Error::InUse { .. })
    ));
    assert!(matches!(s.begin_apply(&id("a")), Err(Error::InUse { .. })));
    child.kill();
    let refs = home.join(MOUNTS_DIR).join(".refs-a");
    assert_eq!(
        fs::read_dir(&refs).unwrap().count(),
        1,
        "the dead holder's file is still there"
    );
    assert_eq!(s.mount_count(&id("a")).unwrap(), 0);
    assert_eq!(
        fs::read_dir(&refs).unwrap().count(),
        0,
        "and reclaimed by the count"
    );
    assert!(s.mounted().unwrap().is_empty());
    s.remove(&id("a"), |_| Ok(())).unwrap();
    assert!(!s.layer_dir(&id("a")).exists());
}

#[test]
fn open_reclaims_the_references_of_dead_processes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let (mut child, mut lines) = spawn_helper("process", &home);
    assert!(
        lines.any(|l| l == "held"),
        "the helper did not take its reference"
    );
    child.kill();
    let (_, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(rec.dead_references, vec![(id("a"), 1)]);
    s.remove(&id("a"), |_| Ok(())).unwrap();
}

#[test]
fn a_killed_durable_writer_never_leaves_an_empty_or_zero_count() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    s.create(&id("a"), None, false, |_| Ok(())).unwrap();
    let record = home.join(MOUNTS_DIR).join("a");
    // Kill the writer after different numbers of writes: wherever the kill lands, the count
    // on disk is the last one reported or the one being written.
    let mut last = 0u32;
    for writes in [1usize, 7, 40] {
        let (mut child, mut lines) = spawn_helper("durable", &home);
        let mut seen = 0;
        for line in lines.by_ref() {
            if let Some(n) = line.strip_prefix("count ") {
                last = n.parse().unwrap();
                seen += 1;
                if seen == writes {
                    break;
                }
            }
        }
        assert_eq!(seen, writes, "the helper stopped early");
        child.kill();
        let text = fs::read_to_string(&record).unwrap();
        let on_disk: u32 = text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("count file holds {text:?}"));
        // The child may have written a few more counts between the line read here and the
        // kill landing: never fewer than reported, never a torn or empty file.
        assert!(on_disk >= last, "count {on_disk} on disk, {last} reported");
        assert_eq!(s.mount_count(&id("a")).unwrap(), on_disk);
        last = on_disk;
    }
    assert!(last >= 48);
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_dead_builders_staging_entry_pins_nothing_and_every_check_agrees() {
    // A builder of child `c` of `p` died mid-create: its staging entry (with the `parent` file)
    // is there, its flock is gone. Whether the pid in the name is dead or alive (a reused pid:
    // here our own) must not matter; only the flock does.
    for pid in [dead_pid(), std::process::id()] {
        let (_d, s) = store();
        s.create(&id("p"), None, false, |_| Ok(())).unwrap();
        let entry = s.home().join(STAGING_DIR).join(format!("new-c-{pid}-7"));
        fs::create_dir(&entry).unwrap();
        fs::write(entry.join(PARENT_FILE), "p").unwrap();
        assert_eq!(s.children_any(&id("p")).unwrap(), Vec::<LayerId>::new());
        // Both the apply and the removal of the parent proceed.
        let guard = s
            .begin_apply(&id("p"))
            .unwrap_or_else(|e| panic!("pid {pid}: begin_apply refused: {e}"));
        guard.finish().unwrap();
        s.remove(&id("p"), |_| Ok(())).unwrap();
        // And recovery cleans the entry up.
        let (_s2, rec) = LayerStore::open(s.home(), Durability::None).unwrap();
        assert_eq!(rec.staging_removed, vec![entry], "pid {pid}");
    }
}

#[test]
fn a_live_builder_pins_its_parent_for_every_check() {
    let (_d, s) = store();
    s.create(&id("p"), None, false, |_| Ok(())).unwrap();
    s.create(&id("c"), Some(&id("p")), false, |_| {
        assert_eq!(s.children_any(&id("p")).unwrap(), vec![id("c")]);
        match s.begin_apply(&id("p")) {
            Err(Error::InUse { reason, .. }) => {
                assert!(
                    reason.contains("being created") && reason.contains('c'),
                    "{reason}"
                )
            }
            other => panic!("expected InUse, found {other:?}"),
        }
        assert!(matches!(
            s.remove(&id("p"), |_| Ok(())),
            Err(Error::HasChildren { .. })
        ));
        // Recovery in another opener leaves live work alone.
        let (_s2, rec) = LayerStore::open(s.home(), Durability::None).unwrap();
        assert!(rec.staging_removed.is_empty(), "{rec:?}");
        Ok(())
    })
    .unwrap();
}

/// A layer with one file `f` holding `content` in its `root/`, created by a store other than
/// `s` (so it is not fresh for `s`).
fn layer_with_root(home: &Path, name: &str, content: &str) {
    let (other, _) = LayerStore::open(home, Durability::None).unwrap();
    other
        .create(&id(name), None, false, |dir| {
            fs::create_dir(dir.join("root")).unwrap();
            fs::write(dir.join("root/f"), content).unwrap();
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_staged_apply_replaces_the_tree_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    layer_with_root(&home, "a", "old");
    let g = s.begin_apply(&id("a")).unwrap();
    assert!(!g.is_fresh(), "created by another store");
    // A failed build: the old tree is untouched and the staged entries are gone.
    let err = g
        .replace_subdir("root", |stage| {
            fs::create_dir(stage).unwrap();
            fs::write(stage.join("f"), "half").unwrap();
            fs::create_dir(stage.with_file_name("apply-work")).unwrap();
            Err::<(), _>(Error::NotFound(id("boom")))
        })
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)));
    assert_eq!(fs::read_to_string(home.join("a/root/f")).unwrap(), "old");
    assert!(!home.join("a/apply-root").exists() && !home.join("a/apply-work").exists());
    // A good one replaces it.
    let n = g
        .replace_subdir("root", |stage| {
            fs::create_dir(stage).unwrap();
            fs::write(stage.join("f"), "new").unwrap();
            Ok(7)
        })
        .unwrap();
    assert_eq!(n, 7);
    g.finish().unwrap();
    assert_eq!(fs::read_to_string(home.join("a/root/f")).unwrap(), "new");
    let names: Vec<_> = fs::read_dir(home.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(APPLY_PREFIX))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn a_failed_apply_removes_a_fresh_layer_and_keeps_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    // Fresh: created by this store, never handed out.
    s.create(&id("fresh"), None, false, |_| Ok(())).unwrap();
    let g = s.begin_apply(&id("fresh")).unwrap();
    assert!(g.is_fresh());
    drop(g);
    assert!(
        !s.exists(&id("fresh")),
        "a failed fresh apply removes the layer"
    );
    assert!(!home.join("fresh").exists());
    // Handed out once: no longer fresh, kept.
    s.create(&id("got"), None, false, |_| Ok(())).unwrap();
    s.acquire_ref(&id("got"), Holder::Process, || Ok(true), || Ok(()))
        .unwrap();
    s.release_ref(&id("got"), || Ok(())).unwrap();
    let g = s.begin_apply(&id("got")).unwrap();
    assert!(!g.is_fresh());
    drop(g);
    assert!(s.exists(&id("got")));
    // Read-write layers are never fresh; a second apply is never fresh.
    s.create(&id("rw"), None, true, |_| Ok(())).unwrap();
    assert!(!s.begin_apply(&id("rw")).unwrap().is_fresh());
    s.create(&id("twice"), None, false, |_| Ok(())).unwrap();
    let g = s.begin_apply(&id("twice")).unwrap();
    drop(g);
    assert!(!s.exists(&id("twice")));
}

#[test]
fn recovery_rolls_back_an_interrupted_apply_into_an_existing_layer() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    layer_with_root(&home, "a", "old");
    // What a process killed after staging left: marker, staged copy and scratch, no
    // apply-fresh.
    fs::write(home.join("a").join(INCOMPLETE_FILE), "").unwrap();
    fs::create_dir(home.join("a/apply-root")).unwrap();
    fs::write(home.join("a/apply-root/f"), "half").unwrap();
    fs::create_dir(home.join("a/apply-work")).unwrap();
    let (s, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(rec.applies_rolled_back, vec![id("a")], "{rec:?}");
    assert!(rec.incomplete_removed.is_empty());
    assert!(s.exists(&id("a")));
    assert_eq!(fs::read_to_string(home.join("a/root/f")).unwrap(), "old");
    assert!(!home.join("a/apply-root").exists() && !home.join("a/apply-work").exists());
    assert!(!home.join("a").join(INCOMPLETE_FILE).exists());
}

#[test]
fn a_pending_layer_is_invisible_to_other_processes_until_its_apply_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (s, _) = LayerStore::open(&home, Durability::None).unwrap();
    let other = LayerStore::open(&home, Durability::None)
        .unwrap()
        .0
        .into_other_process();
    s.create_pending(&id("p"), None, |d| {
        fs::create_dir(d.join("root")).unwrap();
        Ok(())
    })
    .unwrap();
    // Present here, absent (and not creatable, not removable) everywhere else.
    assert!(s.exists(&id("p")));
    assert!(!other.exists(&id("p")));
    assert!(other.list().unwrap().is_empty());
    assert!(matches!(
        other.create(&id("p"), None, false, |_| Ok(())),
        Err(Error::AlreadyExists(_))
    ));
    assert!(other.remove(&id("p"), |_| Ok(())).is_err());
    // Its first apply publishes it.
    let g = s.begin_apply(&id("p")).unwrap();
    assert!(g.is_fresh());
    assert!(!other.exists(&id("p")));
    g.finish().unwrap();
    assert!(other.exists(&id("p")));
    assert!(other.is_committed(&id("p")).unwrap());
    assert!(!home.join("p").join(super::atomic::FRESH_FILE).exists());

    // A failed first apply removes it.
    s.create_pending(&id("q"), None, |_| Ok(())).unwrap();
    drop(s.begin_apply(&id("q")).unwrap());
    assert!(!s.exists(&id("q")) && !home.join("q").exists());

    // A creator that goes away before applying (its process dies: its marker locks go) —
    // the next open removes the layer.
    s.create_pending(&id("r"), None, |_| Ok(())).unwrap();
    drop(s);
    pending_map().retain(|(_, layer), _| *layer != id("r"));
    let (_s2, rec) = LayerStore::open(&home, Durability::None).unwrap();
    assert_eq!(rec.incomplete_removed, vec![id("r")], "{rec:?}");
    assert!(!home.join("r").exists());

    // The creator itself may remove it unapplied.
    let (s3, _) = LayerStore::open(&home, Durability::None).unwrap();
    s3.create_pending(&id("t"), None, |_| Ok(())).unwrap();
    s3.remove(&id("t"), |_| Ok(())).unwrap();
    assert!(!home.join("t").exists());
}
