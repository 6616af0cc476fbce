//! The model-based property test: random operation sequences, checked against reference trees.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::{Capabilities, Factory, Harness, Outcome, copy_tree, lid};
use graphdriver::{ChangeKind, Error, LayerId, MountOpts};

/// A file mode in a generated operation; `Debug` prints it in octal (`0o755`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#o}", self.0)
    }
}

/// One filesystem operation, applied the same way to a layer's mounted view and to its
/// reference tree. Paths are relative to the layer root; missing parent directories are
/// created (mode 0755). Afterwards the operation sets the mtime of everything it touched — the
/// entries and their parent directories — to the step's timestamp, so results never depend on
/// the clock. An operation that does not fit the current tree (for example writing through a
/// symlink, or deleting what is not there) is skipped on both sides; the skip is part of the
/// trace a failure prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsOp {
    /// Create or truncate a regular file (new files get mode 0644) and write `len` bytes
    /// counting up from `fill`.
    Write {
        /// The file.
        path: String,
        /// Bytes to write.
        len: u16,
        /// The first byte.
        fill: u8,
    },
    /// Create a directory (mode 0755).
    Mkdir {
        /// The directory.
        path: String,
    },
    /// Remove a file, or a directory with everything below it.
    Delete {
        /// What to remove.
        path: String,
    },
    /// `rename(2)`; skipped when either side is a directory and the target exists, or the
    /// target is below the source.
    Rename {
        /// The old name.
        from: String,
        /// The new name.
        to: String,
    },
    /// `chmod(2)` (not on symlinks).
    Chmod {
        /// The entry.
        path: String,
        /// The new permission bits.
        mode: Mode,
    },
    /// `lchown(2)`; only as root (skipped otherwise).
    Chown {
        /// The entry.
        path: String,
        /// New owner.
        uid: u32,
        /// New group.
        gid: u32,
    },
    /// Create a symlink (never followed by anything the suite does).
    Symlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// Add a hard link `to` for the regular file `from`.
    Hardlink {
        /// The existing file.
        from: String,
        /// The new name.
        to: String,
    },
    /// Set the xattr `<name>` (`user.*`; `trusted.*` only as root) on a regular file.
    SetXattr {
        /// The file.
        path: String,
        /// The full name, for example `user.a`.
        name: String,
        /// One-byte value.
        value: u8,
    },
    /// Create a FIFO (mode 0644).
    Mkfifo {
        /// The FIFO.
        path: String,
    },
    /// Create the character device 1:7 (mode 0644); only as root (skipped otherwise).
    Mknod {
        /// The device node.
        path: String,
    },
}

impl FsOp {
    /// A [`FsOp::Write`] of `len` bytes counting up from `fill`.
    pub fn write(path: &str, len: u16, fill: u8) -> FsOp {
        FsOp::Write {
            path: path.to_string(),
            len,
            fill,
        }
    }

    /// A [`FsOp::Mkdir`].
    pub fn mkdir(path: &str) -> FsOp {
        FsOp::Mkdir {
            path: path.to_string(),
        }
    }

    /// A [`FsOp::Delete`].
    pub fn delete(path: &str) -> FsOp {
        FsOp::Delete {
            path: path.to_string(),
        }
    }

    /// A [`FsOp::Rename`].
    pub fn rename(from: &str, to: &str) -> FsOp {
        FsOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        }
    }

    /// A [`FsOp::Chmod`].
    pub fn chmod(path: &str, mode: u32) -> FsOp {
        FsOp::Chmod {
            path: path.to_string(),
            mode: Mode(mode),
        }
    }

    /// A [`FsOp::Chown`].
    pub fn chown(path: &str, uid: u32, gid: u32) -> FsOp {
        FsOp::Chown {
            path: path.to_string(),
            uid,
            gid,
        }
    }

    /// A [`FsOp::Hardlink`].
    pub fn hardlink(from: &str, to: &str) -> FsOp {
        FsOp::Hardlink {
            from: from.to_string(),
            to: to.to_string(),
        }
    }

    /// A [`FsOp::Symlink`].
    pub fn symlink(path: &str, target: &str) -> FsOp {
        FsOp::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    /// A [`FsOp::SetXattr`].
    pub fn set_xattr(path: &str, name: &str, value: u8) -> FsOp {
        FsOp::SetXattr {
            path: path.to_string(),
            name: name.to_string(),
            value,
        }
    }

    /// The paths this operation names (existing or to be created).
    fn paths(&self) -> Vec<&str> {
        match self {
            FsOp::Write { path, .. }
            | FsOp::Mkdir { path }
            | FsOp::Delete { path }
            | FsOp::Chmod { path, .. }
            | FsOp::Chown { path, .. }
            | FsOp::Symlink { path, .. }
            | FsOp::SetXattr { path, .. }
            | FsOp::Mkfifo { path }
            | FsOp::Mknod { path } => vec![path.as_str()],
            FsOp::Rename { from, to } | FsOp::Hardlink { from, to } => {
                vec![from.as_str(), to.as_str()]
            }
        }
    }

    /// Why this operation does not fit the tree `root` (the reference), if it does not.
    pub fn skip_reason(&self, root: &Path, caps: &Capabilities) -> Option<String> {
        for p in self.paths() {
            if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Some(format!("{p:?} is not a plain relative path"));
            }
            // Every existing ancestor must be a real directory.
            let mut cur = root.to_path_buf();
            let comps: Vec<&str> = p.split('/').collect();
            for c in &comps[..comps.len() - 1] {
                cur.push(c);
                match fs::symlink_metadata(&cur) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => return Some(format!("an ancestor of {p} is not a directory")),
                    Err(_) => break,
                }
            }
        }
        let st = |p: &str| fs::symlink_metadata(root.join(p)).ok();
        let multi =
            |md: &fs::Metadata| caps.copy_up_breaks_hardlinks && !md.is_dir() && md.nlink() > 1;
        match self {
            FsOp::Write { path, .. } => match st(path) {
                Some(md) if !md.is_file() => Some(format!("{path} is not a regular file")),
                Some(md) if multi(&md) => Some(format!(
                    "{path} has several names (copy-up breaks hardlinks)"
                )),
                _ => None,
            },
            FsOp::Mknod { .. } if !super::is_root() => Some("not root".to_string()),
            FsOp::SetXattr { name, .. } if !name.starts_with("user.") && !super::is_root() => {
                Some("not root".to_string())
            }
            FsOp::Mkdir { path }
            | FsOp::Symlink { path, .. }
            | FsOp::Mkfifo { path }
            | FsOp::Mknod { path } => st(path).map(|_| format!("{path} exists")),
            FsOp::Delete { path } => st(path).is_none().then(|| format!("{path} does not exist")),
            FsOp::Rename { from, to } => {
                let Some(f) = st(from) else {
                    return Some(format!("{from} does not exist"));
                };
                if from == to || to.starts_with(&format!("{from}/")) {
                    return Some(format!("{to} is {from} or below it"));
                }
                if multi(&f) {
                    return Some(format!(
                        "{from} has several names (copy-up breaks hardlinks)"
                    ));
                }
                match st(to) {
                    Some(t) if t.is_dir() || f.is_dir() => {
                        Some(format!("{to} exists and one side is a directory"))
                    }
                    _ => None,
                }
            }
            FsOp::Chmod { path, .. } | FsOp::Chown { path, .. } => match st(path) {
                None => Some(format!("{path} does not exist")),
                Some(md) if matches!(self, FsOp::Chmod { .. }) && md.file_type().is_symlink() => {
                    Some(format!("{path} is a symlink"))
                }
                Some(md) if multi(&md) => Some(format!(
                    "{path} has several names (copy-up breaks hardlinks)"
                )),
                _ if matches!(self, FsOp::Chown { .. }) && !super::is_root() => {
                    Some("not root".to_string())
                }
                _ => None,
            },
            FsOp::Hardlink { from, to } => match (st(from), st(to)) {
                (Some(f), None) if f.is_file() && !multi(&f) => (from == to
                    || to.starts_with(&format!("{from}/")))
                .then(|| "bad target".to_string()),
                _ => Some(format!(
                    "{from} is not a single-name regular file or {to} exists"
                )),
            },
            FsOp::SetXattr { path, .. } => match st(path) {
                Some(md) if md.is_file() && !multi(&md) => None,
                _ => Some(format!("{path} is not a single-name regular file")),
            },
        }
    }

    /// Creates the missing ancestors of the operation's paths (mode 0755) and stamps them and
    /// their parents with mtime `t`. [`FsOp::apply`] starts with this; call it alone to mirror
    /// an operation that was refused after this point (`EXDEV`).
    pub fn prepare(&self, root: &Path, t: i64) -> std::io::Result<()> {
        let mut touched: Vec<PathBuf> = Vec::new();
        for p in self.paths() {
            let comps: Vec<&str> = p.split('/').collect();
            let mut cur = root.to_path_buf();
            for c in &comps[..comps.len() - 1] {
                cur.push(c);
                if fs::symlink_metadata(&cur).is_err() {
                    fs::create_dir(&cur)?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))?;
                    if let Some(parent) = cur.parent() {
                        touched.push(parent.to_path_buf());
                    }
                    touched.push(cur.clone());
                }
            }
        }
        stamp(&touched, t)
    }

    /// Applies the operation to the tree `root` and stamps what it touched with mtime `t`
    /// (seconds). Call [`FsOp::skip_reason`] first; this fails on any filesystem error.
    pub fn apply(&self, root: &Path, t: i64) -> std::io::Result<()> {
        self.prepare(root, t)?;
        let mut touched: Vec<PathBuf> = Vec::new();
        for p in self.paths() {
            let abs = root.join(p);
            if let Some(parent) = abs.parent() {
                touched.push(parent.to_path_buf());
            }
            touched.push(abs);
        }
        let abs = |p: &str| root.join(p);
        match self {
            FsOp::Write { path, len, fill } => {
                let p = abs(path);
                let existed = fs::symlink_metadata(&p).is_ok();
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&p)?;
                let data: Vec<u8> = (0..*len).map(|i| fill.wrapping_add(i as u8)).collect();
                f.write_all(&data)?;
                drop(f);
                if !existed {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
                }
            }
            FsOp::Mkdir { path } => {
                fs::create_dir(abs(path))?;
                fs::set_permissions(abs(path), fs::Permissions::from_mode(0o755))?;
            }
            FsOp::Delete { path } => {
                let p = abs(path);
                if fs::symlink_metadata(&p)?.is_dir() {
                    fs::remove_dir_all(&p)?;
                } else {
                    fs::remove_file(&p)?;
                }
            }
            FsOp::Rename { from, to } => fs::rename(abs(from), abs(to))?,
            FsOp::Chmod { path, mode } => {
                fs::set_permissions(abs(path), fs::Permissions::from_mode(mode.0))?
            }
            FsOp::Chown { path, uid, gid } => {
                std::os::unix::fs::lchown(abs(path), Some(*uid), Some(*gid))?
            }
            FsOp::Symlink { path, target } => std::os::unix::fs::symlink(target, abs(path))?,
            FsOp::Hardlink { from, to } => fs::hard_link(abs(from), abs(to))?,
            FsOp::SetXattr { path, name, value } => {
                rustix::fs::lsetxattr(
                    abs(path),
                    name.as_str(),
                    &[*value],
                    rustix::fs::XattrFlags::empty(),
                )?;
            }
            FsOp::Mknod { path } => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    abs(path),
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    rustix::fs::makedev(1, 7),
                )?;
                fs::set_permissions(abs(path), fs::Permissions::from_mode(0o644))?;
            }
            FsOp::Mkfifo { path } => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    abs(path),
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )?;
                fs::set_permissions(abs(path), fs::Permissions::from_mode(0o644))?;
            }
        }
        stamp(&touched, t)
    }
}

/// Sets atime and mtime of each existing path (not following symlinks) to `t` seconds.
fn stamp(paths: &[PathBuf], t: i64) -> std::io::Result<()> {
    let ts = rustix::fs::Timespec {
        tv_sec: t,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    for p in paths {
        if fs::symlink_metadata(p).is_ok() {
            rustix::fs::utimensat(
                rustix::fs::CWD,
                p,
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
    }
    Ok(())
}

/// One step of a generated case. Layer numbers pick among the layers alive at that point
/// (modulo their count): `image` numbers among image layers, `rw` among read-write layers,
/// `layer` among all. A step with nothing to pick is skipped.
#[derive(Clone, Debug)]
pub enum Op {
    /// Create an image layer on image layer `parent` (or none) and fill it with `apply_diff` of
    /// a tar holding `diff` (built in a scratch tree, exported with `archive::changes` +
    /// `archive::export_changes`).
    CreateImage {
        /// The parent image layer, if any.
        parent: Option<usize>,
        /// The changes the layer tar carries.
        diff: Vec<FsOp>,
    },
    /// Create a read-write layer on image layer `parent` (or none).
    CreateRw {
        /// The parent image layer, if any.
        parent: Option<usize>,
    },
    /// Apply `op` through the mounted read-write layer `rw`.
    Fs {
        /// The read-write layer.
        rw: usize,
        /// The operation.
        op: FsOp,
    },
    /// `diff` read-write layer `rw` against its parent and `apply_diff` it to a new image layer
    /// on the same parent ("docker commit"); the new layer must equal `rw`.
    Commit {
        /// The read-write layer.
        rw: usize,
    },
    /// Get layer `layer` twice, put once, check the view, put again.
    GetNested {
        /// The layer.
        layer: usize,
    },
    /// Remove layer `layer`: refused with `HasChildren` if it has children, else it vanishes.
    Remove {
        /// The layer.
        layer: usize,
    },
}

const PATHS: &[&str] = &[
    "f0", "f1", "d0", "d0/f0", "d0/f1", "d0/d1", "d0/d1/f0", "d1", "d1/f0", "d1/f1",
];
const TARGETS: &[&str] = &["f0", "../f1", "d0/missing", "/d1/f0", "/etc/passwd"];
const MODES: &[u32] = &[0o755, 0o700, 0o750, 0o644, 0o4755, 0o2775, 0o1777];

fn path() -> impl Strategy<Value = String> {
    prop::sample::select(PATHS).prop_map(String::from)
}

/// The strategy for one [`FsOp`].
pub fn fs_op() -> impl Strategy<Value = FsOp> {
    prop_oneof![
        4 => (path(), 0u16..300, any::<u8>()).prop_map(|(path, len, fill)| FsOp::Write { path, len, fill }),
        2 => path().prop_map(|path| FsOp::Mkdir { path }),
        3 => path().prop_map(|path| FsOp::Delete { path }),
        2 => (path(), path()).prop_map(|(from, to)| FsOp::Rename { from, to }),
        1 => (path(), prop::sample::select(MODES)).prop_map(|(path, m)| FsOp::Chmod { path, mode: Mode(m) }),
        1 => (path(), 0u32..3, 0u32..3).prop_map(|(path, uid, gid)| FsOp::Chown { path, uid: uid * 1000, gid: gid * 1000 }),
        1 => (path(), prop::sample::select(TARGETS)).prop_map(|(path, t)| FsOp::Symlink { path, target: t.to_string() }),
        2 => (path(), path()).prop_map(|(from, to)| FsOp::Hardlink { from, to }),
        1 => (path(), prop::sample::select(&["user.a", "user.b", "trusted.t"][..]), any::<u8>())
            .prop_map(|(path, n, value)| FsOp::SetXattr { path, name: n.to_string(), value }),
        1 => path().prop_map(|path| FsOp::Mkfifo { path }),
        1 => path().prop_map(|path| FsOp::Mknod { path }),
    ]
}

fn op(caps: &Capabilities) -> impl Strategy<Value = Op> {
    let _ = caps;
    prop_oneof![
        2 => (prop::option::of(0usize..4), prop::collection::vec(fs_op(), 0..4))
            .prop_map(|(parent, diff)| Op::CreateImage { parent, diff }),
        2 => prop::option::weighted(0.8, 0usize..4).prop_map(|parent| Op::CreateRw { parent }),
        12 => (0usize..4, fs_op()).prop_map(|(rw, op)| Op::Fs { rw, op }),
        1 => (0usize..4).prop_map(|rw| Op::Commit { rw }),
        1 => (0usize..6).prop_map(|layer| Op::GetNested { layer }),
        1 => (0usize..6).prop_map(|layer| Op::Remove { layer }),
    ]
}

/// The model-based property test: `caps.model_cases` random cases of at most
/// `caps.model_max_ops` steps, each case on a fresh driver. Every case starts with an image
/// layer (from a random diff over a populated tree) and a read-write layer on it. After each step the affected layer
/// is checked: its mounted view equals its reference tree; `list` matches the model's layers;
/// `changes` agrees with a walk of the reference trees (`archive::changes`, see
/// [`Capabilities::exact_changes`]); `diff` applied to a copy of the parent's reference
/// reproduces the reference; and `diff_size` equals the bytes that apply reported (and the
/// reference's `changes_size`). On failure proptest shrinks the case, and the panic shows the
/// minimal `Vec<Op>` and the executed trace. With `GRAPHDRIVER_CONFORMANCE_TRACE` set, passing
/// cases print their traces too.
pub fn model(factory: Factory, caps: &Capabilities) -> Outcome {
    let cases = std::env::var("GRAPHDRIVER_CONFORMANCE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(caps.model_cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    });
    let max = caps.model_max_ops.max(1);
    // The base layer starts from (a shrinkable subset of) a populated tree, so that most
    // generated operations find something to act on.
    let seed = vec![
        FsOp::write("f0", 10, 1),
        FsOp::write("d0/f0", 20, 2),
        FsOp::write("d0/d1/f0", 30, 3),
        FsOp::write("d1/f1", 40, 4),
        FsOp::hardlink("f0", "d1/f0"),
        FsOp::symlink("f1", "d0/f0"),
    ];
    let strategy = (
        prop::sample::subsequence(seed.clone(), 0..=seed.len()),
        prop::collection::vec(fs_op(), 0..4),
        prop::collection::vec(op(caps), 0..max),
    )
        .prop_map(|(mut base, random, rest)| {
            base.extend(random);
            let mut ops = vec![
                Op::CreateImage {
                    parent: None,
                    diff: base,
                },
                Op::CreateRw { parent: Some(0) },
            ];
            ops.extend(rest);
            ops
        });
    let result = runner.run(&strategy, |ops| {
        run_case(factory, caps, &ops).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, ops)) => {
            let script: Vec<String> = ops
                .iter()
                .enumerate()
                .map(|(i, op)| format!("  {i}: {op:?}"))
                .collect();
            Err(format!(
                "minimal failing sequence:\n{}\n{reason}",
                script.join("\n")
            ))
        }
        Err(TestError::Abort(reason)) => Err(format!("aborted: {reason}")),
    }
}

struct MLayer {
    id: LayerId,
    parent: Option<usize>,
    rw: bool,
    reference: PathBuf,
    alive: bool,
}

struct Model<'a> {
    h: Harness,
    caps: &'a Capabilities,
    layers: Vec<MLayer>,
    t: i64,
    trace: Vec<String>,
}

/// Runs one generated case on a fresh driver; `Err` holds the trace and what differed.
fn run_case(factory: Factory, caps: &Capabilities, ops: &[Op]) -> Outcome {
    let mut m = Model {
        h: Harness::new(factory)?,
        caps,
        layers: Vec::new(),
        t: 1_500_000_000,
        trace: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = m.step(op) {
            return Err(format!(
                "trace:\n{}\nstep {i} failed: {e}",
                m.trace.join("\n")
            ));
        }
    }
    if std::env::var_os("GRAPHDRIVER_CONFORMANCE_TRACE").is_some() {
        eprintln!("passing case:\n{}\n", m.trace.join("\n"));
    }
    Ok(())
}

impl Model<'_> {
    fn pick(&self, n: usize, filter: impl Fn(&MLayer) -> bool) -> Option<usize> {
        let alive: Vec<usize> = (0..self.layers.len())
            .filter(|&i| self.layers[i].alive && filter(&self.layers[i]))
            .collect();
        if alive.is_empty() {
            None
        } else {
            Some(alive[n % alive.len()])
        }
    }

    fn parent_ref(&self, parent: Option<usize>) -> Option<&Path> {
        parent.map(|p| self.layers[p].reference.as_path())
    }

    /// A copy of the parent's reference (or an empty 0755 directory).
    fn fresh_from(&self, parent: Option<usize>, what: &str) -> Outcome<PathBuf> {
        match self.parent_ref(parent) {
            Some(p) => {
                let dst = self.h.scratch_path(what);
                copy_tree(p, &dst)?;
                Ok(dst)
            }
            None => self.h.scratch_dir(what),
        }
    }

    fn new_id(&self) -> LayerId {
        lid(&format!("l{}", self.layers.len()))
    }

    /// Runs one operation on the driver and the model, then checks what it affected. Each kind
    /// of operation has its own method below.
    fn step(&mut self, op: &Op) -> Outcome {
        match op {
            Op::CreateImage { parent, diff } => self.create_image(*parent, diff),
            Op::CreateRw { parent } => self.create_rw(*parent),
            Op::Fs { rw, op } => self.fs(*rw, op),
            Op::Commit { rw } => self.commit(*rw),
            Op::GetNested { layer } => self.get_nested(*layer),
            Op::Remove { layer } => self.remove(*layer),
        }
    }

    /// The reference of a new image layer on `parent` filled from `tar`: a copy of the
    /// parent's reference with `tar` applied by `archive::apply_layer`, and the bytes that
    /// apply reported.
    fn reference_with(&self, parent: Option<usize>, tar: &[u8]) -> Outcome<(PathBuf, u64)> {
        let reference = self.fresh_from(parent, "ref")?;
        let bytes = archive::apply_layer(&reference, tar, &archive::ApplyOptions::default())
            .map_err(|e| format!("reference apply: {e}"))?;
        Ok((reference, bytes))
    }

    /// Adds layer `id` to the model with its reference tree and checks it.
    fn push_layer(
        &mut self,
        id: LayerId,
        parent: Option<usize>,
        rw: bool,
        reference: PathBuf,
    ) -> Outcome {
        self.layers.push(MLayer {
            id,
            parent,
            rw,
            reference,
            alive: true,
        });
        self.check(self.layers.len() - 1)
    }

    /// [`Op::CreateImage`]: builds the tar from `diff` in a scratch copy of the parent's
    /// reference, applies it to a new image layer, and checks the size `apply_diff` returned
    /// against the same tar applied to a copy of the parent's reference (the new reference).
    fn create_image(&mut self, parent: Option<usize>, diff: &[FsOp]) -> Outcome {
        let parent = parent.and_then(|n| self.pick(n, |l| !l.rw));
        let id = self.new_id();
        let pid = parent.map(|p| self.layers[p].id.clone());
        // Build the tar in a scratch copy of the parent.
        let scratch = self.fresh_from(parent, "diff-src")?;
        let mut applied = Vec::new();
        for f in diff {
            self.t += 1;
            match f.skip_reason(&scratch, self.caps) {
                Some(why) => applied.push(format!("{f:?} skipped: {why}")),
                None => {
                    f.apply(&scratch, self.t)
                        .map_err(|e| format!("{f:?} on scratch: {e}"))?;
                    applied.push(format!("{f:?}"));
                }
            }
        }
        let changes = archive::changes(&scratch, self.parent_ref(parent))
            .map_err(|e| format!("changes of scratch tree: {e}"))?;
        let tar = read_all(
            archive::export_changes(&scratch, &changes, &archive::TarOptions::default())
                .map_err(|e| format!("export_changes: {e}"))?,
        )?;
        self.trace.push(format!(
            "create image {id} on {} with diff [{}]",
            name(pid.as_ref()),
            applied.join(", ")
        ));
        let size = self.h.image_layer(&id, pid.as_ref(), &tar)?;
        let (reference, want) = self.reference_with(parent, &tar)?;
        if size != want {
            return Err(format!(
                "apply_diff {id} returned {size} bytes, archive::apply_layer {want}"
            ));
        }
        self.push_layer(id, parent, false, reference)
    }

    /// [`Op::CreateRw`]: a read-write layer whose reference is a copy of its parent's.
    fn create_rw(&mut self, parent: Option<usize>) -> Outcome {
        let parent = parent.and_then(|n| self.pick(n, |l| !l.rw));
        let id = self.new_id();
        let pid = parent.map(|p| self.layers[p].id.clone());
        self.trace
            .push(format!("create rw {id} on {}", name(pid.as_ref())));
        self.h
            .driver()
            .create_read_write(&id, pid.as_ref())
            .map_err(|e| format!("create_read_write {id}: {e}"))?;
        let reference = self.fresh_from(parent, "ref")?;
        self.push_layer(id, parent, true, reference)
    }

    /// [`Op::Fs`]: `op` through the mount of a read-write layer, then on its reference (only
    /// its missing parents when the driver refused a directory rename with an allowed `EXDEV`).
    fn fs(&mut self, rw: usize, op: &FsOp) -> Outcome {
        let Some(l) = self.pick(rw, |l| l.rw) else {
            self.trace.push(format!("{op:?}: skipped, no rw layer"));
            return Ok(());
        };
        self.t += 1;
        let t = self.t;
        let id = self.layers[l].id.clone();
        let reference = self.layers[l].reference.clone();
        if let Some(why) = op.skip_reason(&reference, self.caps) {
            self.trace.push(format!("{id}: {op:?} skipped: {why}"));
            return Ok(());
        }
        let exdev_ok = self.caps.lower_dir_rename_exdev
            && matches!(op, FsOp::Rename { from, .. } if reference.join(from).is_dir());
        let done = self.h.with_mounted(&id, |view| match op.apply(view, t) {
            Ok(()) => Ok(true),
            Err(e) if exdev_ok && e.raw_os_error() == Some(libc::EXDEV) => Ok(false),
            Err(e) => Err(format!("{op:?} through the mount of {id}: {e}")),
        })?;
        if done {
            op.apply(&reference, t)
                .map_err(|e| format!("{op:?} on the reference: {e}"))?;
            self.trace.push(format!("{id}: {op:?}"));
        } else {
            op.prepare(&reference, t)
                .map_err(|e| format!("{op:?} (parents only) on the reference: {e}"))?;
            self.trace
                .push(format!("{id}: {op:?} refused with EXDEV (allowed)"));
        }
        self.check(l)
    }

    /// [`Op::Commit`]: the diff of a read-write layer applied to a new image layer on the same
    /// parent; the bytes written must match `diff_size` and a reference apply, and the new
    /// reference must reproduce the read-write layer's.
    fn commit(&mut self, rw: usize) -> Outcome {
        let Some(l) = self.pick(rw, |l| l.rw) else {
            self.trace.push("commit: skipped, no rw layer".to_string());
            return Ok(());
        };
        let parent = self.layers[l].parent;
        let pid = parent.map(|p| self.layers[p].id.clone());
        let src = self.layers[l].id.clone();
        let id = self.new_id();
        self.trace.push(format!(
            "commit {src} as image {id} on {}",
            name(pid.as_ref())
        ));
        let tar = self.h.diff_bytes(&src, pid.as_ref())?;
        let size = self.h.image_layer(&id, pid.as_ref(), &tar)?;
        let want = self
            .h
            .driver()
            .diff_size(&src, pid.as_ref())
            .map_err(|e| format!("diff_size {src}: {e}"))?;
        if size != want {
            return Err(format!(
                "apply_diff of diff({src}) returned {size} bytes, diff_size said {want}"
            ));
        }
        let (reference, applied) = self.reference_with(parent, &tar)?;
        if applied != size {
            return Err(format!(
                "apply_diff of diff({src}) returned {size} bytes, archive::apply_layer {applied}"
            ));
        }
        let src_ref = &self.layers[l].reference;
        let changed = archive::changes(src_ref, self.parent_ref(parent))
            .map_err(|e| format!("reference changes: {e}"))?;
        let dirs: Vec<&Path> = changed.iter().map(|c| c.path.as_path()).collect();
        super::compare_trees_for_diff(
            src_ref,
            &reference,
            &dirs,
            self.caps.diff_keeps_links_to_unchanged,
        )
        .map_err(|e| {
            format!("diff({src}) applied to the parent's reference does not reproduce {src}:\n{e}")
        })?;
        self.push_layer(id, parent, false, reference)
    }

    /// [`Op::GetNested`]: two gets return the same path; after one put the view still equals
    /// the reference; the last put is always made.
    fn get_nested(&mut self, layer: usize) -> Outcome {
        let Some(l) = self.pick(layer, |_| true) else {
            return Ok(());
        };
        let id = self.layers[l].id.clone();
        self.trace.push(format!("get {id} twice, put, check, put"));
        let d = self.h.driver();
        let p1 = d
            .get(&id, &MountOpts::default())
            .map_err(|e| format!("get {id}: {e}"))?;
        let p2 = d
            .get(&id, &MountOpts::default())
            .map_err(|e| format!("second get {id}: {e}"));
        let res = (|| {
            let p2 = p2?;
            if p1 != p2 {
                return Err(format!(
                    "nested get {id} returned {} then {}",
                    p1.display(),
                    p2.display()
                ));
            }
            d.put(&id).map_err(|e| format!("put {id}: {e}"))?;
            super::compare_trees(&self.layers[l].reference, &p1)
                .map_err(|e| format!("after one of two puts, {id} differs:\n{e}"))
        })();
        let put = d.put(&id).map_err(|e| format!("last put {id}: {e}"));
        res?;
        put
    }

    /// [`Op::Remove`]: refused with `HasChildren` while the layer has live children, else the
    /// layer is gone from the driver and the model.
    fn remove(&mut self, layer: usize) -> Outcome {
        let Some(l) = self.pick(layer, |_| true) else {
            return Ok(());
        };
        let id = self.layers[l].id.clone();
        let has_children = self.layers.iter().any(|c| c.alive && c.parent == Some(l));
        self.trace.push(format!(
            "remove {id}{}",
            if has_children { " (has children)" } else { "" }
        ));
        match (self.h.driver().remove(&id), has_children) {
            (Err(Error::HasChildren { .. }), true) => {}
            (Ok(()), false) => {
                self.layers[l].alive = false;
                if self.h.driver().exists(&id) {
                    return Err(format!("{id} exists after remove"));
                }
            }
            (r, _) => {
                return Err(format!(
                    "remove {id}: expected {}, found {r:?}",
                    if has_children {
                        "HasChildren"
                    } else {
                        "success"
                    }
                ));
            }
        }
        self.check_list()
    }

    fn check_list(&self) -> Outcome {
        let mut want: Vec<(String, Option<String>, bool)> = self
            .layers
            .iter()
            .filter(|l| l.alive)
            .map(|l| {
                (
                    l.id.as_str().to_string(),
                    l.parent.map(|p| self.layers[p].id.as_str().to_string()),
                    l.rw,
                )
            })
            .collect();
        want.sort();
        let got: Vec<(String, Option<String>, bool)> = self
            .h
            .driver()
            .list()
            .map_err(|e| format!("list: {e}"))?
            .into_iter()
            .map(|i| {
                (
                    i.id.as_str().to_string(),
                    i.parent.map(|p| p.as_str().to_string()),
                    i.read_write,
                )
            })
            .collect();
        if got != want {
            return Err(format!("list: expected {want:?}, found {got:?}"));
        }
        Ok(())
    }

    /// Every check for layer `l` (see [`model`]).
    fn check(&self, l: usize) -> Outcome {
        let layer = &self.layers[l];
        let id = &layer.id;
        let pid = layer.parent.map(|p| self.layers[p].id.clone());
        self.h.expect_view(id, &layer.reference)?;
        self.check_list()?;
        check_changes_and_diff(
            &self.h,
            self.caps,
            id,
            pid.as_ref(),
            &layer.reference,
            self.parent_ref(layer.parent),
        )
    }
}

/// Checks `changes`, `diff` and `diff_size` of layer `id` against its reference tree and its
/// parent's (see [`model`]).
pub(crate) fn check_changes_and_diff(
    h: &Harness,
    caps: &Capabilities,
    id: &LayerId,
    parent: Option<&LayerId>,
    reference: &Path,
    parent_ref: Option<&Path>,
) -> Outcome {
    let d = h.driver();
    let want =
        archive::changes(reference, parent_ref).map_err(|e| format!("reference changes: {e}"))?;
    let got = d
        .changes(id, parent)
        .map_err(|e| format!("changes {id}: {e}"))?;
    let show = |v: &[graphdriver::Change]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if caps.exact_changes {
        if got != want {
            return Err(format!(
                "changes {id}: expected [{}], found [{}]",
                show(&want),
                show(&got)
            ));
        }
    } else {
        let missing: Vec<_> = want.iter().filter(|c| !got.contains(c)).cloned().collect();
        let bad: Vec<_> = got
            .iter()
            .filter(|c| !want.contains(c) && c.kind != ChangeKind::Modify)
            .cloned()
            .collect();
        if !missing.is_empty() || !bad.is_empty() {
            return Err(format!(
                "changes {id}: missing [{}], unexpected [{}] (all: [{}])",
                show(&missing),
                show(&bad),
                show(&got)
            ));
        }
    }
    let tar = h.diff_bytes(id, parent)?;
    let rebuilt = match parent_ref {
        Some(p) => {
            let dst = h.scratch_path("roundtrip");
            copy_tree(p, &dst)?;
            dst
        }
        None => h.scratch_dir("roundtrip")?,
    };
    let applied = archive::apply_layer(&rebuilt, &tar[..], &archive::ApplyOptions::default())
        .map_err(|e| format!("applying diff({id}) to a copy of the parent's reference: {e}"))?;
    let dirs: Vec<&Path> = want
        .iter()
        .filter(|c| c.kind != ChangeKind::Delete)
        .map(|c| c.path.as_path())
        .collect();
    super::compare_trees_for_diff(
        reference,
        &rebuilt,
        &dirs,
        caps.diff_keeps_links_to_unchanged,
    )
    .map_err(|e| {
        format!("diff({id}) applied to the parent's reference does not reproduce {id}:\n{e}")
    })?;
    let size = d
        .diff_size(id, parent)
        .map_err(|e| format!("diff_size {id}: {e}"))?;
    if size != applied {
        return Err(format!(
            "diff_size {id} is {size}, applying its diff wrote {applied} bytes"
        ));
    }
    if caps.exact_changes {
        let ref_size =
            archive::changes_size(reference, &want).map_err(|e| format!("changes_size: {e}"))?;
        if size != ref_size {
            return Err(format!(
                "diff_size {id} is {size}, the reference changes hold {ref_size} bytes"
            ));
        }
    }
    let _ = fs::remove_dir_all(&rebuilt);
    Ok(())
}

fn name(id: Option<&LayerId>) -> String {
    id.map_or_else(|| "nothing".to_string(), |i| i.to_string())
}

/// Reads a stream to the end.
pub(crate) fn read_all(mut r: impl std::io::Read) -> Outcome<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)
        .map_err(|e| format!("read tar stream: {e}"))?;
    Ok(v)
}
