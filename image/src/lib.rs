//! Image import for graph drivers: OCI image layouts, OCI archives and `docker save` tars,
//! applied layer by layer to any [`graphdriver::Driver`].
//!
//! # Overview
//!
//! An image is a stack of layer tars plus the JSON that describes them. This crate reads that
//! JSON (on [`oci_spec`]'s types for OCI layouts; `docker save`'s own `manifest.json` with a
//! small struct of its own), picks the image a `PATH[:TAG]` spec names ([`split_spec`]), and
//! applies each layer through the driver's `create_pending` + `apply_diff`, naming every layer
//! by its chain id. It sits beside the drivers: it needs only the core contract
//! ([`graphdriver`]), the driver's bookkeeping ([`LayerStore`], where each layer's DiffID is
//! recorded) and `archive`'s decompression. `graphctl import` is a thin wrapper around
//! [`import`]; an engine calls the same function with its own driver and progress reporting.
//!
//! * **Sources.** An image directory (an OCI layout, or an extracted `docker save`), or a tar of
//!   one (an OCI archive, a `docker save` archive). The image is read only inside itself: no
//!   symlink or tar link is followed out of it, only regular files are read (a FIFO or a device
//!   is refused before a byte is read), and a blob is never read past its declared size.
//!   JSON documents are limited to [`MAX_JSON`] bytes; the tar index to [`MAX_ENTRIES`]
//!   entries, [`MAX_NAME_BYTES`] of names and [`MAX_EXTENDED`] per extended header.
//! * **Digests.** Every layer is read once, as a stream: the compressed blob goes through a
//!   SHA-256 hasher (checked against the manifest's digest, and its size against the declared
//!   size), is decompressed, goes through a second hasher (the DiffID, checked against the
//!   config's `rootfs.diff_ids`) and into the driver's `apply_diff`. Digests are only known at
//!   the end of the stream, so a mismatch removes the layer that was just applied.
//! * **Chain ids.** Layer ids are chain ids (OCI image spec, [`chain_id`]):
//!   `ChainID(L0) = DiffID(L0)`, `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`,
//!   written as bare hex.
//! * **Reuse.** A layer that already exists under a chain id is reused only if its recorded
//!   DiffID ([`LayerStore::diff_id`]) and parent are the ones the image needs; a layer another
//!   process is building is waited for.
//! * **Failure.** Any error removes every layer this import created: the store is left as it
//!   was. Errors are [`Error`]s naming the image path, the file or blob in the image, the
//!   digests expected and found, or the layer.
//!
//! Progress (which layer, how many bytes of its blob) is reported through [`Progress`], which
//! the caller implements (`()` reports nothing). [`Hashing`] and [`diff_id_to_end`] are the
//! streaming DiffID computation, for callers that apply a single layer tar themselves and
//! want to record its DiffID so that a later import can reuse the layer.
//!
//! # Example for engines
//!
//! A one-layer OCI layout written by hand, imported into a `vfs` store:
//!
//! ```
//! use std::fs;
//! use std::path::Path;
//! use sha2::{Digest, Sha256};
//!
//! // The in-tree drivers register themselves when linked.
//! use drivers as _;
//!
//! /// Writes `data` as a blob of the layout at `dir`; returns its descriptor.
//! fn blob(dir: &Path, media_type: &str, data: &[u8]) -> std::io::Result<serde_json::Value> {
//!     let hex = format!("{:x}", Sha256::digest(data));
//!     fs::create_dir_all(dir.join("blobs/sha256"))?;
//!     fs::write(dir.join("blobs/sha256").join(&hex), data)?;
//!     Ok(serde_json::json!({
//!         "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len(),
//!     }))
//! }
//!
//! let tmp = tempfile::tempdir()?;
//! let image = tmp.path().join("image");
//!
//! // One layer: an uncompressed tar holding `hello.txt`.
//! let mut tar = tar::Builder::new(Vec::new());
//! let mut header = tar::Header::new_ustar();
//! header.set_size(6);
//! header.set_mode(0o644);
//! tar.append_data(&mut header, "hello.txt", &b"hello\n"[..])?;
//! let layer = tar.into_inner()?;
//! let diff_id = format!("sha256:{:x}", Sha256::digest(&layer));
//!
//! // Its config, manifest and index.
//! let layer_desc = blob(&image, "application/vnd.oci.image.layer.v1.tar", &layer)?;
//! let config = serde_json::json!({
//!     "architecture": "amd64", "os": "linux",
//!     "rootfs": {"type": "layers", "diff_ids": [diff_id]},
//! });
//! let config_desc = blob(&image, "application/vnd.oci.image.config.v1+json",
//!     config.to_string().as_bytes())?;
//! let manifest = serde_json::json!({
//!     "schemaVersion": 2,
//!     "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!     "config": config_desc,
//!     "layers": [layer_desc],
//! });
//! let manifest_desc = blob(&image, "application/vnd.oci.image.manifest.v1+json",
//!     manifest.to_string().as_bytes())?;
//! fs::write(image.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
//! fs::write(image.join("index.json"),
//!     serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]}).to_string())?;
//!
//! // The engine's store: the vfs driver under a fresh root, and its bookkeeping.
//! let config = graphdriver::Config {
//!     driver: Some("vfs".into()),
//!     ..graphdriver::Config::new(tmp.path().join("root"))
//! };
//! let selected = graphdriver::open(&config)?;
//! let (store, _) = graphdriver::LayerStore::open(&selected.home, Default::default())?;
//!
//! // Import: `()` reports no progress.
//! let report = graphdriver_image::import(selected.driver.as_ref(), &store, &image, &())?;
//! let top = report.top.ok_or("the image has no layers")?;
//! // A bottom layer's chain id is its DiffID.
//! assert_eq!(format!("sha256:{top}"), diff_id);
//! assert!(report.layers[0].applied);
//! assert_eq!(store.diff_id(&top)?.as_deref(), Some(diff_id.as_str()));
//! println!("imported {top}");
//!
//! // Importing again reuses the layer: same top, nothing applied.
//! let again = graphdriver_image::import(selected.driver.as_ref(), &store, &image, &())?;
//! assert_eq!(again.top.as_ref(), Some(&top));
//! assert!(!again.layers[0].applied);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
// `Error` holds the driver's `graphdriver::Error` by value, as its `source`, so that a caller
// walking the chain can downcast to it (graphctl's hints do; a `Box` would hide the type). An
// import returns few results, each after I/O, so their size costs nothing measurable.
#![allow(clippy::result_large_err)]

mod apply;
mod digest;
mod error;
mod layout;
mod path;
mod source;
mod tar_index;
#[cfg(feature = "test-util")]
pub mod test_util;

use std::path::{Path, PathBuf};

use graphdriver::{Driver, LayerId, LayerStore};

pub use digest::{DigestHandle, Hashing, MAX_TRAILING, chain_id, chain_ids, diff_id_to_end};
pub use error::{Error, Result, TarProblem};
pub use tar_index::{MAX_ENTRIES, MAX_EXTENDED, MAX_NAME_BYTES};

/// The largest JSON document (index, manifest, config) read into memory.
pub const MAX_JSON: u64 = 4 << 20;

/// A layer of an image, as its manifest and config describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// The path of the layer's blob inside the image (`blobs/sha256/<hex>`, or a `docker save`
    /// name such as `<id>/layer.tar`).
    pub blob: String,
    /// The blob's digest (`sha256:…`), when the image gives one (OCI: always; `docker save`:
    /// only for content-addressed paths).
    pub digest: Option<String>,
    /// The blob's declared size in bytes, when the image gives one (OCI layouts).
    pub size: Option<u64>,
    /// The layer's DiffID (`sha256:…` of the uncompressed tar) from the image config.
    pub diff_id: String,
    /// The layer's chain id (`sha256:…`, see [`chain_id`]); its hex is the layer's id.
    pub chain_id: String,
}

/// One layer of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedLayer {
    /// The layer's id: its chain id as hex.
    pub id: LayerId,
    /// The DiffID (`sha256:…` of the uncompressed tar).
    pub diff_id: String,
    /// Where the layer came from in the image.
    pub blob: String,
    /// False when the layer was already present (with this DiffID and parent) and reused.
    pub applied: bool,
    /// Bytes applied, as the driver's `apply_diff` counts them (0 when reused).
    pub size: u64,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The top layer's id; `None` for an image without layers.
    pub top: Option<LayerId>,
    /// Every layer, bottom first.
    pub layers: Vec<ImportedLayer>,
}

/// A layer about to be applied, as told to [`Progress::layer_started`].
#[derive(Debug, Clone, Copy)]
pub struct LayerStart<'a> {
    /// The layer's position, 0 for the bottom layer.
    pub index: usize,
    /// How many layers the image has.
    pub count: usize,
    /// The layer's id (its chain id as hex).
    pub id: &'a LayerId,
    /// The path of its blob inside the image.
    pub blob: &'a str,
}

/// What an import tells its caller while it works; every method does nothing by default, and
/// `()` implements the trait reporting nothing.
///
/// All calls are made on the thread that called [`import`], in this order for each layer that
/// is applied: [`layer_started`](Self::layer_started), any number of
/// [`blob_read`](Self::blob_read), then [`layer_applied`](Self::layer_applied) once the driver's
/// `apply_diff` returned (whether or not it succeeded). Reused layers get no call.
pub trait Progress {
    /// Layer `layer` starts; its blob holds `blob_len` bytes (compressed, as stored).
    fn layer_started(&self, layer: &LayerStart<'_>, blob_len: u64) {
        let _ = (layer, blob_len);
    }
    /// `bytes` more bytes of the current layer's blob were read.
    fn blob_read(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The driver's `apply_diff` of layer `id` returned; the digests are checked after this.
    fn layer_applied(&self, id: &LayerId) {
        let _ = id;
    }
    /// Another process is building layer `id`; the import waits for it (said once per layer).
    fn waiting(&self, id: &LayerId) {
        let _ = id;
    }
}

impl Progress for () {}

/// An opened image: its layer list read and checked (index, manifest and config digests),
/// its layer blobs not yet read.
pub struct Image {
    path: PathBuf,
    source: source::Source,
    layers: Vec<LayerRef>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Opens the image an image spec `PATH[:TAG]` names (see [`split_spec`]) and reads its layer
    /// list.
    pub fn open(spec: &Path) -> Result<Image> {
        let (path, tag) = split_spec(spec);
        Image::open_tagged(&path, tag.as_deref())
    }

    /// Opens the image directory or tar at `path` and reads the layer list of the image `tag`
    /// names (an OCI `org.opencontainers.image.ref.name` or `io.containerd.image.name`
    /// annotation, or a `docker save` repo tag; `busybox` matches `docker.io/library/busybox:latest`).
    /// Without a tag the path must hold one image.
    pub fn open_tagged(path: &Path, tag: Option<&str>) -> Result<Image> {
        let source = source::Source::new(path)?;
        let layers = layout::layers_of(&source, tag)?;
        Ok(Image {
            path: path.to_path_buf(),
            source,
            layers,
        })
    }

    /// The image's layers, bottom first, with their chain ids.
    pub fn layers(&self) -> &[LayerRef] {
        &self.layers
    }

    /// Applies the image's layers to `driver`, whose bookkeeping is `store` (the DiffID
    /// records): see the [crate docs](crate). On error, every layer this call created is removed.
    pub fn import(
        &self,
        driver: &dyn Driver,
        store: &LayerStore,
        progress: &dyn Progress,
    ) -> Result<Report> {
        apply::import_layers(driver, store, &self.source, &self.layers, progress)
    }
}

/// Imports the image `spec` (`PATH[:TAG]`, see [`split_spec`]) into `driver`, whose
/// bookkeeping is `store` (the DiffID records): [`Image::open`] then [`Image::import`].
///
/// On success every layer of the image exists under its chain id, with its DiffID recorded;
/// on error the store holds the layers it held before.
pub fn import(
    driver: &dyn Driver,
    store: &LayerStore,
    spec: &Path,
    progress: &dyn Progress,
) -> Result<Report> {
    Image::open(spec)?.import(driver, store, progress)
}

/// Splits an image spec `PATH[:TAG]` into the path and the tag.
///
/// If the whole spec names an existing file or directory, it is the path (no tag). Otherwise
/// it is split at the first `:` whose left part exists, and everything after that `:` is the
/// tag (which may itself contain `:`, as `busybox:latest` does). If no prefix exists the whole
/// spec is returned as the path, so the error names it.
pub fn split_spec(spec: &Path) -> (PathBuf, Option<String>) {
    use std::os::unix::ffi::OsStrExt;
    if spec.symlink_metadata().is_ok() {
        return (spec.to_path_buf(), None);
    }
    let bytes = spec.as_os_str().as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b':') {
        let path = Path::new(std::ffi::OsStr::from_bytes(&bytes[..i]));
        if i > 0 && path.symlink_metadata().is_ok() {
            let tag = String::from_utf8_lossy(&bytes[i + 1..]).into_owned();
            return (path.to_path_buf(), Some(tag));
        }
    }
    (spec.to_path_buf(), None)
}

#[cfg(test)]
mod tests;
