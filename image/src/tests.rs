//! Imports into a real `vfs` store: chain ids, reuse, and corrupt images leaving the store as
//! it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use drivers as _;

use super::*;

fn hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn put_blob(dir: &Path, media_type: &str, data: &[u8]) -> Value {
    let h = hex(data);
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("blobs/sha256").join(&h), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{h}"), "size": data.len()})
}

fn layer_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

/// An OCI layout at `dir` of uncompressed `layers`, the config listing `diff_ids` (the
/// layers' own when `None`); returns the real DiffIDs.
fn layout(dir: &Path, layers: &[Vec<u8>], diff_ids: Option<Vec<String>>) -> Vec<String> {
    let real: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(l)))
        .collect();
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| put_blob(dir, "application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids.unwrap_or_else(|| real.clone())},
    });
    let config = put_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descs,
    });
    let m = put_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    fs::write(
        dir.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [m]}).to_string(),
    )
    .unwrap();
    real
}

struct Store {
    _tmp: tempfile::TempDir,
    image: PathBuf,
    selected: graphdriver::Selected,
    store: LayerStore,
}

impl Store {
    fn new() -> Store {
        let tmp = tempfile::tempdir().unwrap();
        let config = graphdriver::Config {
            driver: Some("vfs".into()),
            ..graphdriver::Config::new(tmp.path().join("root"))
        };
        let selected = graphdriver::open(&config).unwrap();
        let (store, _) = LayerStore::open(&selected.home, Default::default()).unwrap();
        Store {
            image: tmp.path().join("image"),
            _tmp: tmp,
            selected,
            store,
        }
    }

    fn import(&self) -> Result<Report> {
        import(self.selected.driver.as_ref(), &self.store, &self.image, &())
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .selected
            .driver
            .list()
            .unwrap()
            .iter()
            .map(|l| l.id.to_string())
            .collect();
        ids.sort();
        ids
    }
}

fn two_layers() -> Vec<Vec<u8>> {
    vec![layer_tar("a", b"one"), layer_tar("b", b"two")]
}

#[test]
fn layers_are_named_by_chain_id_and_reused() {
    let s = Store::new();
    let diff_ids = layout(&s.image, &two_layers(), None);
    let want: Vec<String> = chain_ids(&diff_ids)
        .iter()
        .map(|c| c.trim_start_matches("sha256:").to_string())
        .collect();
    let image = Image::open(&s.image).unwrap();
    assert_eq!(image.layers()[1].chain_id, format!("sha256:{}", want[1]));
    let report = s.import().unwrap();
    assert_eq!(
        report.top.as_ref().map(LayerId::as_str),
        Some(want[1].as_str())
    );
    let ids: Vec<&str> = report.layers.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, [want[0].as_str(), want[1].as_str()]);
    assert!(report.layers.iter().all(|l| l.applied));
    assert_eq!(
        s.selected
            .driver
            .parent(&report.layers[1].id)
            .unwrap()
            .as_ref(),
        Some(&report.layers[0].id)
    );
    let again = s.import().unwrap();
    assert!(again.layers.iter().all(|l| !l.applied && l.size == 0));
}

#[test]
fn a_blob_digest_mismatch_leaves_the_store_unchanged() {
    let s = Store::new();
    let layers = two_layers();
    layout(&s.image, &layers, None);
    // The second blob's bytes change, its name (the digest the manifest gives) does not: the
    // bad digest is only known after the layer was applied.
    let good = hex(&layers[1]);
    let bad = layer_tar("b", b"TWO");
    assert_eq!(bad.len(), layers[1].len());
    fs::write(s.image.join("blobs/sha256").join(&good), &bad).unwrap();
    let e = s.import().unwrap_err();
    match &e {
        Error::DigestMismatch {
            blob,
            expected,
            found,
        } => {
            assert_eq!(blob, &format!("blobs/sha256/{good}"));
            assert_eq!(expected, &format!("sha256:{good}"));
            assert_eq!(found, &format!("sha256:{}", hex(&bad)));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert_eq!(s.ids(), Vec::<String>::new());
}

#[test]
fn a_diff_id_mismatch_leaves_the_store_unchanged() {
    let s = Store::new();
    let layers = two_layers();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let real = layout(&s.image, &layers, Some(vec![wrong.clone(), wrong.clone()]));
    let e = s.import().unwrap_err();
    match &e {
        Error::DiffIdMismatch {
            expected, found, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(found, &real[0]);
        }
        other => panic!("expected a DiffID mismatch, got {other:?}"),
    }
    assert_eq!(s.ids(), Vec::<String>::new());
}

#[test]
fn a_layer_with_another_diff_id_is_not_reused() {
    let s = Store::new();
    let layers = two_layers();
    let diff_ids = layout(&s.image, &layers[..1], None);
    // Layer 0's chain id taken by a layer with no DiffID record.
    let id = LayerId::new(diff_ids[0].trim_start_matches("sha256:")).unwrap();
    s.selected.driver.create(&id, None).unwrap();
    let e = s.import().unwrap_err();
    assert!(
        matches!(&e, Error::ReuseDiffId { recorded: None, needed, .. } if needed == &diff_ids[0]),
        "{e:?}"
    );
    assert_eq!(s.ids(), vec![id.to_string()]);
}

#[test]
fn progress_is_reported_per_layer() {
    #[derive(Default)]
    struct Log(RefCell<Vec<String>>);
    impl Progress for Log {
        fn layer_started(&self, l: &LayerStart<'_>, len: u64) {
            self.0
                .borrow_mut()
                .push(format!("start {}/{} {len}", l.index + 1, l.count));
        }
        fn blob_read(&self, bytes: u64) {
            if bytes > 0 {
                self.0.borrow_mut().push("read".into());
            }
        }
        fn layer_applied(&self, _: &LayerId) {
            self.0.borrow_mut().push("applied".into());
        }
    }
    let s = Store::new();
    let layers = two_layers();
    layout(&s.image, &layers, None);
    let log = Log::default();
    import(s.selected.driver.as_ref(), &s.store, &s.image, &log).unwrap();
    let mut log = log.0.into_inner();
    log.dedup();
    let len = layers[0].len();
    assert_eq!(
        log,
        [
            format!("start 1/2 {len}"),
            "read".into(),
            "applied".into(),
            format!("start 2/2 {len}"),
            "read".into(),
            "applied".into(),
        ]
    );
}

#[test]
fn not_an_image_names_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Image::open(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::UnknownLayout), "{e:?}");
    let e = Image::open(&tmp.path().join("missing")).unwrap_err();
    assert!(
        matches!(&e, Error::Open { path, .. } if path.ends_with("missing")),
        "{e:?}"
    );
}

#[test]
fn an_oci_archive_imports_as_its_directory_does() {
    let s = Store::new();
    let diff_ids = layout(&s.image, &two_layers(), None);
    let archive = s.image.with_extension("tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &s.image).unwrap();
    b.finish().unwrap();
    drop(b);
    let report = import(s.selected.driver.as_ref(), &s.store, &archive, &()).unwrap();
    let top = chain_ids(&diff_ids).pop().unwrap();
    assert_eq!(
        report.top.map(|t| format!("sha256:{t}")).as_deref(),
        Some(top.as_str())
    );
}

#[test]
fn a_docker_save_directory_is_read_by_name_and_tag() {
    let s = Store::new();
    let layers = two_layers();
    let dir = &s.image;
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        fs::create_dir_all(dir.join(format!("l{i}"))).unwrap();
        fs::write(dir.join(format!("l{i}/layer.tar")), l).unwrap();
        paths.push(format!("l{i}/layer.tar"));
    }
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(l)))
        .collect();
    // moby's config, read leniently: no architecture or os needed.
    fs::write(
        dir.join("cfg.json"),
        json!({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).to_string(),
    )
    .unwrap();
    fs::write(
        dir.join("manifest.json"),
        json!([{"Config": "cfg.json", "RepoTags": ["small:latest"], "Layers": paths}]).to_string(),
    )
    .unwrap();
    let image = Image::open_tagged(dir, Some("small")).unwrap();
    let got: Vec<(&str, Option<&str>, &str)> = image
        .layers()
        .iter()
        .map(|l| (l.blob.as_str(), l.digest.as_deref(), l.diff_id.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("l0/layer.tar", None, diff_ids[0].as_str()),
            ("l1/layer.tar", None, diff_ids[1].as_str()),
        ]
    );
    assert_eq!(image.layers()[1].chain_id, chain_ids(&diff_ids)[1]);
    let e = Image::open_tagged(dir, Some("other")).unwrap_err();
    assert!(
        matches!(&e, Error::NoSuchTag { tag, available } if tag == "other" && available == &["small:latest"]),
        "{e:?}"
    );
    image
        .import(s.selected.driver.as_ref(), &s.store, &())
        .unwrap();
    assert_eq!(s.ids().len(), 2);
}
