//! vfs-specific behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use archive::compare::{CompareOptions, assert_same_tree};
use common::{id, tar_of, write_files};
use graphdriver::{DiffDriver, Error, MountOpts, ProtoDriver};

#[test]
fn layers_are_full_independent_copies() {
    let t = tempfile::tempdir().unwrap();
    let d =
        drivers::vfs::Vfs::driver(&t.path().join("vfs"), graphdriver::Durability::None).unwrap();
    let src = t.path().join("src");
    write_files(&src, &[("a", "1"), ("dir/b", "2")]);
    d.create(&id("base"), None).unwrap();
    assert_eq!(
        fs::metadata(d.inner().root(&id("base"))).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        d.apply_diff(&id("base"), None, &mut &tar_of(&src)[..])
            .unwrap(),
        2
    );
    d.create_read_write(&id("c"), Some(&id("base"))).unwrap();
    let p = d.get(&id("c"), &MountOpts::default()).unwrap();
    let p2 = d.get(&id("c"), &MountOpts::default()).unwrap();
    assert_eq!(p, p2);
    assert_same_tree(&d.inner().root(&id("base")), &p, &CompareOptions::default()).unwrap();
    let ino = |p: &std::path::Path| fs::metadata(p).unwrap().ino();
    assert_ne!(
        ino(&p.join("a")),
        ino(&d.inner().root(&id("base")).join("a"))
    );
    fs::write(p.join("a"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(d.inner().root(&id("base")).join("a")).unwrap(),
        "1"
    );
    assert!(matches!(d.remove(&id("c")), Err(Error::InUse { .. })));
    assert!(matches!(
        d.remove(&id("base")),
        Err(Error::HasChildren { .. })
    ));
    d.put(&id("c")).unwrap();
    d.put(&id("c")).unwrap();
    let changes = d.changes(&id("c"), Some(&id("base"))).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    d.remove(&id("c")).unwrap();
    d.remove(&id("base")).unwrap();
    assert!(d.list().unwrap().is_empty());
    assert_eq!(d.status()[0].0, "Layers");
}
