//! Property tests: diff → export → apply reproduces the new tree, and tar_tree → apply onto an
//! empty directory reproduces a tree, compared with `archive::compare` (mtimes included).
//!
//! Trees are generated from a seed: files (with hardlinks), directories, symlinks, modes with
//! setuid/setgid/sticky, owners, `user.*` xattrs. The new tree is the old one after random
//! mutations: deletions of files and whole directories, additions, content rewrites, chmod,
//! chown, symlink retargets and type changes file ⇄ dir ⇄ symlink.
//!
//! Mutations stay within what a change list can express (see `archive::changes`): a content
//! rewrite also moves the mtime, xattrs change only together with content (a directory replaced
//! by a directory keeps its xattrs: a layer cannot remove an xattr from a directory that stays),
//! and new hardlink names only join inodes created in the new tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use archive::compare::{CompareOptions, assert_same_tree};
use archive::{
    ApplyOptions, TarOptions, apply_layer, changes, changes_size, export_changes, tar_tree,
};
use filetime::FileTime;
use proptest::prelude::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

#[derive(Clone, Debug)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Clone, Debug)]
enum Node {
    Dir(Meta),
    File(u32),
    Sym {
        target: String,
        uid: u32,
        mtime: i64,
    },
}

#[derive(Clone, Debug)]
struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
    files: BTreeMap<u32, (Vec<u8>, Meta)>,
    next_id: u32,
}

const NAMES: &[&str] = &["a", "b", "c", "d.e", "f"];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o1777, 0o2775, 0o555];
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o444];

fn meta(rng: &mut Rng, modes: &[u32]) -> Meta {
    let mut xattrs = Vec::new();
    if rng.below(3) == 0 {
        // Any byte, '\n' and '=' included: PAX records are read by their length prefix.
        let value = if rng.below(4) == 0 {
            b"x\n=y\n".to_vec()
        } else {
            vec![rng.below(256) as u8; 1 + rng.below(5)]
        };
        xattrs.push((format!("user.k{}", rng.below(3)), value));
    }
    Meta {
        mode: rng.pick(modes),
        uid: rng.pick(&[0, 1, 1000, 65534]),
        gid: rng.pick(&[0, 2, 100]),
        mtime: 1_500_000_000 + rng.below(1_000_000) as i64,
        xattrs,
    }
}

impl Tree {
    fn dirs(&self) -> Vec<PathBuf> {
        let mut d = vec![PathBuf::new()];
        d.extend(
            self.nodes
                .iter()
                .filter(|(_, n)| matches!(n, Node::Dir(_)))
                .map(|(p, _)| p.clone()),
        );
        d
    }

    fn new_file(&mut self, rng: &mut Rng) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let len = rng.pick(&[0usize, 1, 100, 4096, 70_000]);
        let content = (0..len).map(|i| (i as u64 ^ rng.0) as u8).collect();
        self.files.insert(id, (content, meta(rng, FILE_MODES)));
        id
    }

    /// Adds one random entry at a free name; `link_ids` are the inodes new names may join.
    fn add(&mut self, rng: &mut Rng, link_ids: &BTreeSet<u32>) -> Option<u32> {
        let parent = rng.pick(&self.dirs());
        let p = parent.join(rng.pick(NAMES));
        if self.nodes.contains_key(&p) {
            return None;
        }
        self.put(rng, p, link_ids)
    }

    fn put(&mut self, rng: &mut Rng, p: PathBuf, link_ids: &BTreeSet<u32>) -> Option<u32> {
        match rng.below(10) {
            0..=2 => {
                let m = meta(rng, DIR_MODES);
                self.nodes.insert(p, Node::Dir(m));
                None
            }
            3 if !link_ids.is_empty() => {
                let ids: Vec<u32> = link_ids.iter().copied().collect();
                let id = rng.pick(&ids);
                self.nodes.insert(p, Node::File(id));
                None
            }
            4 => {
                let target =
                    rng.pick(&["a", "../b", "/etc/passwd", "d.e/f", "nowhere-long-target"]);
                let node = Node::Sym {
                    target: target.to_string(),
                    uid: rng.pick(&[0, 7]),
                    mtime: 1_400_000_000 + rng.below(1000) as i64,
                };
                self.nodes.insert(p, node);
                None
            }
            _ => {
                let id = self.new_file(rng);
                self.nodes.insert(p, Node::File(id));
                Some(id)
            }
        }
    }

    fn remove(&mut self, p: &Path) {
        let doomed: Vec<PathBuf> = self
            .nodes
            .keys()
            .filter(|k| k.starts_with(p))
            .cloned()
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    fn generate(rng: &mut Rng) -> Tree {
        let mut t = Tree {
            nodes: BTreeMap::new(),
            files: BTreeMap::new(),
            next_id: 0,
        };
        let mut ids = BTreeSet::new();
        for _ in 0..(4 + rng.below(14)) {
            if let Some(id) = t.add(rng, &ids) {
                ids.insert(id);
            }
        }
        t
    }

    fn mutate(&self, rng: &mut Rng) -> Tree {
        let mut t = self.clone();
        let mut fresh = BTreeSet::new();
        for _ in 0..(1 + rng.below(6)) {
            let paths: Vec<PathBuf> = t.nodes.keys().cloned().collect();
            let op = rng.below(7);
            if paths.is_empty() || op == 0 {
                if let Some(id) = t.add(rng, &fresh) {
                    fresh.insert(id);
                }
                continue;
            }
            let p = rng.pick(&paths);
            match (op, t.nodes[&p].clone()) {
                (1, _) => t.remove(&p),
                (2, Node::File(id)) => {
                    // Rewrite: new content, new mtime, maybe new xattrs.
                    let len = rng.pick(&[0usize, 5, 100, 5000]);
                    let seed = rng.next();
                    let (content, m) = t.files.get_mut(&id).unwrap();
                    *content = (0..len).map(|i| (i as u64 ^ seed) as u8 ^ 0x5a).collect();
                    m.mtime += 1 + rng.below(1000) as i64;
                    if rng.below(2) == 0 {
                        m.xattrs = vec![("user.rewritten".into(), b"yes".to_vec())];
                    }
                }
                (3, Node::File(id)) => {
                    let m = &mut t.files.get_mut(&id).unwrap().1;
                    m.mode = if m.mode == 0o4755 { 0o644 } else { 0o4755 };
                }
                (3, Node::Dir(mut m)) => {
                    m.mode = if m.mode == 0o755 { 0o1777 } else { 0o755 };
                    t.nodes.insert(p, Node::Dir(m));
                }
                (4, Node::File(id)) => {
                    let m = &mut t.files.get_mut(&id).unwrap().1;
                    m.uid += 1;
                    m.gid += 3;
                }
                (4, Node::Dir(mut m)) => {
                    m.uid = 4242;
                    t.nodes.insert(p, Node::Dir(m));
                }
                (5, Node::Sym { target, uid, mtime }) => {
                    let target = format!("{target}-x");
                    t.nodes.insert(p, Node::Sym { target, uid, mtime });
                }
                (_, old) => {
                    // Type change (or a fresh entry of any type) at `p`.
                    t.remove(&p);
                    loop {
                        if let Some(id) = t.put(rng, p.clone(), &fresh) {
                            fresh.insert(id);
                        }
                        let same = matches!(
                            (&old, &t.nodes[&p]),
                            (Node::Dir(_), Node::Dir(_)) | (Node::Sym { .. }, Node::Sym { .. })
                        );
                        if !same || rng.below(3) == 0 {
                            break;
                        }
                        t.remove(&p);
                    }
                    if matches!(t.nodes[&p], Node::Dir(_)) && rng.below(2) == 0 {
                        let id = t.new_file(rng);
                        fresh.insert(id);
                        t.nodes.insert(p.join("inside"), Node::File(id));
                    }
                }
            }
        }
        // A layer cannot remove an xattr from a directory that stays a directory (apply keeps
        // the existing directory): such directories keep their xattrs.
        for (p, n) in t.nodes.iter_mut() {
            if let (Node::Dir(nm), Some(Node::Dir(om))) = (n, self.nodes.get(p)) {
                nm.xattrs = om.xattrs.clone();
            }
        }
        t
    }

    fn materialize(&self, root: &Path) {
        fs::create_dir_all(root).unwrap();
        let mut first: BTreeMap<u32, PathBuf> = BTreeMap::new();
        for (p, n) in &self.nodes {
            let full = root.join(p);
            match n {
                Node::Dir(_) => fs::create_dir(&full).unwrap(),
                Node::File(id) => {
                    if let Some(f) = first.get(id) {
                        fs::hard_link(root.join(f), &full).unwrap();
                    } else {
                        let (content, m) = &self.files[id];
                        fs::write(&full, content).unwrap();
                        for (k, v) in &m.xattrs {
                            xattr::set(&full, k, v).unwrap();
                        }
                        std::os::unix::fs::lchown(&full, Some(m.uid), Some(m.gid)).unwrap();
                        fs::set_permissions(&full, fs::Permissions::from_mode(m.mode)).unwrap();
                        first.insert(*id, p.clone());
                    }
                }
                Node::Sym { target, uid, .. } => {
                    symlink(target, &full).unwrap();
                    std::os::unix::fs::lchown(&full, Some(*uid), Some(0)).unwrap();
                }
            }
        }
        // Directory metadata and every mtime last, children before parents.
        for (p, n) in self.nodes.iter().rev() {
            let full = root.join(p);
            let ns = 250_000_000;
            match n {
                Node::Dir(m) => {
                    for (k, v) in &m.xattrs {
                        xattr::set(&full, k, v).unwrap();
                    }
                    std::os::unix::fs::lchown(&full, Some(m.uid), Some(m.gid)).unwrap();
                    fs::set_permissions(&full, fs::Permissions::from_mode(m.mode)).unwrap();
                    filetime::set_file_mtime(&full, FileTime::from_unix_time(m.mtime, ns)).unwrap();
                }
                Node::File(id) => {
                    let mt = FileTime::from_unix_time(self.files[id].1.mtime, ns);
                    filetime::set_file_mtime(&full, mt).unwrap();
                }
                Node::Sym { mtime, .. } => {
                    let mt = FileTime::from_unix_time(*mtime, ns);
                    filetime::set_symlink_file_times(&full, mt, mt).unwrap();
                }
            }
        }
    }
}

fn compare_opts() -> CompareOptions {
    CompareOptions {
        root_metadata: false,
        ..CompareOptions::default()
    }
}

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "needs root (chown) and CI=true forbids skipping"
    );
    eprintln!("skipping: needs root for owners");
    test_support::record_skip("needs root for owners");
    false
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn diff_export_apply_reproduces_new(seed in any::<u64>()) {
        if !root_or_skip() {
            return Ok(());
        }
        let mut rng = Rng(seed | 1);
        let old = Tree::generate(&mut rng);
        let new = old.mutate(&mut rng);
        let t = tempfile::tempdir().unwrap();
        let (o, n, target) = (t.path().join("old"), t.path().join("new"), t.path().join("target"));
        old.materialize(&o);
        new.materialize(&n);
        old.materialize(&target);

        let ch = changes(&n, Some(&o)).unwrap();
        let size = changes_size(&n, &ch).unwrap();
        let tar = export_changes(&n, &ch, &TarOptions::default()).unwrap();
        let applied = apply_layer(&target, tar, &ApplyOptions::default()).unwrap();
        prop_assert_eq!(applied, size, "apply size vs changes_size for {:?}", ch);
        if let Err(d) = assert_same_tree(&n, &target, &compare_opts()) {
            prop_assert!(false, "changes {:?}\ndifferences:\n{}", ch, d);
        }
        // And the applied tree has no changes left against the new one.
        let rest = changes(&target, Some(&n)).unwrap();
        prop_assert!(rest.is_empty(), "left over: {:?}", rest);
    }

    #[test]
    fn tar_tree_apply_onto_empty_reproduces_tree(seed in any::<u64>()) {
        if !root_or_skip() {
            return Ok(());
        }
        let mut rng = Rng(seed | 1);
        let tree = Tree::generate(&mut rng).mutate(&mut rng);
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        tree.materialize(&src);
        fs::create_dir(&dst).unwrap();
        let tar = tar_tree(&src, &TarOptions::default()).unwrap();
        apply_layer(&dst, tar, &ApplyOptions::default()).unwrap();
        if let Err(d) = assert_same_tree(&src, &dst, &compare_opts()) {
            prop_assert!(false, "differences:\n{}", d);
        }
    }
}
