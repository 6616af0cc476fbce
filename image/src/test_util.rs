//! Images written to disk for tests: OCI image layouts and `docker save` directories and
//! archives, built from layer tars, with the digests, DiffIDs and chain ids computed here with
//! SHA-256 alone (independently of the import code under test). Only with the `test-util`
//! feature; no program needs it.
//!
//! An [`OciLayoutBuilder`] describes one image: its [`Layer`]s (plain, gzip or zstd), and
//! optionally config DiffIDs other than the real ones, blobs whose bytes differ from their
//! descriptors, an OCI ref name, `docker save` repo tags and config name. It writes that image
//! as an OCI layout ([`OciLayoutBuilder::write_oci`], which adds to an existing layout, so
//! one layout can hold several images) or as a `docker save` directory
//! ([`OciLayoutBuilder::write_docker_save`]); [`tar_dir`] makes an OCI archive or a
//! `docker save` archive of either. What was written is described by a [`BuiltImage`].
//!
//! ```
//! use graphdriver_image::test_util::{Layer, OciLayoutBuilder, layer_tar};
//!
//! let tmp = tempfile::tempdir()?;
//! let dir = tmp.path().join("image");
//! let built = OciLayoutBuilder::new()
//!     .layer(Layer::gzip(layer_tar(&[("etc/", b""), ("etc/hostname", b"box\n")])?))
//!     .layer(Layer::plain(layer_tar(&[("etc/motd", b"hi\n")])?))
//!     .ref_name("v1")
//!     .write_oci(&dir)?;
//! assert!(dir.join("oci-layout").is_file() && dir.join("index.json").is_file());
//! // A bottom layer's chain id is its DiffID.
//! assert_eq!(built.chain_ids[0], built.diff_ids[0]);
//! let image = graphdriver_image::Image::open_tagged(&dir, Some("v1"))?;
//! assert_eq!(image.layers()[1].chain_id, built.chain_ids[1]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The media type of an uncompressed OCI layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// The media type of a gzip-compressed OCI layer.
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The media type of a zstd-compressed OCI layer.
pub const LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The media type of an OCI image config.
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The media type of an OCI image manifest.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI annotation naming an image in a layout (`oci:DIR:NAME`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// The OCI digest of `data`: `sha256:` and its hex SHA-256.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The chain ids (`sha256:...`) of layers given bottom first by their DiffIDs:
/// `ChainID(L0) = DiffID(L0)`, `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// A plain layer tar of `(path, contents)` entries: a path ending in `/` is a directory (mode
/// 0755, its contents ignored), anything else a regular file (mode 0644); owner 0:0 and a
/// fixed mtime, so the same entries always give the same bytes (and DiffID).
pub fn layer_tar(entries: &[(&str, &[u8])]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        let data: &[u8] = if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            &[]
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            data
        };
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, data)?;
    }
    b.into_inner()
}

/// Writes a tar of the tree at `dir` (its entries named relative to it, symbolic links stored
/// as links, not followed) to the file `out`: an OCI archive of an OCI layout, a `docker save`
/// archive of a `docker save` directory.
pub fn tar_dir(dir: &Path, out: &Path) -> io::Result<()> {
    let mut b = tar::Builder::new(fs::File::create(out)?);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)?;
    b.into_inner()?.flush()
}

/// One layer of an [`OciLayoutBuilder`] image: its uncompressed tar, how its blob is
/// compressed and, for negative tests, other bytes to store in place of the blob.
#[derive(Clone, Debug)]
pub struct Layer {
    tar: Vec<u8>,
    compression: archive::Compression,
    stored: Option<Vec<u8>>,
}

impl Layer {
    /// A layer whose blob is the tar itself (media type [`LAYER_TAR`]).
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer {
            tar,
            compression: archive::Compression::None,
            stored: None,
        }
    }

    /// A layer whose blob is the tar gzip-compressed (media type [`LAYER_TAR_GZIP`]).
    pub fn gzip(tar: Vec<u8>) -> Layer {
        Layer {
            compression: archive::Compression::Gzip,
            ..Layer::plain(tar)
        }
    }

    /// A layer whose blob is the tar zstd-compressed (media type [`LAYER_TAR_ZSTD`]).
    pub fn zstd(tar: Vec<u8>) -> Layer {
        Layer {
            compression: archive::Compression::Zstd,
            ..Layer::plain(tar)
        }
    }

    /// Stores `bytes` as the blob's file instead of the real blob, under the real blob's name:
    /// the manifest's descriptor (digest, size) still describes the real blob, so the file's
    /// digest (or its length) is deliberately wrong.
    pub fn stored_as(mut self, bytes: Vec<u8>) -> Layer {
        self.stored = Some(bytes);
        self
    }

    /// The uncompressed tar, whose digest is the layer's DiffID.
    pub fn tar(&self) -> &[u8] {
        &self.tar
    }

    /// The blob the descriptor describes: the tar, compressed as asked.
    pub fn blob(&self) -> io::Result<Vec<u8>> {
        let mut e =
            archive::Encoder::new(Vec::new(), self.compression).map_err(io::Error::other)?;
        e.write_all(&self.tar)?;
        e.finish()
    }

    fn media_type(&self) -> &'static str {
        match self.compression {
            archive::Compression::Gzip => LAYER_TAR_GZIP,
            archive::Compression::Zstd => LAYER_TAR_ZSTD,
            _ => LAYER_TAR,
        }
    }
}

/// What [`OciLayoutBuilder`] wrote for one image.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// OCI layout: the manifest's descriptor as `index.json` lists it. `docker save`: the
    /// image's entry of `manifest.json`.
    pub manifest: Value,
    /// The real DiffIDs (`sha256:...` of each uncompressed tar), bottom first, whatever the
    /// config claims.
    pub diff_ids: Vec<String>,
    /// The chain ids (`sha256:...`) of the real DiffIDs, bottom first.
    pub chain_ids: Vec<String>,
    /// The digests (`sha256:...`) of the layer blobs the manifest names (OCI layout; in a
    /// `docker save` directory the DiffIDs, the layers being stored uncompressed).
    pub layer_digests: Vec<String>,
    /// The layer files, relative to the image directory (`blobs/sha256/HEX`, `lN/layer.tar`).
    pub layer_paths: Vec<String>,
    /// The config file, relative to the image directory.
    pub config_path: String,
}

impl BuiltImage {
    /// The chain ids as bare hex: the layer ids an import creates.
    pub fn layer_ids(&self) -> Vec<String> {
        self.chain_ids
            .iter()
            .map(|c| c.trim_start_matches("sha256:").to_string())
            .collect()
    }
}

/// Writes one image, as an OCI image layout or a `docker save` directory (see the
/// [module](self) docs).
#[derive(Clone, Debug, Default)]
pub struct OciLayoutBuilder {
    layers: Vec<Layer>,
    diff_ids: Option<Vec<String>>,
    ref_name: Option<String>,
    repo_tags: Vec<String>,
    config_name: Option<String>,
}

impl OciLayoutBuilder {
    /// An image with no layers yet.
    pub fn new() -> OciLayoutBuilder {
        OciLayoutBuilder::default()
    }

    /// Adds `layer` on top of the layers so far.
    pub fn layer(mut self, layer: Layer) -> OciLayoutBuilder {
        self.layers.push(layer);
        self
    }

    /// Adds each of `tars` as a [`Layer::plain`], bottom first.
    pub fn plain_layers<'a>(self, tars: impl IntoIterator<Item = &'a Vec<u8>>) -> Self {
        tars.into_iter()
            .fold(self, |b, t| b.layer(Layer::plain(t.clone())))
    }

    /// The config lists `diff_ids` instead of the layers' real DiffIDs (a deliberately wrong
    /// config).
    pub fn config_diff_ids(mut self, diff_ids: Vec<String>) -> OciLayoutBuilder {
        self.diff_ids = Some(diff_ids);
        self
    }

    /// OCI layout: `index.json` names the image `name` (the annotation [`REF_NAME`]).
    pub fn ref_name(mut self, name: &str) -> OciLayoutBuilder {
        self.ref_name = Some(name.to_string());
        self
    }

    /// `docker save`: adds `tag` (`name:tag`) to the image's `RepoTags`.
    pub fn repo_tag(mut self, tag: &str) -> OciLayoutBuilder {
        self.repo_tags.push(tag.to_string());
        self
    }

    /// `docker save`: the config's file name (by default `HEX.json`, HEX its SHA-256, as
    /// docker writes it).
    pub fn config_name(mut self, name: &str) -> OciLayoutBuilder {
        self.config_name = Some(name.to_string());
        self
    }

    fn real_diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| digest(&l.tar)).collect()
    }

    /// The config's `rootfs` with the DiffIDs asked for (the real ones by default).
    fn rootfs(&self) -> Value {
        let ids = self
            .diff_ids
            .clone()
            .unwrap_or_else(|| self.real_diff_ids());
        json!({"type": "layers", "diff_ids": ids})
    }

    /// Writes the image into the OCI layout at `dir` (created if missing): its blobs under
    /// `blobs/sha256/`, `oci-layout`, and its manifest's descriptor appended to the
    /// `index.json` there (a new one if there is none).
    pub fn write_oci(&self, dir: &Path) -> io::Result<BuiltImage> {
        let mut layer_descs = Vec::new();
        let mut layer_digests = Vec::new();
        let mut layer_paths = Vec::new();
        for l in &self.layers {
            let blob = l.blob()?;
            let desc = descriptor(l.media_type(), &blob);
            layer_paths.push(blob_path(&blob));
            put_file(dir, &blob_path(&blob), l.stored.as_deref().unwrap_or(&blob))?;
            layer_digests.push(digest(&blob));
            layer_descs.push(desc);
        }
        let config = json!({"architecture": "amd64", "os": "linux", "rootfs": self.rootfs()});
        let config = config.to_string().into_bytes();
        put_file(dir, &blob_path(&config), &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": descriptor(CONFIG, &config),
            "layers": layer_descs,
        })
        .to_string()
        .into_bytes();
        put_file(dir, &blob_path(&manifest), &manifest)?;
        let mut desc = descriptor(MANIFEST, &manifest);
        if let Some(name) = &self.ref_name {
            desc["annotations"] = json!({ REF_NAME: name });
        }
        let index_path = dir.join("index.json");
        let mut index = match fs::read(&index_path) {
            Ok(data) => serde_json::from_slice::<Value>(&data).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                json!({"schemaVersion": 2, "manifests": []})
            }
            Err(e) => return Err(e),
        };
        let Some(list) = index.get_mut("manifests").and_then(Value::as_array_mut) else {
            return Err(io::Error::other(format!(
                "{} has no manifests list",
                index_path.display()
            )));
        };
        list.push(desc.clone());
        put_file(dir, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        put_file(dir, "index.json", index.to_string().as_bytes())?;
        let diff_ids = self.real_diff_ids();
        Ok(BuiltImage {
            manifest: desc,
            chain_ids: chain_ids(&diff_ids),
            diff_ids,
            layer_digests,
            layer_paths,
            config_path: blob_path(&config),
        })
    }

    /// Writes the image as a `docker save` directory (the legacy layout: `lN/layer.tar`, the
    /// config, and `manifest.json` listing this one image) at `dir` (created if missing).
    /// Layers are stored uncompressed, as docker does; [`Layer::stored_as`] bytes replace a
    /// layer's file here too.
    pub fn write_docker_save(&self, dir: &Path) -> io::Result<BuiltImage> {
        let mut layer_paths = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let path = format!("l{i}/layer.tar");
            put_file(dir, &path, l.stored.as_deref().unwrap_or(&l.tar))?;
            layer_paths.push(path);
        }
        // moby's config, read leniently: no architecture or os.
        let config = json!({"rootfs": self.rootfs()}).to_string().into_bytes();
        let config_path = self
            .config_name
            .clone()
            .unwrap_or_else(|| format!("{}.json", sha256_hex(&config)));
        put_file(dir, &config_path, &config)?;
        let entry = json!({
            "Config": config_path,
            "RepoTags": if self.repo_tags.is_empty() { Value::Null } else { json!(self.repo_tags) },
            "Layers": layer_paths,
        });
        put_file(dir, "manifest.json", json!([entry]).to_string().as_bytes())?;
        let diff_ids = self.real_diff_ids();
        Ok(BuiltImage {
            manifest: entry,
            chain_ids: chain_ids(&diff_ids),
            layer_digests: diff_ids.clone(),
            diff_ids,
            layer_paths,
            config_path,
        })
    }
}

/// The path of `data` as a blob of an OCI layout.
fn blob_path(data: &[u8]) -> String {
    format!("blobs/sha256/{}", sha256_hex(data))
}

/// An OCI descriptor of `data`.
fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(data), "size": data.len()})
}

/// Writes `data` to `dir/rel`, creating the directories on the way.
fn put_file(dir: &Path, rel: &str, data: &[u8]) -> io::Result<()> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, data)
}
