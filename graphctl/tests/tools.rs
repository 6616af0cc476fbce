//! graphctl's output read by the system's own tools, and its input made by them: `diff
//! --compress` blobs decompressed by `gzip -dc` and `zstd -dc` and listed by GNU `tar -tvf`;
//! `export` listed and extracted by GNU tar into a tree equal to the layer's; `usage` of a
//! hostile layer (symlink loops, links to `/` and `..`, a tree deeper than `PATH_MAX`,
//! hardlinks, a sparse file) agreeing with GNU `du`. Each tool is required under `CI=true`
//! (`.ci/run` installs it) and skipped with a printed reason elsewhere.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::util::{Store, layer_tar};

/// Runs `cmd`, asserts success and returns stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// `tar -tvf FILE` by GNU tar: entry name (no `./`, no trailing `/`) → (mode string, link
/// target).
fn gnu_list(file: &Path) -> BTreeMap<String, (String, Option<String>)> {
    let out = String::from_utf8(run(Command::new("tar").arg("-tvf").arg(file))).unwrap();
    let mut entries = BTreeMap::new();
    for line in out.lines() {
        // -rwxr-xr-x root/root 5 2023-11-14 22:13 bin/run
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "unexpected tar -tv line: {line}");
        let rest = fields[5..].join(" ");
        let (name, link) = match rest.split_once(" -> ") {
            Some((n, l)) => (n.to_string(), Some(l.to_string())),
            None => match rest.split_once(" link to ") {
                Some((n, l)) => (n.to_string(), Some(format!("hardlink {l}"))),
                None => (rest, None),
            },
        };
        let name = name
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        if !name.is_empty() && name != "." {
            entries.insert(name, (fields[0].to_string(), link));
        }
    }
    entries
}

/// What a tree holds, read with plain `std::fs` calls: relative path → kind and permission
/// bits, and the contents of a file or the target of a symlink.
fn tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let md = p.symlink_metadata().unwrap();
            let mode = md.mode() & 0o7777;
            let entry = if md.is_symlink() {
                (
                    'l',
                    0,
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if md.is_dir() {
                todo.push(p);
                ('d', mode, Vec::new())
            } else {
                ('f', mode, fs::read(&p).unwrap())
            };
            out.insert(rel, entry);
        }
    }
    out
}

/// A store with a committed layer `base` and on it a read-write layer `ctr`, mounted, whose
/// tree gained files, modes, symlinks and lost a file of `base`; returns `ctr`'s mounted path.
fn base_and_changed_ctr(s: &Store) -> PathBuf {
    let tar = s.scratch("base.tar");
    fs::write(
        &tar,
        layer_tar(&[
            ("etc/", b""),
            ("etc/motd", b"base\n"),
            ("etc/remove-me", b"gone\n"),
        ]),
    )
    .unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let mnt = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    fs::create_dir_all(mnt.join("bin")).unwrap();
    fs::write(mnt.join("bin/run"), b"#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(mnt.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(mnt.join("etc/secret"), b"s3cret").unwrap();
    fs::set_permissions(mnt.join("etc/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(mnt.join("etc/motd"), b"changed\n").unwrap();
    fs::remove_file(mnt.join("etc/remove-me")).unwrap();
    symlink("../bin/run", mnt.join("etc/run-link")).unwrap();
    symlink("/etc/motd", mnt.join("motd-abs")).unwrap();
    fs::create_dir(mnt.join("opt")).unwrap();
    fs::set_permissions(mnt.join("opt"), fs::Permissions::from_mode(0o750)).unwrap();
    mnt
}

/// `diff --compress FORMAT -o FILE` of `ctr`, decompressed by `tool -dc`: the printed digest
/// is the blob's, the printed DiffID the decompressed tar's, and GNU tar lists the changes.
fn diff_compressed_by(format: &str, tool: &str, package: &str) {
    if !test_support::tool_or_skip(tool, package) || !test_support::tool_or_skip("tar", "tar") {
        return;
    }
    let s = Store::new("vfs");
    base_and_changed_ctr(&s);
    let blob = s.scratch(&format!("ctr.tar.{format}"));
    let out = s.ok(&[
        "diff",
        "--compress",
        format,
        "-o",
        blob.to_str().unwrap(),
        "ctr",
    ]);
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .trim()
            .to_string()
    };
    let data = fs::read(&blob).unwrap();
    assert_eq!(field("digest:"), sha256(&data), "{out}");
    assert_eq!(field("size:"), data.len().to_string(), "{out}");
    let plain = run(Command::new(tool).arg("-dc").arg(&blob));
    assert_ne!(plain, data, "{tool} -dc gave the blob back unchanged");
    assert_eq!(field("diff_id:"), sha256(&plain), "{out}");
    let tar = s.scratch("ctr.tar");
    fs::write(&tar, &plain).unwrap();
    let list = gnu_list(&tar);
    let mode = |name: &str| list.get(name).map(|(m, _)| m.as_str());
    assert_eq!(mode("bin/run"), Some("-rwxr-xr-x"), "{list:?}");
    assert_eq!(mode("etc/secret"), Some("-rw-------"), "{list:?}");
    assert_eq!(mode("etc/motd"), Some("-rw-r--r--"), "{list:?}");
    assert_eq!(mode("opt"), Some("drwxr-x---"), "{list:?}");
    assert_eq!(
        list.get("etc/run-link").and_then(|(_, l)| l.as_deref()),
        Some("../bin/run"),
        "{list:?}"
    );
    assert_eq!(
        list.get("motd-abs").and_then(|(_, l)| l.as_deref()),
        Some("/etc/motd"),
        "{list:?}"
    );
    // The deletion is an OCI whiteout; base's unchanged files are not in the diff.
    assert!(list.contains_key("etc/.wh.remove-me"), "{list:?}");
    assert!(!list.contains_key("etc/remove-me"), "{list:?}");
    s.ok(&["unmount", "ctr"]);
}

#[test]
fn diff_gzip_blob_reads_with_system_gzip_and_gnu_tar() {
    diff_compressed_by("gzip", "gzip", "gzip");
}

#[test]
fn diff_zstd_blob_reads_with_system_zstd_and_gnu_tar() {
    diff_compressed_by("zstd", "zstd", "zstd");
}

#[test]
fn export_extracted_by_gnu_tar_equals_the_layer_tree() {
    if !test_support::tool_or_skip("tar", "tar") {
        return;
    }
    let s = Store::new("vfs");
    let mnt = base_and_changed_ctr(&s);
    let file = s.scratch("export.tar");
    s.ok(&["export", "-o", file.to_str().unwrap(), "ctr"]);
    let list = gnu_list(&file);
    // The whole tree, parents' files included, and no whiteouts.
    for name in ["etc/motd", "bin/run", "etc/secret", "etc/run-link", "opt"] {
        assert!(list.contains_key(name), "{name} missing: {list:?}");
    }
    assert!(
        list.keys().all(|k| !k.contains(".wh.")) && !list.contains_key("etc/remove-me"),
        "{list:?}"
    );
    let out = s.scratch("extracted");
    fs::create_dir(&out).unwrap();
    run(Command::new("tar")
        .args(["-x", "-p", "--numeric-owner", "-f"])
        .arg(&file)
        .arg("-C")
        .arg(&out));
    let want = tree(&mnt);
    assert_eq!(tree(&out), want);
    // The comparison saw what it should: contents, modes and symlinks.
    assert_eq!(want["etc/motd"], ('f', 0o644, b"changed\n".to_vec()));
    assert_eq!(want["bin/run"].1, 0o755);
    assert_eq!(want["etc/secret"].1, 0o600);
    assert_eq!(want["opt"], ('d', 0o750, Vec::new()));
    assert_eq!(want["etc/run-link"], ('l', 0, b"../bin/run".to_vec()));
    s.ok(&["unmount", "ctr"]);
}

/// `graphctl --json usage ID`: (bytes, inodes).
fn usage(s: &Store, id: &str) -> (u64, u64) {
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "usage", id])).unwrap();
    let l = &v["layers"][0];
    assert_eq!(l["id"], id, "{v}");
    (l["bytes"].as_u64().unwrap(), l["inodes"].as_u64().unwrap())
}

/// GNU `du -sx` of `dir`: (bytes allocated, inodes), each hardlinked file once.
fn du(dir: &Path) -> (u64, u64) {
    let first = |args: &[&str]| -> u64 {
        let out = String::from_utf8(run(Command::new("du").args(args).arg(dir))).unwrap();
        out.split_whitespace().next().unwrap().parse().unwrap()
    };
    (first(&["-sx", "-B1"]), first(&["-sx", "--inodes"]))
}

/// Makes `levels` nested directories `dd` below `dir`, one `mkdirat` at a time (the whole path
/// is longer than `PATH_MAX`, so no single path call could).
fn nest(dir: &Path, levels: usize) {
    use rustix::fs::{CWD, Mode, OFlags, mkdirat, openat};
    let mut fd = openat(CWD, dir, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for _ in 0..levels {
        mkdirat(&fd, "dd", Mode::from_raw_mode(0o755)).unwrap();
        fd = openat(&fd, "dd", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    }
}

#[test]
fn usage_of_a_hostile_layer_stays_inside_counts_hardlinks_once_and_finishes() {
    let have_du = test_support::tool_or_skip("du", "coreutils");
    let s = Store::new("vfs");
    s.ok(&["create", "--rw", "hostile"]);
    let mnt = PathBuf::from(s.ok(&["mount", "hostile"]).trim());
    let empty = usage(&s, "hostile");

    // A tree deeper than PATH_MAX (3000 × "dd/" is 9000 bytes of path) and 1 MiB of data.
    const LEVELS: u64 = 3000;
    nest(&mnt, LEVELS as usize);
    fs::write(mnt.join("big"), vec![0x5a; 1 << 20]).unwrap();
    let one = usage(&s, "hostile");
    assert_eq!(
        one.1,
        empty.1 + LEVELS + 1,
        "one inode per directory and file"
    );
    assert!(one.0 >= empty.0 + (1 << 20), "{one:?}");

    // Three more names for `big`: no byte and no inode more.
    for name in ["big.1", "big.2", "big.3"] {
        fs::hard_link(mnt.join("big"), mnt.join(name)).unwrap();
    }
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().nlink(), 4);
    let linked = usage(&s, "hostile");
    assert_eq!(linked, one, "hardlinks must count once");

    // Symlinks out of the layer and in loops: each is one inode, none is followed.
    let links = [
        ("root", "/"),
        ("up", ".."),
        ("far-up", "../../../../../../.."),
        ("self", "self"),
        ("loop-a", "loop-b"),
        ("loop-b", "loop-a"),
        ("here", "."),
        ("proc", "/proc/self/root"),
    ];
    for (name, target) in links {
        symlink(target, mnt.join(name)).unwrap();
    }
    // A 1 GiB sparse file holding 4 KiB of data.
    let sparse = fs::File::create(mnt.join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[1u8; 4096], 512 << 20).unwrap();
    drop(sparse);
    let hostile = usage(&s, "hostile");
    assert_eq!(hostile.1, linked.1 + links.len() as u64 + 1, "{hostile:?}");
    let grew = hostile.0 - linked.0;
    assert!(
        grew < 1 << 20,
        "symlinks and a sparse file added {grew} bytes: a link was followed or the sparse \
         file's holes were counted"
    );

    // GNU du agrees on the layer's directory (vfs: the mounted tree's parent).
    if have_du {
        let dir = mnt.parent().unwrap();
        assert_eq!(
            du(dir),
            hostile,
            "graphctl usage vs du -sx {}",
            dir.display()
        );
    }
    // The whole store's usage finishes too, and totals the one layer.
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "usage"])).unwrap();
    assert_eq!(v["total"]["bytes"], hostile.0, "{v}");
    s.ok(&["unmount", "hostile"]);
    s.ok(&["rm", "hostile"]);
}
