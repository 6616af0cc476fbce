//! Differential test: the same random sequence of layer operations on vfs (the oracle) and on
//! overlay gives equal trees for every layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use archive::compare::{CompareOptions, assert_same_tree};
use common::{id, root_or_skip, tar_of};
use graphdriver::{Driver, LayerId, MountOpts};
use proptest::prelude::*;

const NAMES: &[&str] = &["a", "b", "d/c", "d/e", "d/f/g"];

/// One step: an image layer from a tar, or a read-write layer written through its mount.
/// Each maps a name index to `Some(content)` (write) or `None` (delete / whiteout).
#[derive(Debug, Clone)]
enum Step {
    Image(BTreeMap<usize, Option<u8>>),
    ReadWrite(BTreeMap<usize, Option<u8>>),
}

fn step() -> impl Strategy<Value = Step> {
    let edits = prop::collection::btree_map(0..NAMES.len(), prop::option::of(0u8..4), 1..4);
    prop_oneof![
        edits.clone().prop_map(Step::Image),
        edits.prop_map(Step::ReadWrite),
    ]
}

fn content(c: u8) -> Vec<u8> {
    // Same-size contents for different values: the racy case changes must still see.
    vec![b'a' + c; 8]
}

fn set_mtime(path: &Path) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(1_500_000_000)))
        .unwrap();
}

/// The tar of one image step, built in `src`.
fn layer_tar(src: &Path, edits: &BTreeMap<usize, Option<u8>>) -> Vec<u8> {
    fs::create_dir_all(src).unwrap();
    for (i, c) in edits {
        let p = Path::new(NAMES[*i]);
        let (dir, base) = (src.join(p.parent().unwrap()), p.file_name().unwrap());
        fs::create_dir_all(&dir).unwrap();
        match c {
            Some(c) => {
                fs::write(dir.join(base), content(*c)).unwrap();
                set_mtime(&dir.join(base));
            }
            None => fs::write(dir.join(format!(".wh.{}", base.to_string_lossy())), "").unwrap(),
        }
    }
    tar_of(src)
}

fn write_through(d: &dyn Driver, l: &LayerId, edits: &BTreeMap<usize, Option<u8>>) {
    let root = d.get(l, &MountOpts::default()).unwrap();
    for (i, c) in edits {
        let p = root.join(NAMES[*i]);
        match c {
            Some(c) => {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, content(*c)).unwrap();
                set_mtime(&p);
            }
            None => match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("remove {}: {e}", p.display()),
            },
        }
    }
    d.put(l).unwrap();
}

fn run(steps: &[Step], tmp: &Path) {
    let vfs: Box<dyn Driver> = Box::new(
        drivers::vfs::Vfs::driver(&tmp.join("vfs"), graphdriver::Durability::None).unwrap(),
    );
    let ovl: Box<dyn Driver> = Box::new(
        drivers::overlay::Overlay::driver(&tmp.join("overlay"), Default::default()).unwrap(),
    );
    let ovl2: Box<dyn Driver> = Box::new(
        drivers::overlay2::Overlay2::driver(&tmp.join("overlay2"), Default::default()).unwrap(),
    );
    let mut parent: Option<LayerId> = None;
    for (n, s) in steps.iter().enumerate() {
        let l = id(&format!("l{n}"));
        match s {
            Step::Image(edits) => {
                let tar = layer_tar(&tmp.join(format!("src{n}")), edits);
                for d in [&vfs, &ovl, &ovl2] {
                    d.create(&l, parent.as_ref()).unwrap();
                    d.apply_diff(&l, parent.as_ref(), &mut &tar[..]).unwrap();
                }
            }
            Step::ReadWrite(edits) => {
                for d in [&vfs, &ovl, &ovl2] {
                    d.create_read_write(&l, parent.as_ref()).unwrap();
                    write_through(&**d, &l, edits);
                }
            }
        }
        parent = Some(l);
    }
    // Directory mtimes are left out: a deletion through a mount stamps the directory with the
    // time of the write, which differs between the two runs.
    let opts = CompareOptions {
        dir_mtimes: false,
        root_metadata: false,
        ..CompareOptions::default()
    };
    for n in 0..steps.len() {
        let l = id(&format!("l{n}"));
        let a = vfs.get(&l, &MountOpts::default()).unwrap();
        for other in [&ovl, &ovl2] {
            let b = other.get(&l, &MountOpts::default()).unwrap();
            let same = assert_same_tree(&a, &b, &opts);
            other.put(&l).unwrap();
            if let Err(e) = same {
                panic!("{}: layer l{n} differs after {steps:?}:\n{e}", other.name());
            }
        }
        vfs.put(&l).unwrap();
        // overlay2's native changes (from diff/ alone) agree with vfs's tree comparison.
        let p = n.checked_sub(1).map(|p| id(&format!("l{p}")));
        let want = vfs.changes(&l, p.as_ref()).unwrap();
        let got = ovl2.changes(&l, p.as_ref()).unwrap();
        assert_eq!(got, want, "overlay2 changes of l{n} after {steps:?}");
    }
    ovl.cleanup().unwrap();
    ovl2.cleanup().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn vfs_and_overlays_agree(steps in prop::collection::vec(step(), 1..5)) {
        if root_or_skip("vfs_and_overlays_agree") {
            let t = tempfile::tempdir().unwrap();
            run(&steps, t.path());
        }
    }
}
