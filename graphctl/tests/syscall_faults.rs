//! Fault injection at chosen system calls: every store-changing `graphctl` command is run under
//! `strace --inject`, killed (SIGKILL) or failed (an errno) at the Nth call of one system call
//! (renames, unlinks, mounts, writes, fsyncs, flocks, forks, ...), in the command's own process
//! or in the confined child it forks; then the store is checked against an independent oracle:
//!
//! * `ls` works, and every layer it lists holds exactly the files the test put there (read
//!   with `std::fs` through a read-only view, compared with the generator's bytes); a layer the
//!   command was changing holds the old or the new content, nothing in between;
//! * `cleanup` leaves no mount under the store and every mount count at zero;
//! * the interrupted command, run again, succeeds and gives the layer it should (an interrupted
//!   `import` re-run equals an uninterrupted one), and `rm` of every layer works.
//!
//! The call numbers are chosen from a traced dry run of the same command (per process, as
//! strace counts them): in CI a kill at the first, the middle and the last call of each system
//! call and an error at the middle one. With `GRAPHCTL_FAULTS=long` every call up to 64 per
//! system call gets both (nightly or by hand: `GRAPHCTL_FAULTS=long cargo nextest run -p
//! graphctl --test syscall_faults`).
//!
//! Root only (the overlay driver, read-only views, `mount`); always run under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use drivers as _;

#[allow(unused_macros)]
#[macro_use]
#[path = "macros.rs"]
mod macros;
#[allow(dead_code)]
#[path = "util.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use util::{
    Store, Tree, layer_tar, ls_ids, mounts_under, read_tree, sample_image, skip_root_test,
    under_strace,
};

/// The system calls a kill or an error is injected into. Calls a command never makes are
/// skipped (the dry run counts them).
const SYSCALLS: &[&str] = &[
    "openat",
    "mkdirat",
    "mkdir",
    "renameat2",
    "renameat",
    "rename",
    "linkat",
    "unlinkat",
    "write",
    "fsync",
    "syncfs",
    "mount",
    "umount2",
    "flock",
    "clone3",
    "clone",
    "fchownat",
    "utimensat",
];

/// What is injected at the chosen call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The process making the call is killed before the call runs.
    Kill,
    /// The call fails with EIO (ENOSPC for writes) without running.
    Error,
}

impl Fault {
    fn strace_action(self, syscall: &str) -> &'static str {
        match self {
            Fault::Kill => "signal=KILL",
            Fault::Error if syscall == "write" => "error=ENOSPC",
            Fault::Error => "error=EIO",
        }
    }
}

fn data(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i}-")
        .bytes()
        .cycle()
        .take(100 + i * 13 % 700)
        .collect()
}

fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    layer_tar(&entries)
}

/// The layers every scenario starts from, and the tars the commands apply.
struct World {
    base: Vec<(String, Vec<u8>)>,
    /// Applied as a new layer `new` on `base`.
    layer: Vec<(String, Vec<u8>)>,
    /// Applied into the read-write layer `rw` (on `base`) by the setup.
    rw_before: Vec<(String, Vec<u8>)>,
    /// Applied into `rw` by the command under test: replaces and deletes files of both.
    rw_after: Vec<u8>,
    dir: PathBuf,
}

impl World {
    fn new(dir: &Path) -> World {
        let base: Vec<_> = (0..40)
            .map(|i| (format!("base/d{}/f{i}", i % 4), data("base", i)))
            .collect();
        let layer: Vec<_> = (0..60)
            .map(|i| (format!("new/d{}/f{i}", i % 5), data("new", i)))
            .collect();
        let rw_before: Vec<_> = (0..30)
            .map(|i| (format!("rw/f{i}"), data("rw1", i)))
            .collect();
        // Overwrites rw/f0..9, deletes rw/f10 and base/d0/f0, adds rw2/*.
        let mut after: Vec<(String, Vec<u8>)> = (0..10)
            .map(|i| (format!("rw/f{i}"), data("rw2", i)))
            .collect();
        after.push(("rw/.wh.f10".into(), Vec::new()));
        after.push(("base/d0/.wh.f0".into(), Vec::new()));
        after.extend((0..20).map(|i| (format!("rw2/g{i}"), data("rw2g", i))));
        let w = World {
            rw_after: tar_of(&after),
            base,
            layer,
            rw_before,
            dir: dir.to_path_buf(),
        };
        std::fs::write(w.path("base.tar"), tar_of(&w.base)).unwrap();
        std::fs::write(w.path("layer.tar"), tar_of(&w.layer)).unwrap();
        std::fs::write(w.path("rw-before.tar"), tar_of(&w.rw_before)).unwrap();
        std::fs::write(w.path("rw-after.tar"), &w.rw_after).unwrap();
        w
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    fn tree(parts: &[&Vec<(String, Vec<u8>)>]) -> Tree {
        parts.iter().flat_map(|p| p.iter().cloned()).collect()
    }

    fn base_tree(&self) -> Tree {
        Self::tree(&[&self.base])
    }

    fn new_tree(&self) -> Tree {
        Self::tree(&[&self.base, &self.layer])
    }

    fn rw_tree_before(&self) -> Tree {
        Self::tree(&[&self.base, &self.rw_before])
    }

    fn rw_tree_after(&self) -> Tree {
        let mut t = self.rw_tree_before();
        for i in 0..10 {
            t.insert(format!("rw/f{i}"), data("rw2", i));
        }
        t.remove("rw/f10");
        t.remove("base/d0/f0");
        for i in 0..20 {
            t.insert(format!("rw2/g{i}"), data("rw2g", i));
        }
        t
    }
}

/// One store-changing command and what may be true after it was interrupted.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// `apply --parent base new layer.tar`: `new` absent or whole.
    ApplyNew,
    /// `apply rw rw-after.tar` into a used read-write layer: old or new content.
    ApplyIntoReadWrite,
    /// `create --rw --parent base ctr`: `ctr` absent or equal to base.
    CreateReadWrite,
    /// `rm new`: `new` whole or gone.
    Remove,
    /// `mount rw`: mounted with one durable reference, or not at all.
    Mount,
    /// `unmount rw` (mounted once): still mounted once, or not at all.
    Unmount,
    /// `diff --parent base new -o out`: nothing of it blocks `rm`.
    Diff,
    /// `import` of the sample image: re-run equals an uninterrupted import.
    Import,
}

/// Runs `graphctl ARGS` on `s`, under strace with `inject` if given; returns its output.
fn graphctl(s: &Store, args: &[String], inject: Option<String>) -> Output {
    let tc = s.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cmd = match inject {
        None => tc.cmd,
        Some(expr) => {
            let call = expr.split(':').next().unwrap_or_default();
            let trace = format!("trace={call}");
            let inject = format!("inject={expr}");
            under_strace(
                &tc.cmd,
                &["-f", "-qq", "-o", "/dev/null", "-e", &trace, "-e", &inject],
            )
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.output().unwrap()
}

fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Creates the read-write layer `rw` on `base` holding `rw-before.tar`.
fn setup_rw(s: &Store, w: &World) {
    s.ok(&["create", "--rw", "--parent", "base", "rw"]);
    s.ok(&["apply", "rw", &w.path("rw-before.tar")]);
}

impl Scenario {
    /// Makes the store the command starts from.
    fn setup(self, s: &Store, w: &World) {
        s.ok(&["apply", "base", &w.path("base.tar")]);
        match self {
            Scenario::Remove | Scenario::Diff => {
                s.ok(&["apply", "--parent", "base", "new", &w.path("layer.tar")]);
            }
            Scenario::ApplyIntoReadWrite | Scenario::Mount | Scenario::Unmount => {
                setup_rw(s, w);
                if let Scenario::Unmount = self {
                    s.ok(&["mount", "rw"]);
                }
            }
            _ => {}
        }
    }

    fn command(self, w: &World) -> Vec<String> {
        match self {
            Scenario::ApplyNew => strs(&["apply", "--parent", "base", "new", &w.path("layer.tar")]),
            Scenario::ApplyIntoReadWrite => strs(&["apply", "rw", &w.path("rw-after.tar")]),
            Scenario::CreateReadWrite => strs(&["create", "--rw", "--parent", "base", "ctr"]),
            Scenario::Remove => strs(&["rm", "new"]),
            Scenario::Mount => strs(&["mount", "rw"]),
            Scenario::Unmount => strs(&["unmount", "rw"]),
            Scenario::Diff => strs(&["diff", "--parent", "base", "new", "-o", &w.path("out.tar")]),
            Scenario::Import => strs(&["import", sample_image().to_str().unwrap()]),
        }
    }
}

/// Layer `id`'s files, read through a mount of it (a read-only view for a committed layer).
fn layer_tree(s: &Store, id: &str) -> Tree {
    let path = s.ok(&["mount", id]);
    let tree = read_tree(Path::new(path.trim()));
    s.ok(&["unmount", id]);
    tree
}

fn mount_count(s: &Store, id: &str) -> u64 {
    let out = s.ok(&["--json", "info", id]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["mount_count"].as_u64().unwrap()
}

/// Describes how `got` differs from `want` (first few paths), or `None` if equal.
fn tree_diff(got: &Tree, want: &Tree) -> Option<String> {
    let mut d = Vec::new();
    for (p, v) in want {
        match got.get(p) {
            None => d.push(format!("missing {p}")),
            Some(g) if g != v => d.push(format!("{p}: {} bytes, want {}", g.len(), v.len())),
            _ => {}
        }
    }
    d.extend(
        got.keys()
            .filter(|p| !want.contains_key(*p))
            .map(|p| format!("extra {p}")),
    );
    (!d.is_empty()).then(|| format!("{} differences, e.g. {:?}", d.len(), &d[..d.len().min(4)]))
}

/// The oracle: what must hold after the command was interrupted. `what` names the run.
fn check_after(s: &Store, w: &World, sc: Scenario, reference: &BTreeMap<String, Tree>, what: &str) {
    let listed = ls_ids(s);
    assert!(listed.contains("base"), "{what}: base gone: {listed:?}");
    let base = layer_tree(s, "base");
    assert_eq!(
        tree_diff(&base, &w.base_tree()),
        None,
        "{what}: base changed"
    );
    match sc {
        Scenario::ApplyNew | Scenario::Remove | Scenario::Diff => {
            if listed.contains("new") {
                let t = layer_tree(s, "new");
                assert_eq!(
                    tree_diff(&t, &w.new_tree()),
                    None,
                    "{what}: new is listed but not whole"
                );
            } else {
                assert!(
                    !matches!(sc, Scenario::Diff),
                    "{what}: diff removed its layer"
                );
            }
        }
        Scenario::ApplyIntoReadWrite | Scenario::Mount | Scenario::Unmount => {
            assert!(listed.contains("rw"), "{what}: rw gone");
            let t = layer_tree(s, "rw");
            let before = tree_diff(&t, &w.rw_tree_before());
            let after = tree_diff(&t, &w.rw_tree_after());
            assert!(
                before.is_none() || (matches!(sc, Scenario::ApplyIntoReadWrite) && after.is_none()),
                "{what}: rw is neither before nor after the apply: {before:?} / {after:?}"
            );
        }
        Scenario::CreateReadWrite => {
            if listed.contains("ctr") {
                let t = layer_tree(s, "ctr");
                assert_eq!(
                    tree_diff(&t, &w.base_tree()),
                    None,
                    "{what}: ctr is not base"
                );
            }
        }
        Scenario::Import => {
            for id in listed.iter().filter(|id| *id != "base") {
                let want = reference
                    .get(id)
                    .unwrap_or_else(|| panic!("{what}: unknown layer {id} listed"));
                let t = layer_tree(s, id);
                assert_eq!(
                    tree_diff(&t, want),
                    None,
                    "{what}: image layer {id} not whole"
                );
            }
        }
    }
    // Mount references: a mount is held by a durable record or not at all.
    if matches!(sc, Scenario::Mount | Scenario::Unmount) {
        let n = mount_count(s, "rw");
        assert!(n <= 1, "{what}: rw mounted {n} times");
        for _ in 0..n {
            s.ok(&["unmount", "rw"]);
        }
    }
    // Nothing the command took stays: no reference blocks rm, cleanup leaves no mount.
    for id in &listed {
        assert_eq!(mount_count(s, id), 0, "{what}: {id} still has references");
    }
    s.ok(&["cleanup"]);
    let left = mounts_under(&s.root);
    assert!(
        left.is_empty(),
        "{what}: mounts left after cleanup: {left:?}"
    );
    let out = s.dir.path().join("out.tar");
    // `diff -o` removes a partial output only if it created it; a kill may leave one.
    let _ = std::fs::remove_file(&out);
    // The command runs again to completion and gives the right layers.
    let has_new = listed.contains("new");
    match sc {
        Scenario::ApplyNew if has_new => {
            s.ok(&["rm", "new"]);
        }
        Scenario::Remove if !has_new => {
            s.ok(&["apply", "--parent", "base", "new", &w.path("layer.tar")]);
        }
        Scenario::CreateReadWrite if listed.contains("ctr") => {
            s.ok(&["rm", "ctr"]);
        }
        Scenario::Unmount => {
            s.ok(&["mount", "rw"]);
        }
        // It landed whole: start again from the state before.
        Scenario::ApplyIntoReadWrite if layer_tree(s, "rw") != w.rw_tree_before() => {
            s.ok(&["rm", "rw"]);
            setup_rw(s, w);
        }
        _ => {}
    }
    let again = graphctl(s, &sc.command(w), None);
    assert!(
        again.status.success(),
        "{what}: the re-run failed: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    match sc {
        Scenario::ApplyNew => assert_eq!(tree_diff(&layer_tree(s, "new"), &w.new_tree()), None),
        Scenario::ApplyIntoReadWrite => {
            assert_eq!(
                tree_diff(&layer_tree(s, "rw"), &w.rw_tree_after()),
                None,
                "{what}"
            )
        }
        Scenario::Import => {
            for (id, want) in reference {
                assert_eq!(
                    tree_diff(&layer_tree(s, id), want),
                    None,
                    "{what}: re-run {id}"
                );
            }
        }
        Scenario::Mount => {
            s.ok(&["unmount", "rw"]);
        }
        _ => {}
    }
    // Everything can be removed, children first.
    let mut left = ls_ids(s);
    while !left.is_empty() {
        let map = s.ok(&["ls"]);
        let parents: BTreeSet<String> = map
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|p| *p != "-")
            .map(str::to_string)
            .collect();
        let leaf = left
            .iter()
            .find(|id| !parents.contains(*id))
            .cloned()
            .unwrap();
        s.ok(&["rm", &leaf]);
        left = ls_ids(s);
    }
}

/// Per system call, the most calls any one process of the command made (strace counts per
/// process), from a traced run of the command on a store set up the same way.
fn call_counts(driver: &'static str, sc: Scenario) -> BTreeMap<String, usize> {
    let s = Store::new(driver);
    let w = World::new(s.dir.path());
    sc.setup(&s, &w);
    let log = s.dir.path().join("strace.log");
    let mut tc = s.cmd(
        &sc.command(&w)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let trace = format!("trace={}", SYSCALLS.join(","));
    tc.cmd = under_strace(
        &tc.cmd,
        &[
            "-f".as_ref(),
            "-qq".as_ref(),
            "-e".as_ref(),
            trace.as_ref(),
            "-o".as_ref(),
            log.as_os_str(),
        ],
    );
    tc.ok();
    let mut per: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let mut it = line.split_whitespace();
        let (Some(pid), Some(call)) = (it.next(), it.next()) else {
            continue;
        };
        let name = call.split('(').next().unwrap_or("");
        if SYSCALLS.contains(&name) {
            *per.entry((pid.to_string(), name.to_string())).or_default() += 1;
        }
    }
    let mut max = BTreeMap::new();
    for ((_, name), n) in per {
        let e = max.entry(name).or_insert(0);
        *e = (*e).max(n);
    }
    max
}

/// The call numbers to hit with `fault` for a system call made up to `n` times by one process:
/// in CI the first, middle and last for a kill and the middle for an error; in the long mode
/// every call up to 64.
fn points(n: usize, fault: Fault, long: bool) -> Vec<usize> {
    let mut p: Vec<usize> = if long {
        (1..=n.min(64)).collect()
    } else if fault == Fault::Kill {
        vec![1, n.div_ceil(2), n]
    } else {
        vec![n.div_ceil(2)]
    };
    p.dedup();
    p
}

/// The uninterrupted import, as the reference for an interrupted one: layer id → files.
fn reference_import(driver: &'static str) -> BTreeMap<String, Tree> {
    let s = Store::new(driver);
    s.ok(&["import", sample_image().to_str().unwrap()]);
    ls_ids(&s)
        .iter()
        .map(|id| (id.clone(), layer_tree(&s, id)))
        .collect()
}

fn inject_everywhere(driver: &'static str, sc: Scenario) {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    if !test_support::tool_or_skip("strace", "strace") {
        return;
    }
    let long = std::env::var("GRAPHCTL_FAULTS").as_deref() == Ok("long");
    let counts = call_counts(driver, sc);
    let reference = match sc {
        Scenario::Import => reference_import(driver),
        _ => BTreeMap::new(),
    };
    let faults: &[Fault] = &[Fault::Kill, Fault::Error];
    let mut runs = 0;
    let mut interrupted = 0;
    for (call, &n) in &counts {
        for &fault in faults {
            for at in points(n, fault, long) {
                let what = format!("{driver} {sc:?}, {fault:?} at {call} #{at} of {n}");
                let s = Store::new(driver);
                let w = World::new(s.dir.path());
                sc.setup(&s, &w);
                let expr = format!("{call}:{}:when={at}", fault.strace_action(call));
                let out = graphctl(&s, &sc.command(&w), Some(expr));
                runs += 1;
                if !out.status.success() {
                    interrupted += 1;
                }
                let err = String::from_utf8_lossy(&out.stderr);
                eprintln!(
                    "{what}: {} {}",
                    out.status,
                    err.lines().last().unwrap_or("")
                );
                check_after(&s, &w, sc, &reference, &what);
            }
        }
    }
    eprintln!(
        "{driver} {sc:?}: {runs} runs with a fault injected ({interrupted} made the command \
         fail or die), system calls: {counts:?}"
    );
    assert!(
        interrupted > 0,
        "{driver} {sc:?}: no injected fault had any effect"
    );
}

macro_rules! fault_tests {
    ($($name:ident: $sc:expr;)*) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn vfs() {
                    inject_everywhere("vfs", $sc);
                }
                #[test]
                fn overlay() {
                    inject_everywhere("overlay", $sc);
                }
            }
        )*
    };
}

fault_tests! {
    apply_new: Scenario::ApplyNew;
    apply_into_read_write: Scenario::ApplyIntoReadWrite;
    create_read_write: Scenario::CreateReadWrite;
    remove: Scenario::Remove;
    mount: Scenario::Mount;
    unmount: Scenario::Unmount;
    diff: Scenario::Diff;
    import: Scenario::Import;
}
