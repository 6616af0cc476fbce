//! Unit tests with a tiny directory-backed [`ProtoDriver`] fake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use archive::compare::{CompareOptions, assert_same_tree};
use graphdriver::{ChangeKind, Durability, IoContext, LayerInfo, LayerStore};

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Every hook falls back: the plain naive driver.
    NaiveOnly,
    Apply,
    FallbackEarly,
    FallbackLate,
}

/// Layers are `<home>/<id>/root`, created as copies of the parent's root.
struct Fake {
    store: LayerStore,
    outstanding: AtomicI64,
    fail_get: Mutex<Option<LayerId>>,
    native: Mutex<Mode>,
    /// Answer `changes` natively for base layers (no parent) with a marker change.
    native_changes_for_bases: Mutex<bool>,
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
            let mtime = e.metadata().unwrap().modified().unwrap();
            let f = fs::File::options().write(true).open(&to).unwrap();
            f.set_times(fs::FileTimes::new().set_modified(mtime))
                .unwrap();
        }
    }
    let mtime = fs::metadata(src).unwrap().modified().unwrap();
    fs::File::open(dst)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
}

impl Fake {
    fn new(home: &Path) -> Fake {
        Fake {
            store: LayerStore::open(home, Durability::None).unwrap().0,
            outstanding: AtomicI64::new(0),
            fail_get: Mutex::new(None),
            native: Mutex::new(Mode::NaiveOnly),
            native_changes_for_bases: Mutex::new(false),
        }
    }
    fn root(&self, id: &LayerId) -> PathBuf {
        self.store.layer_dir(id).join("root")
    }
    fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::SeqCst)
    }
}

impl ProtoDriver for Fake {
    fn name(&self) -> &str {
        "fake"
    }
    fn home(&self) -> &Path {
        self.store.home()
    }
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        let proot = parent.map(|p| self.root(p));
        self.store.create(id, parent, false, |dir| {
            match &proot {
                Some(p) => copy_dir(p, &dir.join("root")),
                None => fs::create_dir(dir.join("root")).ctx("mkdir", dir)?,
            }
            Ok(())
        })
    }
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create(id, parent)
    }
    fn remove(&self, id: &LayerId) -> Result<()> {
        self.store.remove(id, |_| Ok(()))
    }
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        if self.fail_get.lock().unwrap().as_ref() == Some(id) {
            return Err(Error::NotFound(id.clone()));
        }
        self.store
            .acquire_ref(id, opts.holder(), || Ok(true), || Ok(()))?;
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        Ok(self.root(id))
    }
    fn put(&self, id: &LayerId) -> Result<()> {
        self.store.release_ref(id, || Ok(()))?;
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn exists(&self, id: &LayerId) -> bool {
        self.store.exists(id)
    }
    fn status(&self) -> Vec<(String, String)> {
        vec![]
    }
    fn cleanup(&self) -> Result<()> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<LayerInfo>> {
        self.store.list()
    }
}

impl DiffHooks for Fake {
    fn changes_native(
        &self,
        _id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Native<Vec<Change>>> {
        if *self.native_changes_for_bases.lock().unwrap() && parent.is_none() {
            return Ok(Native::Done(vec![Change {
                path: PathBuf::from("/native-marker"),
                kind: ChangeKind::Modify,
            }]));
        }
        Ok(Native::Fallback)
    }

    fn apply_diff_native(
        &self,
        id: &LayerId,
        _parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<Native<u64>> {
        match *self.native.lock().unwrap() {
            Mode::NaiveOnly | Mode::FallbackEarly => Ok(Native::Fallback),
            Mode::FallbackLate => {
                let mut buf = [0u8; 16];
                let _ = diff.read(&mut buf).ctx("read", Path::new("diff"))?;
                Ok(Native::Fallback)
            }
            Mode::Apply => {
                let guard = self.store.begin_apply(id)?;
                let n = chrootarchive::apply_layer(&self.root(id), diff, &ApplyOptions::default())
                    .map_err(|e| Error::archive(id, e))?;
                guard.finish()?;
                // Marker so the test sees the native path ran.
                Ok(Native::Done(n + 1_000_000))
            }
        }
    }
}

fn id(s: &str) -> LayerId {
    LayerId::new(s).unwrap()
}

fn setup() -> (tempfile::TempDir, NaiveDiffDriver<Fake>) {
    let dir = tempfile::tempdir().unwrap();
    let d = NaiveDiffDriver::new(Fake::new(&dir.path().join("home")));
    (dir, d)
}

/// A tar of the tree `src` (built by archive's exporter).
fn tar_of(src: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    archive::tar_tree(src, &TarOptions::default())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Base layer with a few files, filled through apply_diff.
fn base(d: &impl DiffDriver, tmp: &Path, fake_create: impl Fn(&LayerId)) -> LayerId {
    let src = tmp.join("src-base");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/passwd"), "root:x:0:0\n").unwrap();
    fs::write(src.join("keep"), "keep me").unwrap();
    fs::write(src.join("gone"), "delete me").unwrap();
    let b = id("base");
    fake_create(&b);
    let bytes = d.apply_diff(&b, None, &mut &tar_of(&src)[..]).unwrap();
    assert!(bytes >= 11 + 7 + 9);
    b
}

#[test]
fn diff_without_parent_is_the_whole_tree_and_puts_when_dropped() {
    let (tmp, d) = setup();
    let b = base(&d, tmp.path(), |i| d.create(i, None).unwrap());
    assert_eq!(d.inner().outstanding(), 0);
    let mut reader = d.diff(&b, None).unwrap();
    assert_eq!(d.inner().outstanding(), 1, "the stream holds its get");
    let mut tar = Vec::new();
    reader.read_to_end(&mut tar).unwrap();
    drop(reader);
    assert_eq!(
        d.inner().outstanding(),
        0,
        "dropping the stream puts the layer"
    );

    let c = id("copy");
    d.create(&c, None).unwrap();
    d.apply_diff(&c, None, &mut &tar[..]).unwrap();
    assert_same_tree(
        &d.inner().root(&b),
        &d.inner().root(&c),
        &CompareOptions::default(),
    )
    .unwrap();
}

#[test]
fn diff_changes_and_size_against_parent_round_trip() {
    let (tmp, d) = setup();
    let b = base(&d, tmp.path(), |i| d.create(i, None).unwrap());
    let c = id("child");
    d.create(&c, Some(&b)).unwrap();
    let root = d.get(&c, &MountOpts::default()).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0\nuser:x:1000:1000\n").unwrap();
    fs::write(root.join("new"), "added").unwrap();
    fs::remove_file(root.join("gone")).unwrap();
    d.put(&c).unwrap();

    let changes = d.changes(&c, Some(&b)).unwrap();
    let seen: Vec<(String, ChangeKind)> = changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.kind))
        .collect();
    assert!(
        seen.contains(&("/etc/passwd".into(), ChangeKind::Modify)),
        "{seen:?}"
    );
    assert!(seen.contains(&("/new".into(), ChangeKind::Add)), "{seen:?}");
    assert!(
        seen.contains(&("/gone".into(), ChangeKind::Delete)),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|(p, _)| p == "/keep"), "{seen:?}");

    let size = d.diff_size(&c, Some(&b)).unwrap();
    assert_eq!(
        size,
        ("root:x:0:0\nuser:x:1000:1000\n".len() + "added".len()) as u64
    );

    let mut tar = Vec::new();
    d.diff(&c, Some(&b)).unwrap().read_to_end(&mut tar).unwrap();
    // Re-create the child from base + the diff: same tree, same size reported.
    let r = id("replay");
    d.create(&r, Some(&b)).unwrap();
    assert_eq!(d.apply_diff(&r, Some(&b), &mut &tar[..]).unwrap(), size);
    assert_same_tree(
        &d.inner().root(&c),
        &d.inner().root(&r),
        &CompareOptions::default(),
    )
    .unwrap();
    assert_eq!(d.inner().outstanding(), 0);
}

/// A file rewritten with the same size and the same mtime after its layer was copied — a
/// change made "within the same second" — is still reported, without any sleep.
#[test]
fn same_second_rewrite_is_detected() {
    let (_tmp, d) = setup();
    let p = id("parent");
    d.create(&p, None).unwrap();
    let proot = d.inner().root(&p);
    // Whole-second mtime, as layer tars give: the racy case moby misses (issue 31805).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mtime = UNIX_EPOCH + Duration::from_secs(now);
    fs::write(proot.join("f"), "aaaa").unwrap();
    let set = |path: &Path| {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(mtime))
            .unwrap()
    };
    set(&proot.join("f"));

    let c = id("child");
    d.create(&c, Some(&p)).unwrap();
    assert!(
        d.changes(&c, Some(&p)).unwrap().is_empty(),
        "a fresh copy has no changes"
    );
    let croot = d.inner().root(&c);
    fs::write(croot.join("f"), "bbbb").unwrap();
    set(&croot.join("f"));
    let (pm, cm) = (
        fs::metadata(proot.join("f")).unwrap(),
        fs::metadata(croot.join("f")).unwrap(),
    );
    assert_eq!(pm.len(), cm.len());
    assert_eq!(pm.modified().unwrap(), cm.modified().unwrap());

    let changes = d.changes(&c, Some(&p)).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].path, Path::new("/f"));
    assert_eq!(changes[0].kind, ChangeKind::Modify);
    assert_eq!(d.diff_size(&c, Some(&p)).unwrap(), 4);
}

#[test]
fn failed_apply_removes_the_layer_and_puts_it() {
    let (tmp, d) = setup();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), vec![7u8; 10_000]).unwrap();
    let tar = tar_of(&src);
    let l = id("l");
    d.create(&l, None).unwrap();
    let err = d.apply_diff(&l, None, &mut &tar[..3000]).unwrap_err();
    assert!(matches!(err, Error::Archive { .. }), "{err}");
    assert!(!d.exists(&l), "a failed apply must not leave the layer");
    assert_eq!(d.inner().outstanding(), 0);
}

#[test]
fn every_get_is_put_when_the_parent_get_fails() {
    let (tmp, d) = setup();
    let b = base(&d, tmp.path(), |i| d.create(i, None).unwrap());
    let c = id("c");
    d.create(&c, Some(&b)).unwrap();
    *d.inner().fail_get.lock().unwrap() = Some(b.clone());
    assert!(d.changes(&c, Some(&b)).is_err());
    assert!(d.diff_size(&c, Some(&b)).is_err());
    assert!(d.diff(&c, Some(&b)).is_err());
    assert_eq!(d.inner().outstanding(), 0);
    assert_eq!(d.inner().store.mount_count(&c).unwrap(), 0);
}

fn with_apply() -> (tempfile::TempDir, NaiveDiffDriver<Fake>) {
    let dir = tempfile::tempdir().unwrap();
    let d = NaiveDiffDriver::new(Fake::new(&dir.path().join("home")));
    *d.inner().native.lock().unwrap() = Mode::Apply;
    (dir, d)
}

fn small_tar(tmp: &Path) -> Vec<u8> {
    let src = tmp.join("src-small");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("hello"), "hello").unwrap();
    tar_of(&src)
}

#[test]
fn with_apply_uses_native_when_it_applies() {
    let (tmp, d) = with_apply();
    let l = id("l");
    d.create(&l, None).unwrap();
    let n = d
        .apply_diff(&l, None, &mut &small_tar(tmp.path())[..])
        .unwrap();
    assert_eq!(n, 1_000_005, "native result expected");
    assert_eq!(
        fs::read_to_string(d.inner().root(&l).join("hello")).unwrap(),
        "hello"
    );
}

#[test]
fn with_apply_falls_back_to_naive_before_reading() {
    let (tmp, d) = with_apply();
    *d.inner().native.lock().unwrap() = Mode::FallbackEarly;
    let l = id("l");
    d.create(&l, None).unwrap();
    let n = d
        .apply_diff(&l, None, &mut &small_tar(tmp.path())[..])
        .unwrap();
    assert_eq!(n, 5, "naive apply result expected");
    assert_eq!(
        fs::read_to_string(d.inner().root(&l).join("hello")).unwrap(),
        "hello"
    );
    assert_eq!(d.inner().outstanding(), 0);
}

#[test]
fn with_apply_late_fallback_is_a_driver_bug_error() {
    let (tmp, d) = with_apply();
    *d.inner().native.lock().unwrap() = Mode::FallbackLate;
    let l = id("l");
    d.create(&l, None).unwrap();
    let err = d
        .apply_diff(&l, None, &mut &small_tar(tmp.path())[..])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("driver bug"), "{msg}");
    assert!(msg.contains("after reading 16 byte(s)"), "{msg}");
    assert!(!d.exists(&l), "the layer must not stay half-made");
}

#[test]
fn hooks_choose_native_or_naive_per_call() {
    let (tmp, d) = setup();
    let b = base(&d, tmp.path(), |i| d.create(i, None).unwrap());
    let c = id("c");
    d.create(&c, Some(&b)).unwrap();
    fs::write(d.inner().root(&c).join("new"), "x").unwrap();
    *d.inner().native_changes_for_bases.lock().unwrap() = true;
    // The hook answers for the base layer ...
    let native = d.changes(&b, None).unwrap();
    assert_eq!(native.len(), 1);
    assert_eq!(native[0].path, Path::new("/native-marker"));
    // ... and falls back for the child, which the naive comparison answers.
    let naive = d.changes(&c, Some(&b)).unwrap();
    assert!(
        naive
            .iter()
            .any(|ch| ch.path == Path::new("/new") && ch.kind == ChangeKind::Add),
        "{naive:?}"
    );
    assert_eq!(d.inner().outstanding(), 0, "the native answer took no get");
}
