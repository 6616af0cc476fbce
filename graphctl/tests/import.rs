//! Image import: OCI layouts from a directory and a tar, `docker save` archives, chain ids,
//! digest checks.

use std::fs;
use std::path::Path;

use graphdriver_image::test_util::{self, Layer, OciLayoutBuilder, tar_dir};

use crate::util::{Store, sample_image};

/// The sample image's diff ids, from its config.
fn diff_ids() -> Vec<String> {
    let img = sample_image();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(img.join("index.json")).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| {
        let hex = d
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string();
        fs::read(img.join("blobs/sha256").join(hex)).unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// The chain ids of the sample image (hex), computed independently of graphctl.
fn chain_ids() -> Vec<String> {
    test_util::chain_ids(&diff_ids())
        .iter()
        .map(|c| c.trim_start_matches("sha256:").to_string())
        .collect()
}

#[test]
fn oci_layout_dir_gives_chain_ids() {
    let s = Store::new("vfs");
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["--json", "import", sample_image().to_str().unwrap()]))
            .unwrap();
    let ids = chain_ids();
    assert_eq!(json["top"], ids[2].as_str());
    let layers = json["layers"].as_array().unwrap();
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["id"], ids[i].as_str());
        assert_eq!(l["applied"], true);
    }
    assert_eq!(s.ok(&["ls"]), {
        let mut want = [
            format!("{} -", ids[0]),
            format!("{} {}", ids[1], ids[0]),
            format!("{} {}", ids[2], ids[1]),
        ];
        want.sort();
        want.join("\n") + "\n"
    });
}

#[test]
fn oci_layout_tar() {
    let s = Store::new("vfs");
    let tarfile = s.scratch("image.tar");
    tar_dir(&sample_image(), &tarfile).unwrap();
    let top = s.ok(&["import", tarfile.to_str().unwrap()]);
    assert_eq!(top.trim(), chain_ids()[2]);
}

/// Builds a `docker save` archive (old layout: `<id>/layer.tar`, `<hex>.json`) of the sample
/// image, with a symlinked duplicate layer path as docker writes for repeated layers.
fn docker_save(dir: &Path) -> std::path::PathBuf {
    let img = sample_image();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(img.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        fs::read(
            img.join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut image = OciLayoutBuilder::new().repo_tag("sample:latest");
    for l in manifest["layers"].as_array().unwrap() {
        // docker save stores layers uncompressed.
        let data = blob(l["digest"].as_str().unwrap());
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut archive::decompress(data.as_slice()).unwrap(),
            &mut plain,
        )
        .unwrap();
        image = image.layer(Layer::plain(plain));
    }
    let saved = dir.join("docker-save");
    image.write_docker_save(&saved).unwrap();
    // A symlink, as docker writes for a layer shared by two images.
    fs::create_dir(saved.join("alias")).unwrap();
    std::os::unix::fs::symlink("../l0/layer.tar", saved.join("alias/layer.tar")).unwrap();
    let out = dir.join("docker.tar");
    tar_dir(&saved, &out).unwrap();
    out
}

#[test]
fn docker_save_archive() {
    let s = Store::new("vfs");
    let tarfile = docker_save(s.dir.path());
    let top = s.ok(&["import", tarfile.to_str().unwrap()]);
    assert_eq!(top.trim(), chain_ids()[2]);
    // The same image from the OCI layout is already there: every layer is skipped.
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["--json", "import", sample_image().to_str().unwrap()]))
            .unwrap();
    assert!(
        json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["applied"] == false)
    );
}

/// Copies the sample image to `dir` and returns the copy.
pub fn copy_sample(dir: &Path) -> std::path::PathBuf {
    let to = dir.join("image");
    fs::create_dir_all(to.join("blobs/sha256")).unwrap();
    for f in ["index.json", "oci-layout"] {
        fs::copy(sample_image().join(f), to.join(f)).unwrap();
    }
    for e in fs::read_dir(sample_image().join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    to
}

/// The path of the top (plain tar) layer blob of an image copy.
pub fn top_layer_blob(img: &Path) -> std::path::PathBuf {
    let read =
        |p: &Path| -> serde_json::Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let index = read(&img.join("index.json"));
    let d = |v: &serde_json::Value| {
        img.join("blobs/sha256")
            .join(v.as_str().unwrap().strip_prefix("sha256:").unwrap())
    };
    let manifest = read(&d(&index["manifests"][0]["digest"]));
    d(&manifest["layers"][2]["digest"])
}

#[test]
fn digest_mismatch_leaves_the_store_unchanged() {
    let s = Store::new("vfs");
    s.ok(&["create", "unrelated"]);
    let img = copy_sample(s.dir.path());
    let blob = top_layer_blob(&img);
    // Change one byte of file content: still a valid tar, so only the digest catches it.
    let mut data = fs::read(&blob).unwrap();
    let pos = data
        .windows(15)
        .position(|w| w == b"tagged in layer")
        .unwrap();
    data[pos] = b'T';
    fs::write(&blob, data).unwrap();
    let msg = s.err(&["import", img.to_str().unwrap()]);
    let name = blob.file_name().unwrap().to_str().unwrap();
    assert!(
        msg.contains(name) && msg.contains("digest mismatch"),
        "{msg}"
    );
    assert_eq!(
        s.ok(&["ls"]),
        "unrelated -\n",
        "the failed import left layers behind"
    );
}

#[test]
fn truncated_blob_leaves_the_store_unchanged() {
    let s = Store::new("vfs");
    let img = copy_sample(s.dir.path());
    let blob = top_layer_blob(&img);
    let data = fs::read(&blob).unwrap();
    fs::write(&blob, &data[..data.len() / 2]).unwrap();
    let msg = s.err(&["import", img.to_str().unwrap()]);
    assert!(
        msg.contains(blob.file_name().unwrap().to_str().unwrap()),
        "{msg}"
    );
    assert_eq!(s.ok(&["ls"]), "");
}

#[test]
fn not_an_image() {
    let s = Store::new("vfs");
    let msg = s.err(&["import", s.dir.path().to_str().unwrap()]);
    assert!(
        msg.contains("index.json") && msg.contains("manifest.json"),
        "{msg}"
    );
    let file = s.scratch("garbage.tar");
    fs::write(&file, vec![7u8; 3000]).unwrap();
    let msg = s.err(&["import", file.to_str().unwrap()]);
    assert!(msg.contains("garbage.tar"), "{msg}");
    let msg = s.err(&["import", "/no/such/image"]);
    assert!(msg.contains("/no/such/image"), "{msg}");
    assert_eq!(s.ok(&["ls"]), "");
}

// Issue 16: concurrent imports of images that share layers all finish, with the same layers
// and correct trees: one builds each layer, the others wait for it and reuse it (no "already
// exists" failure, no layer published without its data or DiffID).
driver_test!(concurrent_imports_share_layers, |driver| {
    let s = Store::new(driver);
    s.ok(&["ls"]);
    let img = sample_image();
    let img = img.to_str().unwrap();
    let outs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| s.cmd(&["import", img]).output()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut tops = std::collections::BTreeSet::new();
    for out in &outs {
        assert!(
            out.status.success(),
            "an import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tops.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(tops.len(), 1, "{tops:?}");
    let top = tops.into_iter().next().unwrap();
    // The same layers and the same diff as one import into a fresh store.
    let alone = Store::new(driver);
    assert_eq!(alone.ok(&["import", img]).trim(), top);
    assert_eq!(s.ok(&["ls"]), alone.ok(&["ls"]));
    let diff = |st: &Store| st.cmd(&["diff", &top]).output().stdout;
    assert_eq!(diff(&s), diff(&alone), "the top layer's content differs");
    let info = s.ok(&["info", &top]);
    assert!(info.contains("diff_id:     sha256:"), "{info}");
});
