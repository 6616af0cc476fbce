//! Imports into a real `vfs` store: chain ids, reuse, and corrupt images leaving the store as
//! it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use drivers as _;

use super::*;
use crate::test_util::{Layer, OciLayoutBuilder, layer_tar, sha256_hex as hex};

/// An OCI layout at `dir` of uncompressed `layers`, the config listing `diff_ids` (the
/// layers' own when `None`); returns the real DiffIDs.
fn layout(dir: &Path, layers: &[Vec<u8>], diff_ids: Option<Vec<String>>) -> Vec<String> {
    let mut b = OciLayoutBuilder::new().plain_layers(layers);
    if let Some(ids) = diff_ids {
        b = b.config_diff_ids(ids);
    }
    b.write_oci(dir).unwrap().diff_ids
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
    vec![
        layer_tar(&[("a", b"one")]).unwrap(),
        layer_tar(&[("b", b"two")]).unwrap(),
    ]
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
    // The second blob's bytes change, its name (the digest the manifest gives) does not: the
    // bad digest is only known after the layer was applied.
    let good = hex(&layers[1]);
    let bad = layer_tar(&[("b", b"TWO")]).unwrap();
    assert_eq!(bad.len(), layers[1].len());
    OciLayoutBuilder::new()
        .layer(Layer::plain(layers[0].clone()))
        .layer(Layer::plain(layers[1].clone()).stored_as(bad.clone()))
        .write_oci(&s.image)
        .unwrap();
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
    crate::test_util::tar_dir(&s.image, &archive).unwrap();
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
    let dir = &s.image;
    let diff_ids = OciLayoutBuilder::new()
        .plain_layers(&two_layers())
        .config_name("cfg.json")
        .repo_tag("small:latest")
        .write_docker_save(dir)
        .unwrap()
        .diff_ids;
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

#[test]
fn gzip_and_zstd_layers_import_under_the_chain_ids_of_their_plain_tars() {
    let s = Store::new();
    let [a, b] = <[Vec<u8>; 2]>::try_from(two_layers()).unwrap();
    let built = OciLayoutBuilder::new()
        .layer(Layer::gzip(a))
        .layer(Layer::zstd(b))
        .write_oci(&s.image)
        .unwrap();
    // The blobs are compressed: their digests are not the DiffIDs.
    assert_ne!(built.layer_digests, built.diff_ids);
    let report = s.import().unwrap();
    let ids: Vec<String> = report.layers.iter().map(|l| l.id.to_string()).collect();
    assert_eq!(ids, built.layer_ids());
    assert_eq!(chain_ids(&built.diff_ids), built.chain_ids);
}
