//! The point of the driver: where the filesystem can clone (XFS with reflink, btrfs), a child
//! layer's files share their parent's extents (FIEMAP reports them `SHARED`); elsewhere (ext4,
//! tmpfs) init refuses, naming FICLONE, and with `copy_fallback = true` the driver copies the
//! bytes and says so in its status. CI runs this on each
//! filesystem of its matrix with `GRAPHDRIVER_EXPECT_REFLINK` set to `1` or `0`; without it the
//! test checks only that whatever the driver reports as cloned really shares its extents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;

use graphdriver::{DriverOptions, LayerId, MountOpts};

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const EXTENTS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS],
}

/// The extents of `path` as `(physical, flags)`; none where the filesystem has no FIEMAP
/// (tmpfs: `EOPNOTSUPP`), which shares nothing either.
fn extents(path: &Path) -> Vec<(u64, u32)> {
    let f = std::fs::File::open(path).unwrap();
    let mut m = Fiemap {
        start: 0,
        length: u64::MAX,
        flags: FIEMAP_FLAG_SYNC,
        mapped_extents: 0,
        extent_count: EXTENTS as u32,
        reserved: 0,
        extents: [FiemapExtent::default(); EXTENTS],
    };
    // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `extent_count` extents into the
    // array that follows it, all inside `m`, which lives across the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            FS_IOC_FIEMAP as _,
            &mut m as *mut Fiemap,
        )
    };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Vec::new();
    }
    assert_eq!(
        r,
        0,
        "FIEMAP {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    m.extents[..m.mapped_extents as usize]
        .iter()
        .map(|e| (e.physical, e.flags))
        .collect()
}

fn layer_tar(data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "big", data).unwrap();
    b.into_inner().unwrap()
}

/// Options with `copy_fallback = true`.
fn copy_fallback() -> DriverOptions {
    let text = "[storage]\n[storage.options.reflink]\ncopy_fallback = true\n";
    graphdriver::Config::from_toml(
        graphdriver::Config::new("/unused"),
        text,
        Path::new("test.toml"),
    )
    .unwrap()
    .options_for("reflink")
}

#[test]
fn child_layers_share_extents_where_the_filesystem_clones() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("reflink");
    // By default the driver refuses a filesystem that cannot clone, naming why.
    let d = match reflink_driver::init(&home, &DriverOptions::default()) {
        Ok(d) => {
            let expect = std::env::var("GRAPHDRIVER_EXPECT_REFLINK");
            assert_ne!(
                expect.as_deref(),
                Ok("0"),
                "init must refuse where it cannot clone"
            );
            d
        }
        Err(graphdriver::Error::NotSupported { reason, .. }) => {
            eprintln!("refused as expected: {reason}");
            assert!(
                reason.contains("FICLONE") && reason.contains("copy_fallback"),
                "{reason}"
            );
            let expect = std::env::var("GRAPHDRIVER_EXPECT_REFLINK");
            assert_ne!(
                expect.as_deref(),
                Ok("1"),
                "this filesystem should clone: {reason}"
            );
            // With the fallback it copies (checked below: nothing shared).
            reflink_driver::init(&home, &copy_fallback()).unwrap()
        }
        Err(e) => panic!("init: {e}"),
    };
    let (base, child) = (
        LayerId::new("base").unwrap(),
        LayerId::new("child").unwrap(),
    );
    d.create(&base, None).unwrap();
    // 4 MiB that compress badly, so no filesystem stores them inline or as holes.
    let mut data = Vec::with_capacity(4 << 20);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < 4 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.write_all(&x.to_le_bytes()).unwrap();
    }
    d.apply_diff(&base, None, &mut &layer_tar(&data)[..])
        .unwrap();
    d.create(&child, Some(&base)).unwrap();
    let cloned: u64 = d
        .status()
        .iter()
        .find(|(k, _)| k == "files cloned")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    let parent_dir = d.get(&base, &MountOpts::default()).unwrap();
    let child_dir = d.get(&child, &MountOpts::default()).unwrap();
    assert_eq!(std::fs::read(child_dir.join("big")).unwrap(), data);
    let (pe, ce) = (
        extents(&parent_dir.join("big")),
        extents(&child_dir.join("big")),
    );
    let shared = !ce.is_empty()
        && ce
            .iter()
            .all(|&(_, flags)| flags & FIEMAP_EXTENT_SHARED != 0)
        && ce.iter().map(|e| e.0).eq(pe.iter().map(|e| e.0));
    eprintln!("files cloned: {cloned}; child extents shared with the parent's: {shared}");
    if cloned > 0 {
        assert!(shared, "cloned but not sharing: parent {pe:?} child {ce:?}");
    }
    match std::env::var("GRAPHDRIVER_EXPECT_REFLINK").as_deref() {
        Ok("1") => assert!(cloned > 0 && shared, "this filesystem should clone"),
        Ok("0") => assert!(cloned == 0 && !shared, "this filesystem cannot clone"),
        _ => {}
    }
    d.put(&child).unwrap();
    d.put(&base).unwrap();
}
