//! The workflow peers have: `commit`, `diff --compress` with digests, `export`, `mount` with no
//! argument, `unmount --all`, `usage`, shell completions and man pages.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::util::{Store, layer_tar, read_tree};

/// `sha256:<hex>` of `bytes`.
fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The entries of tar `bytes`: path → content (directories as empty).
fn tar_entries(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(path, data);
    }
    out
}

/// A base layer (etc/hostname, etc/motd, bin/sh) and a read-write layer `ctr` on it holding
/// an added, a changed and a deleted file; returns `ctr`'s mount path (still mounted).
fn base_and_container(s: &Store) -> std::path::PathBuf {
    let tar = s.scratch("base.tar");
    std::fs::write(
        &tar,
        layer_tar(&[
            ("etc/", b""),
            ("etc/hostname", b"box\n"),
            ("etc/motd", b"hi\n"),
            ("bin/", b""),
            ("bin/sh", b"#!"),
        ]),
    )
    .unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let mnt = std::path::PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    std::fs::write(mnt.join("etc/motd"), b"changed\n").unwrap();
    std::fs::remove_file(mnt.join("etc/hostname")).unwrap();
    std::fs::write(mnt.join("new.txt"), b"new\n").unwrap();
    mnt
}

driver_test!(
    commit_makes_an_image_layer_with_the_containers_changes,
    |driver| {
        let s = Store::new(driver);
        let mnt = base_and_container(&s);
        let want_tree = read_tree(&mnt);
        let want_changes = s.ok(&["changes", "ctr"]);

        let diff_id = s.ok(&["commit", "ctr", "img"]).trim().to_string();
        assert!(diff_id.starts_with("sha256:"), "{diff_id}");
        assert_eq!(s.ok(&["ls"]), "base -\nctr base\nimg base\n");
        // An image layer, on the container's parent, with the container's changes and tree.
        let info: serde_json::Value =
            serde_json::from_str(&s.ok(&["--json", "info", "img"])).unwrap();
        assert_eq!(info["kind"], "image");
        assert_eq!(info["parent"], "base");
        assert_eq!(info["diff_id"], diff_id.as_str());
        assert_eq!(s.ok(&["changes", "img"]), want_changes);
        let (view, held) = s.look("img");
        assert_eq!(read_tree(&view), want_tree);
        s.unlook(&held);
        // The DiffID is the digest of the layer tar the commit applied: the same tar `diff`
        // writes for the container.
        let tar = s.scratch("ctr.tar");
        s.ok(&["diff", "ctr", "-o", tar.to_str().unwrap()]);
        assert_eq!(sha256(&std::fs::read(&tar).unwrap()), diff_id);
        // The container stays, usable.
        assert!(read_tree(&mnt) == want_tree);
        s.ok(&["unmount", "ctr"]);

        // What commit refuses, leaving the store as it was.
        let before = s.ok(&["ls"]);
        let e = s.err(&["commit", "img", "img2"]);
        assert!(e.contains("img is an image layer"), "{e}");
        let e = s.err(&["commit", "ctr", "img"]);
        assert!(e.contains("already exists"), "{e}");
        let e = s.err(&["commit", "nosuch", "img3"]);
        assert!(e.contains("nosuch"), "{e}");
        assert_eq!(s.ok(&["ls"]), before);
    }
);

driver_test!(
    diff_compress_writes_a_blob_with_its_digest_and_diff_id,
    |driver| {
        let s = Store::new(driver);
        base_and_container(&s);
        s.ok(&["unmount", "ctr"]);
        let plain = s.scratch("plain.tar");
        s.ok(&["diff", "ctr", "-o", plain.to_str().unwrap()]);
        let plain = std::fs::read(plain).unwrap();
        for (format, magic) in [
            ("gzip", &[0x1f, 0x8b][..]),
            ("zstd", &[0x28, 0xb5, 0x2f, 0xfd]),
        ] {
            let out = s.scratch(&format!("ctr.tar.{format}"));
            let text = s.ok(&[
                "diff",
                "ctr",
                "--compress",
                format,
                "-o",
                out.to_str().unwrap(),
            ]);
            let blob = std::fs::read(&out).unwrap();
            assert!(blob.starts_with(magic), "{format}");
            // Checked independently: the digest of the file, the DiffID of its decompressed tar.
            let mut tar = Vec::new();
            archive::decompress(&blob[..])
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(tar, plain, "{format}: the blob holds the plain diff");
            assert_eq!(
                text,
                format!(
                    "digest: {}\nsize: {}\ndiff_id: {}\n",
                    sha256(&blob),
                    blob.len(),
                    sha256(&plain)
                )
            );
            // To stdout, the digests go to stderr and the blob is the same.
            let out = s.cmd(&["diff", "ctr", "--compress", format]).output();
            assert!(out.status.success());
            assert_eq!(
                sha256(&out.stdout),
                sha256(&blob),
                "{format}: deterministic"
            );
            assert!(String::from_utf8_lossy(&out.stderr).contains(&sha256(&blob)));
        }
        // Without --compress, nothing but the tar.
        let out = s.scratch("again.tar");
        assert_eq!(s.ok(&["diff", "ctr", "-o", out.to_str().unwrap()]), "");
    }
);

driver_test!(export_writes_the_whole_tree_without_whiteouts, |driver| {
    let s = Store::new(driver);
    let mnt = base_and_container(&s);
    let want = read_tree(&mnt);
    s.ok(&["unmount", "ctr"]);
    let out = s.scratch("flat.tar");
    s.ok(&["export", "ctr", "-o", out.to_str().unwrap()]);
    let entries = tar_entries(&std::fs::read(&out).unwrap());
    assert!(
        entries.keys().all(|p| !p.contains(".wh.")),
        "{:?}",
        entries.keys()
    );
    assert_eq!(entries["etc/motd"], b"changed\n");
    assert_eq!(entries["new.txt"], b"new\n");
    assert_eq!(entries["bin/sh"], b"#!");
    assert!(!entries.contains_key("etc/hostname"));
    // Applied as a layer of its own, it is the container's tree.
    s.ok(&["apply", "flat", out.to_str().unwrap()]);
    let (view, held) = s.look("flat");
    assert_eq!(read_tree(&view), want);
    s.unlook(&held);
});

driver_test!(mount_lists_and_unmount_all_releases, |driver| {
    let s = Store::new(driver);
    assert_eq!(s.ok(&["mount"]), "");
    let mnt = base_and_container(&s);
    // A second reference to the same layer.
    s.ok(&["mount", "ctr"]);
    assert_eq!(s.ok(&["mount"]), format!("ctr {}\n", mnt.display()));
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "mount"])).unwrap();
    assert_eq!(v["mounts"][0]["mount_count"], 2, "{v}");
    // Listing takes no reference.
    let info: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "info", "ctr"])).unwrap();
    assert_eq!(info["mount_count"], 2);
    assert_eq!(s.ok(&["unmount", "--all"]), "ctr\n");
    assert_eq!(s.ok(&["mount"]), "");
    if driver != "vfs" {
        assert!(
            !crate::util::is_mount_point(&mnt),
            "unmount --all unmounted"
        );
    }
    s.ok(&["rm", "ctr"]);
    let e = s.err(&["unmount", "ctr"]);
    assert!(e.contains("ctr does not exist"), "{e}");
});

driver_test!(usage_counts_each_layers_own_storage, |driver| {
    let s = Store::new(driver);
    let big = vec![7u8; 256 * 1024];
    let tar = s.scratch("big.tar");
    std::fs::write(&tar, layer_tar(&[("big", &big)])).unwrap();
    s.ok(&["apply", "base", tar.to_str().unwrap()]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "usage"])).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let base = &layers[0];
    assert_eq!(base["id"], "base");
    assert!(base["bytes"].as_u64().unwrap() >= 256 * 1024, "{v}");
    let sum: u64 = layers.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["total"]["bytes"], sum);
    let text = s.ok(&["usage", "base"]);
    assert!(text.starts_with("ID "), "{text}");
    assert!(text.lines().any(|l| l.starts_with("base ")), "{text}");
    assert!(text.lines().last().unwrap().starts_with("total "), "{text}");
});

#[test]
fn completions_and_man_pages_cover_every_command() {
    let s = Store::new("vfs");
    for shell in ["bash", "zsh", "fish"] {
        let script = s.ok(&["completions", shell]);
        for word in ["commit", "export", "usage", "--compress"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let dir = s.scratch("man");
    s.ok(&["man", dir.to_str().unwrap()]);
    for page in [
        "graphctl.1",
        "graphctl-commit.1",
        "graphctl-diff.1",
        "graphctl-usage.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    assert!(
        !Path::new(&dir.join("graphctl-man.1")).exists(),
        "the hidden command has no page"
    );
}
