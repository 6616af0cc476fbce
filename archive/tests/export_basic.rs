//! `tar_tree` / `export_changes` output read back with the `tar` crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use archive::{
    Change, ChangeKind, OverlayXattr, TarOptions, WhiteoutFormat, export_changes, tar_tree,
};
use filetime::FileTime;

#[derive(Debug, Clone)]
struct Ent {
    path: String,
    kind: tar::EntryType,
    link: Option<String>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: Option<(u32, u32)>,
    pax: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
    uname: Vec<u8>,
}

fn read_tar(mut r: impl Read) -> Vec<Ent> {
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() % 512, 0, "tar length is a multiple of 512");
    assert!(bytes.len() >= 1024 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0));
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut pax = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                pax.insert(x.key().unwrap().to_string(), x.value_bytes().to_vec());
            }
        }
        let h = e.header().clone();
        let dev = match h.entry_type() {
            tar::EntryType::Char | tar::EntryType::Block => Some((
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            )),
            _ => None,
        };
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(Ent {
            path,
            kind: h.entry_type(),
            link,
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            dev,
            pax,
            data,
            uname: h.username_bytes().unwrap_or_default().to_vec(),
        });
    }
    out
}

fn names(es: &[Ent]) -> Vec<&str> {
    es.iter().map(|e| e.path.as_str()).collect()
}

fn find<'a>(es: &'a [Ent], p: &str) -> &'a Ent {
    es.iter()
        .find(|e| e.path == p)
        .unwrap_or_else(|| panic!("no entry {p} in {:?}", names(es)))
}

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

use test_support::is_root;

/// Whether this root-only test runs (see [`test_support::root_or_skip`]).
fn root_or_skip() -> bool {
    test_support::root_or_skip("this export test (devices, owners)")
}

#[test]
fn order_is_bytewise_depth_first_and_metadata_is_kept() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(&r.join("a/x"), b"xx");
    write(&r.join("a.b"), b"ab");
    write(&r.join("B"), b"big b");
    write(&r.join("c/d/e"), b"e");
    symlink("../a.b", r.join("c/link")).unwrap();
    fs::set_permissions(r.join("a.b"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(r.join("c"), fs::Permissions::from_mode(0o1777)).unwrap();
    filetime::set_file_mtime(
        r.join("B"),
        FileTime::from_unix_time(1_500_000_000, 999_999_999),
    )
    .unwrap();
    let es = read_tar(tar_tree(r, &TarOptions::default()).unwrap());
    assert_eq!(
        names(&es),
        ["B", "a/", "a/x", "a.b", "c/", "c/d/", "c/d/e", "c/link"]
    );
    let b = find(&es, "B");
    assert_eq!(b.data, b"big b");
    assert_eq!(b.mtime, 1_500_000_000);
    assert_eq!(b.kind, tar::EntryType::Regular);
    assert!(b.uname.is_empty(), "no user names are written");
    assert_eq!(find(&es, "a.b").mode, 0o4755);
    assert_eq!(find(&es, "c/").mode, 0o1777);
    assert_eq!(find(&es, "c/").kind, tar::EntryType::Directory);
    let l = find(&es, "c/link");
    assert_eq!(l.kind, tar::EntryType::Symlink);
    assert_eq!(l.link.as_deref(), Some("../a.b"));
}

#[test]
fn owners_are_numeric_and_large_ids_use_pax() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("f"), b"f");
    write(&t.path().join("g"), b"g");
    std::os::unix::fs::lchown(t.path().join("f"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(t.path().join("g"), Some(3_000_000), Some(4_000_000)).unwrap();
    let es = read_tar(tar_tree(t.path(), &TarOptions::default()).unwrap());
    let f = find(&es, "f");
    assert_eq!((f.uid, f.gid), (1234, 5678));
    let g = find(&es, "g");
    assert_eq!(
        g.pax.get("uid").map(|v| v.as_slice()),
        Some(&b"3000000"[..])
    );
    assert_eq!(
        g.pax.get("gid").map(|v| v.as_slice()),
        Some(&b"4000000"[..])
    );
}

#[test]
fn long_names_and_link_targets_use_pax() {
    let t = tempfile::tempdir().unwrap();
    let long_dir = "d".repeat(90);
    let long_file = "f".repeat(60);
    let rel = format!("{long_dir}/{long_file}");
    write(&t.path().join(&rel), b"deep");
    let target = "t".repeat(150);
    symlink(&target, t.path().join("s")).unwrap();
    let es = read_tar(tar_tree(t.path(), &TarOptions::default()).unwrap());
    assert_eq!(find(&es, &rel).data, b"deep");
    assert_eq!(find(&es, "s").link.as_deref(), Some(target.as_str()));
    assert!(find(&es, &rel).pax.contains_key("path"));
}

#[test]
fn xattrs_as_schily_records_with_prefix_filter() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(&r.join("f"), b"f");
    fs::create_dir(r.join("d")).unwrap();
    xattr::set(r.join("f"), "user.alpha", b"1").unwrap();
    xattr::set(r.join("f"), "user.beta", b"\x00\xffbin").unwrap();
    xattr::set(r.join("d"), "user.alpha", b"dir").unwrap();
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let root = is_root();
    if root {
        xattr::set(r.join("f"), "security.capability", &cap).unwrap();
        xattr::set(r.join("d"), "trusted.overlay.opaque", b"y").unwrap();
        xattr::set(r.join("d"), "trusted.other", b"t").unwrap();
    }
    let es = read_tar(tar_tree(r, &TarOptions::default()).unwrap());
    let f = find(&es, "f");
    assert_eq!(f.pax["SCHILY.xattr.user.alpha"], b"1");
    assert_eq!(f.pax["SCHILY.xattr.user.beta"], b"\x00\xffbin");
    let d = find(&es, "d/");
    assert_eq!(d.pax["SCHILY.xattr.user.alpha"], b"dir");
    if root {
        assert_eq!(f.pax["SCHILY.xattr.security.capability"], cap);
        assert_eq!(d.pax["SCHILY.xattr.trusted.other"], b"t");
        assert!(!d.pax.contains_key("SCHILY.xattr.trusted.overlay.opaque"));
    }

    let mut opts = TarOptions::default();
    opts.xattr_prefixes = vec!["user.a".into()];
    let es = read_tar(tar_tree(r, &opts).unwrap());
    let f = find(&es, "f");
    assert!(f.pax.contains_key("SCHILY.xattr.user.alpha"));
    assert!(!f.pax.contains_key("SCHILY.xattr.user.beta"));
    if root {
        assert!(f.pax.contains_key("SCHILY.xattr.security.capability"));
        assert!(
            !find(&es, "d/")
                .pax
                .contains_key("SCHILY.xattr.trusted.other")
        );
    }
}

#[test]
fn hardlinks_link_to_the_first_exported_name() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(&r.join("a/one"), b"shared");
    fs::hard_link(r.join("a/one"), r.join("b")).unwrap();
    fs::hard_link(r.join("a/one"), r.join("z")).unwrap();
    let es = read_tar(tar_tree(r, &TarOptions::default()).unwrap());
    assert_eq!(names(&es), ["a/", "a/one", "b", "z"]);
    assert_eq!(find(&es, "a/one").kind, tar::EntryType::Regular);
    assert_eq!(find(&es, "a/one").data, b"shared");
    for n in ["b", "z"] {
        assert_eq!(find(&es, n).kind, tar::EntryType::Link);
        assert!(find(&es, n).data.is_empty());
        assert_eq!(find(&es, n).link.as_deref(), Some("a/one"));
    }
    // "a/one" is not in the change set (unchanged in the parent): both changed names link to it.
    let ch = vec![
        Change {
            path: "/z".into(),
            kind: ChangeKind::Add,
        },
        Change {
            path: "/b".into(),
            kind: ChangeKind::Add,
        },
    ];
    let es = read_tar(export_changes(r, &ch, &TarOptions::default()).unwrap());
    assert_eq!(names(&es), ["b", "z"]);
    for n in ["b", "z"] {
        assert_eq!(find(&es, n).kind, tar::EntryType::Link);
        assert_eq!(find(&es, n).link.as_deref(), Some("a/one"));
    }
}

#[test]
fn deletes_become_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(&r.join("dir/kept"), b"k");
    let ch = vec![
        Change {
            path: "/dir".into(),
            kind: ChangeKind::Modify,
        },
        Change {
            path: "/dir/gone".into(),
            kind: ChangeKind::Delete,
        },
        Change {
            path: "/dir/kept".into(),
            kind: ChangeKind::Add,
        },
        Change {
            path: "/top".into(),
            kind: ChangeKind::Delete,
        },
    ];
    let es = read_tar(export_changes(r, &ch, &TarOptions::default()).unwrap());
    assert_eq!(names(&es), ["dir/", "dir/.wh.gone", "dir/kept", ".wh.top"]);
    let w = find(&es, "dir/.wh.gone");
    assert_eq!(w.kind, tar::EntryType::Regular);
    assert!(w.data.is_empty());
    assert_eq!(w.mtime, 0);
}

#[test]
fn devices_and_fifos_exported_sockets_skipped() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let mk = |name: &str, ft, dev| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.join(name),
            ft,
            rustix::fs::Mode::from_raw_mode(0o640),
            dev,
        )
        .unwrap();
    };
    mk(
        "null",
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::makedev(1, 3),
    );
    mk(
        "loop",
        rustix::fs::FileType::BlockDevice,
        rustix::fs::makedev(7, 300),
    );
    mk("fifo", rustix::fs::FileType::Fifo, 0);
    let _sock = std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap();
    let mut s = tar_tree(r, &TarOptions::default()).unwrap();
    let es = read_tar(&mut s);
    assert_eq!(names(&es), ["fifo", "loop", "null"]);
    assert_eq!(find(&es, "null").kind, tar::EntryType::Char);
    assert_eq!(find(&es, "null").dev, Some((1, 3)));
    assert_eq!(find(&es, "loop").kind, tar::EntryType::Block);
    assert_eq!(find(&es, "loop").dev, Some((7, 300)));
    assert_eq!(find(&es, "fifo").kind, tar::EntryType::Fifo);
    assert_eq!(find(&es, "fifo").mode, 0o640);
    let sk = s.skipped();
    assert_eq!(sk.len(), 1);
    assert_eq!(sk[0].0, PathBuf::from("sock"));
    assert!(sk[0].1.contains("socket"), "{}", sk[0].1);
}

#[test]
fn overlay_upper_conversion() {
    if !root_or_skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir(r.join("etc")).unwrap();
    let wh = |p: &Path| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0),
            0,
        )
        .unwrap();
    };
    wh(&r.join("etc/gone"));
    // Overlay may hardlink whiteouts together: each is still its own `.wh.` entry.
    fs::hard_link(r.join("etc/gone"), r.join("etc/gone2")).unwrap();
    write(&r.join("opq/new"), b"n");
    xattr::set(r.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(r.join("opq"), "user.keep", b"k").unwrap();
    let mut opts = TarOptions::default();
    opts.whiteout_format = WhiteoutFormat::Overlay(OverlayXattr::Trusted);
    let es = read_tar(tar_tree(r, &opts).unwrap());
    assert_eq!(
        names(&es),
        [
            "etc/",
            "etc/.wh.gone",
            "etc/.wh.gone2",
            "opq/",
            "opq/.wh..wh..opq",
            "opq/new"
        ]
    );
    for n in ["etc/.wh.gone", "etc/.wh.gone2", "opq/.wh..wh..opq"] {
        assert_eq!(find(&es, n).kind, tar::EntryType::Regular, "{n}");
        assert!(find(&es, n).data.is_empty());
    }
    let d = find(&es, "opq/");
    assert!(d.pax.keys().all(|k| !k.contains("overlay")), "{:?}", d.pax);
    assert_eq!(d.pax["SCHILY.xattr.user.keep"], b"k");

    // The OCI format leaves them as they are (a char device, no opaque marker).
    let es = read_tar(tar_tree(r, &TarOptions::default()).unwrap());
    assert_eq!(find(&es, "etc/gone").kind, tar::EntryType::Char);
    assert!(es.iter().all(|e| !e.path.contains(".wh.")));
}

#[test]
fn include_and_exclude() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(&r.join("a/b/c"), b"c");
    write(&r.join("a/b/d"), b"d");
    write(&r.join("a/e"), b"e");
    write(&r.join("f"), b"f");
    let mut opts = TarOptions::default();
    opts.include = vec!["a/b".into(), "/f".into()];
    opts.exclude = vec!["a/b/d".into()];
    let es = read_tar(tar_tree(r, &opts).unwrap());
    assert_eq!(names(&es), ["a/b/", "a/b/c", "f"]);
}

#[test]
fn producer_error_surfaces_as_read_error() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("there"), b"x");
    let ch = vec![
        Change {
            path: "/there".into(),
            kind: ChangeKind::Add,
        },
        Change {
            path: "/vanished".into(),
            kind: ChangeKind::Add,
        },
    ];
    let mut s = export_changes(t.path(), &ch, &TarOptions::default()).unwrap();
    let mut buf = Vec::new();
    let err = s.read_to_end(&mut buf).unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<archive::Error>())
        .expect("the io::Error carries the archive::Error");
    assert_eq!(inner.errno(), Some(libc::ENOENT));
    assert!(err.to_string().contains("vanished"), "{err}");
    // Still an error on the next read, never a clean end.
    assert!(s.read(&mut [0u8; 10]).is_err());
}

#[test]
fn missing_root_fails_up_front() {
    let t = tempfile::tempdir().unwrap();
    assert!(tar_tree(&t.path().join("nope"), &TarOptions::default()).is_err());
}

#[test]
fn dropping_the_stream_early_stops_the_producer() {
    let t = tempfile::tempdir().unwrap();
    for i in 0..8 {
        write(&t.path().join(format!("f{i}")), &vec![i as u8; 1 << 20]);
    }
    let mut s = tar_tree(t.path(), &TarOptions::default()).unwrap();
    // The stream can be moved to another thread (compile-time check).
    fn movable<T: Read + Send + 'static>(_: &T) {}
    movable(&s);
    let mut head = [0u8; 512];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..3], b"f0\0");
    // Drop joins the producer; this returns only because the producer noticed and stopped.
    drop(s);
}
