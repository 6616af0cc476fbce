//! The named scenario checks (moby graphtest and containerd's snapshot suite, made stricter).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::prop::{check_changes_and_diff, read_all};
use super::{
    Capabilities, Factory, FsOp, Harness, Outcome, compare_trees, compare_trees_for_diff,
    copy_tree, is_root, lid, stat3,
};
use graphdriver::{Change, ChangeKind, Error, LayerId, MountOpts};

/// Builds layers and their reference trees for the scenarios.
struct Chain {
    h: Harness,
    t: i64,
}

impl Chain {
    fn new(factory: Factory) -> Outcome<Chain> {
        Ok(Chain {
            h: Harness::new(factory)?,
            t: 1_400_000_000,
        })
    }

    fn copy_of(&self, parent: Option<&Path>, what: &str) -> Outcome<PathBuf> {
        match parent {
            Some(p) => {
                let dst = self.h.scratch_path(what);
                copy_tree(p, &dst)?;
                Ok(dst)
            }
            None => self.h.scratch_dir(what),
        }
    }

    fn apply_ops(&mut self, root: &Path, ops: &[FsOp], caps: &Capabilities) -> Outcome {
        for op in ops {
            self.t += 1;
            if let Some(why) = op.skip_reason(root, caps) {
                return Err(format!("suite bug: {op:?} does not fit: {why}"));
            }
            op.apply(root, self.t)
                .map_err(|e| format!("{op:?} on {}: {e}", root.display()))?;
        }
        Ok(())
    }

    /// Creates image layer `id` on `parent` holding `ops` (as a tar from `archive::changes` +
    /// `export_changes`), checks the size apply_diff reports and the view; returns the
    /// reference tree.
    fn image(
        &mut self,
        id: &str,
        parent: Option<(&LayerId, &Path)>,
        ops: &[FsOp],
        caps: &Capabilities,
    ) -> Outcome<PathBuf> {
        let src = self.copy_of(parent.map(|p| p.1), "src")?;
        self.apply_ops(&src, ops, caps)?;
        self.image_from(id, parent, &src)
    }

    /// Like [`Chain::image`], for a source tree `src` already prepared (a copy of the parent's
    /// reference, or a new directory, changed by the caller).
    fn image_from(
        &mut self,
        id: &str,
        parent: Option<(&LayerId, &Path)>,
        src: &Path,
    ) -> Outcome<PathBuf> {
        let id = lid(id);
        let changes =
            archive::changes(src, parent.map(|p| p.1)).map_err(|e| format!("changes: {e}"))?;
        let tar = read_all(
            archive::export_changes(src, &changes, &archive::TarOptions::default())
                .map_err(|e| format!("export_changes: {e}"))?,
        )?;
        let size = self.h.image_layer(&id, parent.map(|p| p.0), &tar)?;
        let reference = self.copy_of(parent.map(|p| p.1), "ref")?;
        let want = archive::apply_layer(&reference, &tar[..], &archive::ApplyOptions::default())
            .map_err(|e| format!("reference apply: {e}"))?;
        if size != want {
            return Err(format!(
                "apply_diff {id} returned {size} bytes, archive::apply_layer {want}"
            ));
        }
        self.h.expect_view(&id, &reference)?;
        Ok(reference)
    }

    /// Creates read-write layer `id` on `parent`; returns its reference tree.
    fn rw(&mut self, id: &str, parent: Option<(&LayerId, &Path)>) -> Outcome<PathBuf> {
        let id = lid(id);
        self.h
            .driver()
            .create_read_write(&id, parent.map(|p| p.0))
            .map_err(|e| format!("create_read_write {id}: {e}"))?;
        let reference = self.copy_of(parent.map(|p| p.1), "ref")?;
        self.h.expect_view(&id, &reference)?;
        Ok(reference)
    }

    /// Applies `ops` through the mounted layer `id` and to `reference`, then compares.
    fn through(
        &mut self,
        id: &str,
        reference: &Path,
        ops: &[FsOp],
        caps: &Capabilities,
    ) -> Outcome {
        let id = lid(id);
        for op in ops {
            self.t += 1;
            let t = self.t;
            if let Some(why) = op.skip_reason(reference, caps) {
                return Err(format!("suite bug: {op:?} does not fit: {why}"));
            }
            self.h.with_mounted(&id, |view| {
                op.apply(view, t)
                    .map_err(|e| format!("{op:?} through the mount of {id}: {e}"))
            })?;
            op.apply(reference, t)
                .map_err(|e| format!("{op:?} on the reference: {e}"))?;
        }
        self.h.expect_view(&id, reference)
    }

    /// `diff(src, parent)` applied with the driver to a new image layer `id` on `parent`
    /// (whose reference is `parent_ref`): the reported size must equal `diff_size`, the new
    /// layer must equal the same tar applied to the parent's reference, and that must equal
    /// `src_ref` (directory mtimes: see [`compare_trees_for_diff`]). Returns the new reference.
    fn commit(
        &self,
        src: &str,
        id: &str,
        parent: Option<(&LayerId, &Path)>,
        src_ref: &Path,
    ) -> Outcome<PathBuf> {
        let (src, id) = (lid(src), lid(id));
        let tar = self.h.diff_bytes(&src, parent.map(|p| p.0))?;
        let size = self.h.image_layer(&id, parent.map(|p| p.0), &tar)?;
        let want = self
            .h
            .driver()
            .diff_size(&src, parent.map(|p| p.0))
            .map_err(|e| format!("diff_size {src}: {e}"))?;
        if size != want {
            return Err(format!(
                "apply_diff of diff({src}) returned {size} bytes, diff_size said {want}"
            ));
        }
        let reference = self.copy_of(parent.map(|p| p.1), "ref")?;
        archive::apply_layer(&reference, &tar[..], &archive::ApplyOptions::default())
            .map_err(|e| format!("reference apply: {e}"))?;
        let changed = archive::changes(src_ref, parent.map(|p| p.1))
            .map_err(|e| format!("reference changes: {e}"))?;
        let dirs: Vec<&Path> = changed.iter().map(|c| c.path.as_path()).collect();
        compare_trees_for_diff(src_ref, &reference, &dirs, true).map_err(|e| {
            format!("diff({src}) applied to the parent's reference does not reproduce {src}:\n{e}")
        })?;
        self.h.expect_view(&id, &reference)?;
        Ok(reference)
    }

    fn verify(
        &self,
        caps: &Capabilities,
        id: &str,
        parent: Option<&str>,
        reference: &Path,
        parent_ref: Option<&Path>,
    ) -> Outcome {
        let pid = parent.map(lid);
        check_changes_and_diff(&self.h, caps, &lid(id), pid.as_ref(), reference, parent_ref)
    }
}

fn expect_absent(h: &Harness, id: &str, paths: &[&str]) -> Outcome {
    let id = lid(id);
    h.with_mounted(&id, |view| {
        for p in paths {
            if fs::symlink_metadata(view.join(p)).is_ok() {
                return Err(format!("{id}: {p} exists, expected it to be gone"));
            }
        }
        Ok(())
    })
}

fn own_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

/// A new layer with no parent is an empty directory, mode 0755, owned by the caller (0:0 as
/// root) — for image and read-write layers (moby CreateEmpty, containerd "new root is 0755").
pub fn empty_root(factory: Factory, _caps: &Capabilities) -> Outcome {
    let h = Harness::new(factory)?;
    for (id, rw) in [("empty", false), ("empty-rw", true)] {
        let id = lid(id);
        let r = if rw {
            h.driver().create_read_write(&id, None)
        } else {
            h.driver().create(&id, None)
        };
        r.map_err(|e| format!("create {id}: {e}"))?;
        if !h.driver().exists(&id) {
            return Err(format!("{id} does not exist after create"));
        }
        h.with_mounted(&id, |view| {
            let (mode, uid, gid) = stat3(view)?;
            let want = own_ids();
            if mode != 0o755 || (uid, gid) != want {
                return Err(format!(
                    "{id}: root expected mode 0755 owner {}:{}, found {mode:04o} {uid}:{gid}",
                    want.0, want.1
                ));
            }
            let n = fs::read_dir(view)
                .map_err(|e| format!("read {}: {e}", view.display()))?
                .count();
            if n != 0 {
                return Err(format!("{id}: expected an empty root, found {n} entries"));
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn base_ops() -> Vec<FsOp> {
    let mut ops = vec![FsOp::mkdir("a subdir"), FsOp::chmod("a subdir", 0o1705)];
    if is_root() {
        ops.push(FsOp::chown("a subdir", 1, 2));
    }
    ops.push(FsOp::write("file.txt", 16, b'S'));
    ops.push(FsOp::chmod("file.txt", 0o4222));
    ops
}

/// moby CreateBase: a layer holding a sticky 0705 directory owned 1:2 (as root) and a setuid
/// 0222 file — exactly two entries, modes unaffected by the umask.
pub fn base_fixture(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    c.image("base", None, &base_ops(), caps)?;
    c.h.with_mounted(&lid("base"), |view| {
        let n = fs::read_dir(view)
            .map_err(|e| format!("read {}: {e}", view.display()))?
            .count();
        if n != 2 {
            return Err(format!("base: expected exactly 2 entries, found {n}"));
        }
        let (m, u, g) = stat3(&view.join("a subdir"))?;
        let owner = if is_root() { (1, 2) } else { own_ids() };
        if m != 0o1705 || (u, g) != owner {
            return Err(format!(
                "base: /a subdir expected 1705 {}:{}, found {m:04o} {u}:{g}",
                owner.0, owner.1
            ));
        }
        let (m, _, _) = stat3(&view.join("file.txt"))?;
        if m != 0o4222 {
            return Err(format!("base: /file.txt expected mode 4222, found {m:04o}"));
        }
        Ok(())
    })
}

/// moby CreateSnap: an image child and a read-write child of the base, created without any
/// diff, show exactly the base.
pub fn snapshot_inherits(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image("base", None, &base_ops(), caps)?;
    let base = lid("base");
    c.h.driver()
        .create(&lid("snap"), Some(&base))
        .map_err(|e| format!("create snap: {e}"))?;
    c.h.expect_view(&lid("snap"), &base_ref)?;
    c.h.driver()
        .create_read_write(&lid("snap-rw"), Some(&base))
        .map_err(|e| format!("create_read_write snap-rw: {e}"))?;
    c.h.expect_view(&lid("snap-rw"), &base_ref)?;
    c.verify(caps, "snap-rw", Some("base"), &base_ref, Some(&base_ref))
}

/// moby DeepLayerRead / containerd's 128-layer check: `caps.deep_layers` image layers, each
/// adding `layer-<i>` and rewriting `marker`; every layer's marker reads its own number, and a
/// read-write layer on top equals the flat directory that had every layer tar applied.
pub fn deep_layer_read(factory: Factory, caps: &Capabilities) -> Outcome {
    let n = caps.deep_layers;
    if n == 0 {
        eprintln!("skipping deep_layer_read: the driver claims no layer depth (deep_layers = 0)");
        return Ok(());
    }
    let mut c = Chain::new(factory)?;
    let flat = c.h.scratch_dir("flat")?;
    let src = c.h.scratch_dir("src")?;
    let mut parent: Option<LayerId> = None;
    for i in 0..n {
        let mut ops = vec![
            FsOp::write(&format!("layer-{i}"), 8, i as u8),
            FsOp::write("marker", 4, i as u8),
        ];
        let mut list = vec![
            Change {
                path: PathBuf::from(format!("/layer-{i}")),
                kind: ChangeKind::Add,
            },
            Change {
                path: PathBuf::from("/marker"),
                kind: if i == 0 {
                    ChangeKind::Add
                } else {
                    ChangeKind::Modify
                },
            },
        ];
        if i == 0 {
            ops.push(FsOp::write("base-file", 300, 7));
            list.push(Change {
                path: PathBuf::from("/base-file"),
                kind: ChangeKind::Add,
            });
        }
        c.apply_ops(&src, &ops, caps)?;
        let tar = read_all(
            archive::export_changes(&src, &list, &archive::TarOptions::default())
                .map_err(|e| format!("export_changes: {e}"))?,
        )?;
        let id = lid(&format!("deep-{i}"));
        c.h.image_layer(&id, parent.as_ref(), &tar)?;
        archive::apply_layer(&flat, &tar[..], &archive::ApplyOptions::default())
            .map_err(|e| format!("reference apply: {e}"))?;
        parent = Some(id);
    }
    for i in 0..n {
        let id = lid(&format!("deep-{i}"));
        c.h.with_mounted(&id, |view| {
            let m =
                fs::read(view.join("marker")).map_err(|e| format!("{id}: read /marker: {e}"))?;
            let want: Vec<u8> = (0..4u8).map(|k| (i as u8).wrapping_add(k)).collect();
            if m != want {
                return Err(format!("{id}: /marker expected {want:?}, found {m:?}"));
            }
            let b = fs::read(view.join("base-file"))
                .map_err(|e| format!("{id}: read /base-file: {e}"))?;
            if b.len() != 300 {
                return Err(format!(
                    "{id}: /base-file expected 300 bytes, found {}",
                    b.len()
                ));
            }
            Ok(())
        })?;
    }
    c.h.driver()
        .create_read_write(&lid("deep-top"), parent.as_ref())
        .map_err(|e| format!("create_read_write deep-top: {e}"))?;
    c.h.expect_view(&lid("deep-top"), &flat)
}

fn diff_base_ops() -> Vec<FsOp> {
    vec![
        FsOp::write("keep", 100, 1),
        FsOp::write("del", 50, 2),
        FsOp::write("mod", 70, 3),
        FsOp::write("deldir/x", 10, 4),
        FsOp::write("deldir/sub/y", 10, 5),
        FsOp::symlink("link", "keep"),
    ]
}

/// moby DiffApply: `diff(upper, base)` applied to a fresh child of the base reproduces the
/// upper layer, the size apply_diff returns equals `diff_size`, and the deleted file and
/// directory are gone.
pub fn diff_apply(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image("base", None, &diff_base_ops(), caps)?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[
            FsOp::write("new", 4000, 9),
            FsOp::write("mod", 20, 8),
            FsOp::delete("del"),
            FsOp::delete("deldir"),
            FsOp::write("newdir/z", 5, 1),
            FsOp::set_xattr("keep", "user.tag", 1),
        ],
        caps,
    )?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    c.commit("upper", "applied", Some((&base, &base_ref)), &up_ref)?;
    expect_absent(&c.h, "applied", &["del", "deldir", "deldir/x"])
}

/// moby Changes: 20 files in a directory of the base; the upper layer rewrites every third,
/// deletes the next and adds a new file for the third → exactly 21 changes including the
/// directory itself.
pub fn changes_21(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let ops: Vec<FsOp> = (0..20)
        .map(|i| FsOp::write(&format!("files/file-{i:02}"), 32, i))
        .collect();
    let base_ref = c.image("base", None, &ops, caps)?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    let mut up = Vec::new();
    let mut want = vec![Change {
        path: PathBuf::from("/files"),
        kind: ChangeKind::Modify,
    }];
    for i in 0..20u8 {
        let (op, change) = match i % 3 {
            0 => (
                FsOp::write(&format!("files/file-{i:02}"), 33, 100 + i),
                (format!("/files/file-{i:02}"), ChangeKind::Modify),
            ),
            1 => (
                FsOp::delete(&format!("files/file-{i:02}")),
                (format!("/files/file-{i:02}"), ChangeKind::Delete),
            ),
            _ => (
                FsOp::write(&format!("files/new-{i:02}"), 8, i),
                (format!("/files/new-{i:02}"), ChangeKind::Add),
            ),
        };
        up.push(op);
        want.push(Change {
            path: PathBuf::from(change.0),
            kind: change.1,
        });
    }
    want.sort();
    c.through("upper", &up_ref, &up, caps)?;
    let got =
        c.h.driver()
            .changes(&lid("upper"), Some(&base))
            .map_err(|e| format!("changes upper: {e}"))?;
    if got.len() != 21 || (caps.exact_changes && got != want) {
        let show = |v: &[Change]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "changes: expected 21 [{}], found {} [{}]",
            show(&want),
            got.len(),
            show(&got)
        ));
    }
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))
}

/// containerd: removing a lower directory and creating one of the same name shows only the new
/// contents — in the read-write layer, after committing it, and in a child of the commit.
pub fn recreate_lower_dir(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image(
        "base",
        None,
        &[
            FsOp::write("d/a", 5, 1),
            FsOp::write("d/b", 5, 2),
            FsOp::write("d/sub/c", 5, 3),
        ],
        caps,
    )?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[
            FsOp::delete("d"),
            FsOp::mkdir("d"),
            FsOp::write("d/new", 3, 4),
        ],
        caps,
    )?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    let committed = c.commit("upper", "committed", Some((&base, &base_ref)), &up_ref)?;
    let child_ref = c.rw("child", Some((&lid("committed"), &committed)))?;
    expect_absent(&c.h, "child", &["d/a", "d/b", "d/sub"])?;
    c.verify(
        caps,
        "child",
        Some("committed"),
        &child_ref,
        Some(&committed),
    )
}

/// containerd: files and directories deleted in one layer stay deleted in every layer above.
pub fn deleted_stay_deleted(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let r0 = c.image(
        "l0",
        None,
        &[
            FsOp::write("a", 3, 1),
            FsOp::write("b", 3, 2),
            FsOp::write("dir/x", 3, 3),
        ],
        caps,
    )?;
    let r1 = c.image(
        "l1",
        Some((&lid("l0"), &r0)),
        &[FsOp::delete("a"), FsOp::delete("dir")],
        caps,
    )?;
    let r2 = c.image(
        "l2",
        Some((&lid("l1"), &r1)),
        &[FsOp::write("c", 3, 4)],
        caps,
    )?;
    let r3 = c.rw("l3", Some((&lid("l2"), &r2)))?;
    expect_absent(&c.h, "l3", &["a", "dir"])?;
    c.verify(caps, "l1", Some("l0"), &r1, Some(&r0))?;
    c.verify(caps, "l3", Some("l2"), &r3, Some(&r2))
}

/// containerd: chown of files and directories that live in a parent layer (root only).
pub fn chown_lower(factory: Factory, caps: &Capabilities) -> Outcome {
    if !super::require_root("chown_lower") {
        return Ok(());
    }
    let mut c = Chain::new(factory)?;
    let base_ref = c.image(
        "base",
        None,
        &[FsOp::write("f", 10, 1), FsOp::write("d/g", 10, 2)],
        caps,
    )?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[FsOp::chown("f", 1000, 1001), FsOp::chown("d", 2000, 2001)],
        caps,
    )?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    c.commit("upper", "committed", Some((&base, &base_ref)), &up_ref)
        .map(|_| ())
}

/// containerd: a directory owned 1:1, deleted in the next layer and recreated owned 2:2 in the
/// one after, is owned 2:2 and holds only the new file (root only).
pub fn ownership_across_layers(factory: Factory, caps: &Capabilities) -> Outcome {
    if !super::require_root("ownership_across_layers") {
        return Ok(());
    }
    let mut c = Chain::new(factory)?;
    let r1 = c.image(
        "l1",
        None,
        &[
            FsOp::mkdir("dir"),
            FsOp::chown("dir", 1, 1),
            FsOp::write("dir/f", 4, 1),
            FsOp::chown("dir/f", 1, 1),
        ],
        caps,
    )?;
    let r2 = c.image("l2", Some((&lid("l1"), &r1)), &[FsOp::delete("dir")], caps)?;
    let r3 = c.image(
        "l3",
        Some((&lid("l2"), &r2)),
        &[
            FsOp::mkdir("dir"),
            FsOp::chown("dir", 2, 2),
            FsOp::write("dir/g", 4, 2),
        ],
        caps,
    )?;
    let top = c.rw("top", Some((&lid("l3"), &r3)))?;
    c.h.with_mounted(&lid("top"), |view| {
        let (_, u, g) = stat3(&view.join("dir"))?;
        if (u, g) != (2, 2) {
            return Err(format!("top: /dir expected owner 2:2, found {u}:{g}"));
        }
        Ok(())
    })?;
    expect_absent(&c.h, "top", &["dir/f"])?;
    c.verify(caps, "top", Some("l3"), &top, Some(&r3))
}

/// containerd: hardlink a lower file into a new directory, then delete the source; the link
/// keeps the content, through the round trip too.
pub fn hardlink_then_delete_source(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image(
        "base",
        None,
        &[FsOp::write("a", 100, 1), FsOp::write("keep", 10, 2)],
        caps,
    )?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[
            FsOp::mkdir("new"),
            FsOp::hardlink("a", "new/a"),
            FsOp::delete("a"),
        ],
        caps,
    )?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    c.commit("upper", "committed", Some((&base, &base_ref)), &up_ref)
        .map(|_| ())
}

/// containerd's renames: a lower file within its directory and into another one, a file over
/// an existing file, a directory made in this layer, and a lower directory (which may fail with
/// `EXDEV` only when [`Capabilities::lower_dir_rename_exdev`], leaving the view unchanged).
pub fn renames(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image(
        "base",
        None,
        &[
            FsOp::write("f", 10, 1),
            FsOp::write("g", 10, 2),
            FsOp::write("h", 10, 3),
            FsOp::write("d/x", 10, 4),
        ],
        caps,
    )?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[
            FsOp::rename("f", "f2"),
            FsOp::rename("g", "d/g"),
            FsOp::rename("h", "f2"),
            FsOp::write("n/y", 5, 5),
            FsOp::rename("n", "n2"),
        ],
        caps,
    )?;
    // A lower directory.
    c.t += 1;
    let t = c.t;
    let op = FsOp::rename("d", "d2");
    let done =
        c.h.with_mounted(&lid("upper"), |view| match op.apply(view, t) {
            Ok(()) => Ok(true),
            Err(e) if caps.lower_dir_rename_exdev && e.raw_os_error() == Some(libc::EXDEV) => {
                Ok(false)
            }
            Err(e) => Err(format!("rename of lower directory d: {e}")),
        })?;
    if done {
        op.apply(&up_ref, t)
            .map_err(|e| format!("reference rename: {e}"))?;
    }
    c.h.expect_view(&lid("upper"), &up_ref)?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    c.commit("upper", "committed", Some((&base, &base_ref)), &up_ref)
        .map(|_| ())
}

/// containerd "read-only views refuse writes": when the driver promises
/// [`Capabilities::read_only_image_layers`], creating a file through an image layer's path
/// fails and the layer is unchanged.
pub fn read_only_image_layers(factory: Factory, caps: &Capabilities) -> Outcome {
    if !caps.read_only_image_layers {
        eprintln!(
            "skipping read_only_image_layers: the driver does not promise read-only image layers"
        );
        return Ok(());
    }
    let mut c = Chain::new(factory)?;
    let r = c.image("base", None, &[FsOp::write("f", 10, 1)], caps)?;
    c.h.with_mounted(&lid("base"), |view| {
        match fs::write(view.join("intruder"), b"x") {
            Ok(()) => Err("base: creating a file through an image layer succeeded".to_string()),
            Err(_) => match fs::write(view.join("f"), b"y") {
                Ok(()) => {
                    Err("base: rewriting a file through an image layer succeeded".to_string())
                }
                Err(_) => Ok(()),
            },
        }
    })?;
    c.h.expect_view(&lid("base"), &r)
}

/// Removing a layer with children fails with `HasChildren` (and changes nothing); removing
/// leaves first works; a removed or unknown layer is `NotFound`.
pub fn remove_with_children_fails(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let r = c.image("base", None, &[FsOp::write("f", 10, 1)], caps)?;
    let d = c.h.driver();
    let (base, mid, top) = (lid("base"), lid("mid"), lid("top"));
    d.create(&mid, Some(&base))
        .map_err(|e| format!("create mid: {e}"))?;
    d.create_read_write(&top, Some(&mid))
        .map_err(|e| format!("create top: {e}"))?;
    for id in [&base, &mid] {
        match d.remove(id) {
            Err(Error::HasChildren { .. }) => {}
            other => {
                return Err(format!(
                    "remove {id} with children: expected HasChildren, found {other:?}"
                ));
            }
        }
        if !d.exists(id) {
            return Err(format!("{id} vanished after a refused remove"));
        }
    }
    c.h.expect_view(&top, &r)?;
    for id in [&top, &mid, &base] {
        d.remove(id).map_err(|e| format!("remove {id}: {e}"))?;
        if d.exists(id) {
            return Err(format!("{id} exists after remove"));
        }
        match d.remove(id) {
            Err(Error::NotFound(_)) => {}
            other => {
                return Err(format!(
                    "second remove {id}: expected NotFound, found {other:?}"
                ));
            }
        }
    }
    let left = d.list().map_err(|e| format!("list: {e}"))?;
    if !left.is_empty() {
        return Err(format!("list after removing everything: {left:?}"));
    }
    Ok(())
}

/// Duplicate ids fail with `AlreadyExists` (image and read-write) without touching the
/// existing layer; a missing parent fails with `NotFound` and leaves the id absent.
pub fn duplicate_ids_fail(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let r = c.image("dup", None, &[FsOp::write("f", 10, 1)], caps)?;
    let d = c.h.driver();
    let dup = lid("dup");
    match d.create(&dup, None) {
        Err(Error::AlreadyExists(_)) => {}
        other => {
            return Err(format!(
                "create of an existing id: expected AlreadyExists, found {other:?}"
            ));
        }
    }
    match d.create_read_write(&dup, None) {
        Err(Error::AlreadyExists(_)) => {}
        other => {
            return Err(format!(
                "create_read_write of an existing id: expected AlreadyExists, found {other:?}"
            ));
        }
    }
    c.h.expect_view(&dup, &r)?;
    let orphan = lid("orphan");
    match d.create(&orphan, Some(&lid("missing"))) {
        Err(Error::NotFound(_)) => {}
        other => {
            return Err(format!(
                "create on a missing parent: expected NotFound, found {other:?}"
            ));
        }
    }
    if d.exists(&orphan) {
        return Err("orphan exists after a failed create".to_string());
    }
    Ok(())
}

/// Gets nest: every get returns the same path, the tree stays available until the last put,
/// and removal is refused with `InUse` while any get is outstanding.
pub fn get_put_nesting(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image("base", None, &[FsOp::write("f", 10, 1)], caps)?;
    let up_ref = c.rw("rw", Some((&lid("base"), &base_ref)))?;
    c.through("rw", &up_ref, &[FsOp::write("g", 20, 2)], caps)?;
    let d = c.h.driver();
    let id = lid("rw");
    let mut paths = Vec::new();
    for _ in 0..3 {
        paths.push(
            d.get(&id, &MountOpts::default())
                .map_err(|e| format!("get rw: {e}"))?,
        );
    }
    if paths.iter().any(|p| p != &paths[0]) {
        return Err(format!("nested gets returned different paths: {paths:?}"));
    }
    for left in [2, 1] {
        d.put(&id).map_err(|e| format!("put rw: {e}"))?;
        compare_trees(&up_ref, &paths[0])
            .map_err(|e| format!("with {left} gets outstanding the view changed:\n{e}"))?;
        match d.remove(&id) {
            Err(Error::InUse { .. }) => {}
            other => {
                return Err(format!(
                    "remove while mounted {left} time(s): expected InUse, found {other:?}"
                ));
            }
        }
    }
    d.put(&id).map_err(|e| format!("last put rw: {e}"))?;
    c.h.expect_view(&id, &up_ref)?;
    d.remove(&id)
        .map_err(|e| format!("remove rw after the last put: {e}"))
}

/// Several threads get, read and put the same layer at once; afterwards no get is left
/// outstanding (removal succeeds) and the layer is intact.
pub fn concurrent_get_put(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base_ref = c.image("base", None, &[FsOp::write("f", 64, 1)], caps)?;
    let up_ref = c.rw("rw", Some((&lid("base"), &base_ref)))?;
    let d = c.h.driver();
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| -> Outcome {
                    for id in [lid("rw"), lid("base")] {
                        for _ in 0..12 {
                            let p = d
                                .get(&id, &MountOpts::default())
                                .map_err(|e| format!("get {id}: {e}"))?;
                            let r = fs::read(p.join("f"));
                            d.put(&id).map_err(|e| format!("put {id}: {e}"))?;
                            let data = r.map_err(|e| format!("{id}: read /f: {e}"))?;
                            if data.len() != 64 {
                                return Err(format!(
                                    "{id}: /f has {} bytes, expected 64",
                                    data.len()
                                ));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a thread panicked".to_string()))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    c.h.expect_view(&lid("rw"), &up_ref)?;
    d.remove(&lid("rw"))
        .map_err(|e| format!("remove rw after concurrent gets: {e}"))?;
    d.remove(&lid("base"))
        .map_err(|e| format!("remove base after concurrent gets: {e}"))
}

/// A file with two names in a parent layer, rewritten through one name in a read-write layer:
/// both names show the new content and stay one inode, after a commit too. Skipped when the
/// driver declares [`Capabilities::copy_up_breaks_hardlinks`].
pub fn modify_hardlinked_lower(factory: Factory, caps: &Capabilities) -> Outcome {
    if caps.copy_up_breaks_hardlinks {
        eprintln!("skipping modify_hardlinked_lower: the driver declares copy_up_breaks_hardlinks");
        return Ok(());
    }
    let mut c = Chain::new(factory)?;
    let base_ref = c.image(
        "base",
        None,
        &[FsOp::write("a", 10, 1), FsOp::hardlink("a", "d/b")],
        caps,
    )?;
    let base = lid("base");
    let up_ref = c.rw("upper", Some((&base, &base_ref)))?;
    c.through(
        "upper",
        &up_ref,
        &[FsOp::write("a", 20, 2), FsOp::chmod("d/b", 0o600)],
        caps,
    )?;
    c.verify(caps, "upper", Some("base"), &up_ref, Some(&base_ref))?;
    c.commit("upper", "committed", Some((&base, &base_ref)), &up_ref)
        .map(|_| ())
}

/// Sets the atime and mtime of `p` (not following symlinks) to `t` seconds.
fn set_mtime(p: &Path, t: i64) -> Outcome {
    let ts = rustix::fs::Timespec {
        tv_sec: t,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("set the mtime of {}: {e}", p.display()))
}

/// Reads `rel` below `view` of layer `id` and returns its content and `(dev, ino, nlink)`.
fn read_with_inode(id: &LayerId, view: &Path, rel: &str) -> Outcome<(Vec<u8>, (u64, u64, u64))> {
    let p = view.join(rel);
    let md = fs::symlink_metadata(&p).map_err(|e| format!("{id}: lstat /{rel}: {e}"))?;
    if !md.is_file() {
        return Err(format!(
            "{id}: /{rel} expected a regular file, found {:?}",
            md.file_type()
        ));
    }
    let data = fs::read(&p).map_err(|e| format!("{id}: read /{rel}: {e}"))?;
    Ok((data, (md.dev(), md.ino(), md.nlink())))
}

/// Checks that `a/f` and `b/g` of layer `id` both read `want`, and — when `same_inode` — that
/// they are one inode with at least `min_links` links (an image layer of a driver that shares
/// unchanged inodes with its parent, like overlay's hardlinked roots, also counts the parent's
/// name; which names of the view share it is checked by comparing the whole view).
fn expect_linked_pair(
    h: &Harness,
    id: &LayerId,
    want: &[u8],
    same_inode: bool,
    min_links: u64,
) -> Outcome {
    h.with_mounted(id, |view| {
        let (fa, ia) = read_with_inode(id, view, "a/f")?;
        let (gb, ib) = read_with_inode(id, view, "b/g")?;
        for (name, data) in [("a/f", &fa), ("b/g", &gb)] {
            if data.as_slice() != want {
                return Err(format!(
                    "{id}: /{name} expected {:?}, found {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(data)
                ));
            }
        }
        if same_inode && ((ia.0, ia.1) != (ib.0, ib.1) || ia.2 < min_links) {
            return Err(format!(
                "{id}: /a/f and /b/g expected one inode with at least {min_links} links, \
                 found (dev, ino, nlink) {ia:?} and {ib:?}"
            ));
        }
        Ok(())
    })
}

/// A read-write child hard-links a new name `b/g` to the parent layer's `a/f` (through its
/// mounted path): `changes` lists `/b` and `/b/g` as `Add` and not `/a/f`; the diff applied to
/// a fresh child of the parent gives both names with the same content — one inode (nlink 2,
/// or more where the driver shares unchanged inodes with the parent layer, as overlay's
/// hardlinked image roots do) and a view equal to the tar applied to the parent's reference
/// when [`Capabilities::diff_keeps_links_to_unchanged`] — and `diff_size` equals what
/// `apply_diff` returned. Drivers declaring [`Capabilities::copy_up_breaks_hardlinks`] run it
/// too: linking copies `a/f` up, and both names still show the same content.
pub fn diff_keeps_hardlink_to_lower(factory: Factory, caps: &Capabilities) -> Outcome {
    const CONTENT: &[u8] = b"lower";
    let mut c = Chain::new(factory)?;
    // The base layer: a tar of a source tree holding a/f = "lower", with fixed mtimes.
    let src = c.h.scratch_dir("src")?;
    let dir = src.join("a");
    let file = dir.join("f");
    fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    fs::write(&file, CONTENT).map_err(|e| format!("write {}: {e}", file.display()))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("chmod {}: {e}", file.display()))?;
    c.t += 1;
    for p in [&file, &dir, &src] {
        set_mtime(p, c.t)?;
    }
    let base_ref = c.image_from("base", None, &src)?;
    let base = lid("base");

    // The child: b/g becomes a second name of the lower a/f.
    let child = lid("child");
    let child_ref = c.rw("child", Some((&base, &base_ref)))?;
    c.through("child", &child_ref, &[FsOp::mkdir("b")], caps)?;
    // Plain hard_link, not FsOp::Hardlink: that stamps both names, and a new mtime on the
    // shared inode would make /a/f a legitimate Modify. Only the directory gets a fixed mtime.
    c.t += 1;
    let t = c.t;
    let link = |root: &Path| -> Outcome {
        let (from, to) = (root.join("a/f"), root.join("b/g"));
        fs::hard_link(&from, &to)
            .map_err(|e| format!("hard_link {} -> {}: {e}", to.display(), from.display()))?;
        set_mtime(&root.join("b"), t)
    };
    c.h.with_mounted(&child, |view| link(view))?;
    link(&child_ref)?;
    c.h.expect_view(&child, &child_ref)?;
    expect_linked_pair(&c.h, &child, CONTENT, true, 2)?;
    c.h.with_mounted(&child, |view| {
        let (_, (_, _, n)) = read_with_inode(&child, view, "a/f")?;
        if n != 2 {
            return Err(format!("child: /a/f expected 2 links, found {n}"));
        }
        Ok(())
    })?;

    let got =
        c.h.driver()
            .changes(&child, Some(&base))
            .map_err(|e| format!("changes child: {e}"))?;
    let show = || {
        got.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for want in ["/b", "/b/g"] {
        if !got
            .iter()
            .any(|c| c.path == Path::new(want) && c.kind == ChangeKind::Add)
        {
            return Err(format!(
                "changes child: expected Add {want}, found [{}]",
                show()
            ));
        }
    }
    if got.iter().any(|c| c.path == Path::new("/a/f")) {
        return Err(format!(
            "changes child: /a/f is unchanged (only linked to) but listed: [{}]",
            show()
        ));
    }
    c.verify(caps, "child", Some("base"), &child_ref, Some(&base_ref))?;

    // The diff, applied to a fresh child of the base.
    let tar = c.h.diff_bytes(&child, Some(&base))?;
    let applied = lid("applied");
    let size = c.h.image_layer(&applied, Some(&base), &tar)?;
    let want_size =
        c.h.driver()
            .diff_size(&child, Some(&base))
            .map_err(|e| format!("diff_size child: {e}"))?;
    if size != want_size {
        return Err(format!(
            "apply_diff of diff(child) returned {size} bytes, diff_size said {want_size}"
        ));
    }
    if !caps.diff_keeps_links_to_unchanged {
        eprintln!(
            "diff_keeps_hardlink_to_lower: the driver does not promise \
             diff_keeps_links_to_unchanged; checking content only, not the shared inode"
        );
    }
    expect_linked_pair(
        &c.h,
        &applied,
        CONTENT,
        caps.diff_keeps_links_to_unchanged,
        2,
    )?;
    if caps.diff_keeps_links_to_unchanged {
        // The whole view, hardlink groups included, against the tar applied to the base's
        // reference.
        let reference = c.copy_of(Some(&base_ref), "ref")?;
        archive::apply_layer(&reference, &tar[..], &archive::ApplyOptions::default())
            .map_err(|e| format!("reference apply: {e}"))?;
        c.h.expect_view(&applied, &reference)?;
    }
    Ok(())
}

/// Tries writes of every kind through `view` (a read-only view of layer `id`): each must fail
/// with `EROFS`. `existing` is a regular file and `dir` a directory in the layer.
fn expect_writes_refused(id: &str, view: &Path, existing: &str, dir: &str) -> Outcome {
    use std::os::unix::fs::symlink;
    let attempts: [(&str, std::io::Result<()>); 7] = [
        ("create a file", fs::write(view.join("intruder"), b"x")),
        (
            "append to a file",
            fs::OpenOptions::new()
                .append(true)
                .open(view.join(existing))
                .map(drop),
        ),
        ("remove a file", fs::remove_file(view.join(existing))),
        (
            "make a directory",
            fs::create_dir(view.join(dir).join("sub")),
        ),
        ("remove a directory", fs::remove_dir_all(view.join(dir))),
        ("make a symlink", symlink("target", view.join("link"))),
        (
            "chmod a file",
            fs::set_permissions(view.join(existing), fs::Permissions::from_mode(0o777)),
        ),
    ];
    for (what, result) in attempts {
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
            Err(e) => {
                return Err(format!(
                    "{id}: {what} through a read-only view: expected EROFS, found {e}"
                ));
            }
            Ok(()) => {
                return Err(format!(
                    "{id}: {what} through a read-only view succeeded; expected EROFS"
                ));
            }
        }
    }
    Ok(())
}

/// containerd's `View`: a get with [`MountOpts::read_only`] of an image layer, of a read-write
/// layer with changes and of a layer on top of both shows the layer's tree, refuses every
/// write with `EROFS` and changes no layer; views nest and share the reference count with
/// plain gets. A driver that cannot make a view without root may answer
/// [`Error::NotSupported`], and only then (never with a writable tree).
pub fn read_only_views(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base = lid("base");
    let base_ref = c.image(
        "base",
        None,
        &[FsOp::write("f", 10, 1), FsOp::write("d/g", 20, 2)],
        caps,
    )?;
    let ctr_ref = c.rw("ctr", Some((&base, &base_ref)))?;
    c.through(
        "ctr",
        &ctr_ref,
        &[
            FsOp::write("d/new", 5, 3),
            FsOp::delete("f"),
            FsOp::write("f2", 7, 4),
        ],
        caps,
    )?;
    let view_opts = MountOpts::default().view();
    for (id, reference, existing) in [("base", &base_ref, "f"), ("ctr", &ctr_ref, "f2")] {
        let layer = lid(id);
        let view = match c.h.driver().get(&layer, &view_opts) {
            Ok(v) => v,
            Err(Error::NotSupported { reason, .. }) if !is_root() => {
                eprintln!("skipping read_only_views: not root, and the driver says: {reason}");
                return Ok(());
            }
            Err(e) => return Err(format!("get {id} as a read-only view: {e}")),
        };
        let checked = compare_trees(reference, &view)
            .map_err(|d| format!("the view of {id} differs from the reference:\n{d}"))
            .and_then(|()| expect_writes_refused(id, &view, existing, "d"));
        // Nested: a second view and a plain get of the same layer while the view is held.
        let nested =
            c.h.driver()
                .get(&layer, &view_opts)
                .map_err(|e| format!("second view of {id}: {e}"))
                .and_then(|again| {
                    c.h.driver()
                        .put(&layer)
                        .map_err(|e| format!("put {id}: {e}"))?;
                    if again != view {
                        return Err(format!(
                            "{id}: a second view is at {}, the first at {}",
                            again.display(),
                            view.display()
                        ));
                    }
                    c.h.expect_view(&layer, reference)
                });
        let put =
            c.h.driver()
                .put(&layer)
                .map_err(|e| format!("put {id} (view): {e}"));
        checked?;
        nested?;
        put?;
        c.h.expect_view(&layer, reference)?;
    }
    // The rw layer still takes writes through a plain get after its view is gone.
    c.through("ctr", &ctr_ref, &[FsOp::write("after", 3, 5)], caps)?;
    c.verify(caps, "ctr", Some("base"), &ctr_ref, Some(&base_ref))?;
    c.h.expect_view(&base, &base_ref)
}

/// Writes through one read-write layer never show in a sibling on the same parent, in the
/// parent, or in a layer made later on the parent: containerd's isolation between snapshots
/// of one committed parent (also through a lower hardlinked file and an opaque directory).
pub fn sibling_isolation(factory: Factory, caps: &Capabilities) -> Outcome {
    let mut c = Chain::new(factory)?;
    let base = lid("base");
    let base_ref = c.image(
        "base",
        None,
        &[
            FsOp::write("f", 10, 1),
            FsOp::write("d/g", 20, 2),
            FsOp::hardlink("f", "d/f-link"),
        ],
        caps,
    )?;
    let one_ref = c.rw("one", Some((&base, &base_ref)))?;
    let two_ref = c.rw("two", Some((&base, &base_ref)))?;
    let mut one_ops = vec![
        FsOp::write("d/g", 30, 3),
        FsOp::write("only-one", 4, 4),
        FsOp::delete("d/g"),
        FsOp::write("d/g", 8, 5),
        FsOp::mkdir("e"),
    ];
    if !caps.copy_up_breaks_hardlinks {
        one_ops.push(FsOp::write("f", 12, 6));
    } else {
        one_ops.push(FsOp::delete("f"));
    }
    c.through("one", &one_ref, &one_ops, caps)?;
    c.through(
        "two",
        &two_ref,
        &[FsOp::write("only-two", 6, 7), FsOp::delete("d")],
        caps,
    )?;
    // Each sibling is exactly its own operations on the parent; the parent is unchanged.
    c.h.expect_view(&lid("one"), &one_ref)?;
    c.h.expect_view(&lid("two"), &two_ref)?;
    c.h.expect_view(&base, &base_ref)?;
    // A layer created on the parent afterwards sees neither sibling.
    let three_ref = c.rw("three", Some((&base, &base_ref)))?;
    c.h.expect_view(&lid("three"), &three_ref)?;
    c.verify(caps, "one", Some("base"), &one_ref, Some(&base_ref))?;
    c.verify(caps, "two", Some("base"), &two_ref, Some(&base_ref))
}
