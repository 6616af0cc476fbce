//! Importing images: OCI image layouts and `docker save` archives, from a directory or a tar.
//!
//! Every layer is read once, as a stream: the compressed blob goes through a limit of its
//! declared size and a SHA-256 hasher (checked against the manifest's digest), is decompressed,
//! goes through a second hasher (the DiffID, checked against the config's `rootfs.diff_ids`)
//! and into the driver's `apply_diff`. Digests are only known at the end of the stream, so a
//! mismatch removes the layer that was just applied; any failure removes every layer this
//! import created, leaving the store as it was. Layer ids are chain ids (OCI image spec):
//! ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)), written
//! as bare hex.
//!
//! The image is read only inside itself (see [`source`]): no symlink leads out of an image
//! directory or tar, only regular files are read, and a blob is never read past its declared
//! size. Each layer applied records its DiffID in the store
//! ([`LayerStore::set_diff_id`]); a layer that already exists under a chain id is reused only
//! if its recorded DiffID and parent are the ones the image needs.
//!
//! An image spec is `PATH[:TAG]`: see [`split_spec`].

mod source;
mod tar_index;

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use graphdriver::{Driver, LayerId, LayerStore};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use source::{Limited, Source};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;
/// The most bytes `graphctl apply` reads after the end of a tar to hash the whole stream.
const MAX_TRAILING: u64 = 1 << 20;

/// One layer of an import.
#[derive(Debug)]
pub struct ImportedLayer {
    /// The layer's id: its chain id as hex.
    pub id: LayerId,
    /// The DiffID (`sha256:…` of the uncompressed tar).
    pub diff_id: String,
    /// Where the layer came from in the image.
    pub blob: String,
    /// False when the layer was already present (with this DiffID) and reused.
    pub applied: bool,
    /// Bytes applied (0 when reused).
    pub size: u64,
}

/// What an import did.
#[derive(Debug)]
pub struct Report {
    /// The top layer's id; `None` for an image without layers.
    pub top: Option<LayerId>,
    /// Every layer, bottom first.
    pub layers: Vec<ImportedLayer>,
}

/// A layer to apply: where its blob is and what it must hash to.
struct LayerRef {
    /// The path of the blob inside the image.
    path: String,
    /// The blob's digest (`sha256:…`) and declared size, when the image gives them.
    digest: Option<(String, Option<u64>)>,
    /// The expected DiffID.
    diff_id: String,
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

/// Imports the image `spec` (`PATH[:TAG]`, see [`split_spec`]) into `driver`, whose
/// bookkeeping is `store` (the DiffID records).
pub fn import(driver: &dyn Driver, store: &LayerStore, spec: &Path) -> Result<Report> {
    let (path, tag) = split_spec(spec);
    let source = Source::new(&path)?;
    let layers = layers_of(&source, tag.as_deref())?;
    let mut created: Vec<LayerId> = Vec::new();
    let result = apply_all(driver, store, &source, &layers, &mut created);
    if result.is_err() {
        for id in created.iter().rev().filter(|id| driver.exists(id)) {
            if let Err(e) = driver.remove(id) {
                tracing::error!(layer = %id, error = %e, "could not remove a layer of a failed import");
            }
        }
    }
    result
}

/// The layers of the image `tag` selects (or the only image) in `source`.
fn layers_of(source: &Source, tag: Option<&str>) -> Result<Vec<LayerRef>> {
    if source.has("index.json") {
        let index: Index = serde_json::from_slice(&read_small(source, "index.json", None)?)
            .context("parse index.json")?;
        match index.manifests {
            Some(m) if !m.is_empty() => return oci_layers(source, m, tag),
            // `docker load` falls back to manifest.json when the index lists nothing.
            _ if source.has("manifest.json") => {}
            _ => bail!("index.json lists no manifests"),
        }
    } else if !source.has("manifest.json") {
        bail!(
            "expected an OCI image layout (index.json) or a `docker save` archive (manifest.json), found neither"
        );
    }
    docker_layers(source, tag)
}

fn apply_all(
    driver: &dyn Driver,
    store: &LayerStore,
    source: &Source,
    layers: &[LayerRef],
    created: &mut Vec<LayerId>,
) -> Result<Report> {
    let mut report = Report {
        top: None,
        layers: Vec::new(),
    };
    let target = Target {
        driver,
        store,
        source,
    };
    let mut chain: Option<String> = None;
    for (n, layer) in layers.iter().enumerate() {
        let next = match &chain {
            None => layer.diff_id.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex(&Sha256::digest(format!("{prev} {}", layer.diff_id)))
            ),
        };
        let id = LayerId::new(next.trim_start_matches("sha256:"))?;
        let parent = report.top.clone();
        let message = format!("layer {}/{}", n + 1, layers.len());
        let applied = if driver.exists(&id) {
            None
        } else {
            target.apply_or_wait(layer, &id, parent.as_ref(), created, &message)?
        };
        if let Some(size) = applied {
            store
                .set_diff_id(&id, &layer.diff_id)
                .with_context(|| format!("record the DiffID of layer {id}"))?;
            report.layers.push(ImportedLayer {
                id: id.clone(),
                diff_id: layer.diff_id.clone(),
                blob: layer.path.clone(),
                applied: true,
                size,
            });
        } else {
            check_reuse(driver, store, &id, parent.as_ref(), &layer.diff_id)?;
            tracing::info!(layer = %id, "already present with the same DiffID, reused");
            report.layers.push(ImportedLayer {
                id: id.clone(),
                diff_id: layer.diff_id.clone(),
                blob: layer.path.clone(),
                applied: false,
                size: 0,
            });
        }
        chain = Some(next);
        report.top = Some(id);
    }
    Ok(report)
}

/// Where an import writes: the driver, its bookkeeping (DiffID records) and the image read.
#[derive(Clone, Copy)]
struct Target<'a> {
    driver: &'a dyn Driver,
    store: &'a LayerStore,
    source: &'a Source,
}

impl Target<'_> {
    /// Applies `layer` as new layer `id`, or, when another process is building the same layer
    /// (a concurrent import of an image with a common base), waits until it is done: `Some(size)`
    /// if this process applied it, `None` if the other's finished layer is there to reuse. A
    /// layer another process left half-built when it died is removed and applied again.
    fn apply_or_wait(
        &self,
        layer: &LayerRef,
        id: &LayerId,
        parent: Option<&LayerId>,
        created: &mut Vec<LayerId>,
        message: &str,
    ) -> Result<Option<u64>> {
        let Target { driver, store, .. } = *self;
        let mut said = false;
        let mut abandoned = 0;
        loop {
            let err = match self.apply_one(layer, id, parent, created, message.to_string()) {
                Ok(size) => return Ok(Some(size)),
                Err(e) => e,
            };
            if !matches!(
                err.downcast_ref::<graphdriver::Error>(),
                Some(graphdriver::Error::AlreadyExists(_))
            ) {
                return Err(err);
            }
            // Taken meanwhile: finished, being built by another process, or abandoned.
            loop {
                if driver.exists(id) {
                    return Ok(None);
                }
                if !store.is_being_built(id)? {
                    break;
                }
                if !said {
                    eprintln!("waiting for another process that is building layer {id}");
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            abandoned += 1;
            if abandoned > 3 {
                return Err(err.context(format!(
                    "layer {id} exists but is incomplete and could not be removed"
                )));
            }
            if let Err(e) = driver.remove(id) {
                tracing::warn!(layer = %id, error = %e, "could not remove an abandoned layer");
            }
        }
    }

    /// Creates layer `id` on `parent` and applies `layer`'s blob, verifying both digests.
    fn apply_one(
        &self,
        layer: &LayerRef,
        id: &LayerId,
        parent: Option<&LayerId>,
        created: &mut Vec<LayerId>,
        message: String,
    ) -> Result<u64> {
        let Target {
            driver,
            store,
            source,
        } = *self;
        let blob = &layer.path;
        let declared = layer.digest.as_ref().and_then(|(d, s)| s.map(|s| (d, s)));
        let opened = source.open(blob)?;
        let len = opened.len;
        let reader: Box<dyn Read + Send> = match declared {
            Some((digest, size)) => {
                if len > size {
                    bail!(
                        "blob {digest} ({blob}): longer than its declared size of {size} bytes (the file has {len} bytes)"
                    );
                }
                Box::new(Limited::new(
                    opened.reader,
                    size,
                    format!("{digest} ({blob})"),
                ))
            }
            None => opened.reader,
        };
        let bar = crate::commands::progress_bar(Some(len), message);
        let (compressed, blob_state) = Hashing::new(reader, Some(bar.clone()));
        let plain = archive::decompress(compressed).with_context(|| format!("read blob {blob}"))?;
        let (mut plain, diff_state) = Hashing::new(plain, None);
        driver.create_pending(id, parent)?;
        created.push(id.clone());
        // Recorded while the layer is still pending (invisible to other processes), so it is
        // published together with its DiffID: a concurrent import that finds it can check it, and
        // one killed between the apply and the record does not leave a layer without one.
        store
            .set_diff_id(id, &layer.diff_id)
            .with_context(|| format!("record the DiffID of layer {id}"))?;
        let applied = driver
            .apply_diff(id, parent, &mut plain)
            .with_context(|| format!("apply blob {blob} as layer {id}"))?;
        // The tar may end before the stream does (padding): hash all of it.
        io::copy(&mut plain, &mut io::sink()).with_context(|| format!("read blob {blob}"))?;
        drop(plain);
        bar.finish_and_clear();
        crate::commands::warn_skipped();
        if let Some((want, want_size)) = &layer.digest {
            let (got, size) = finish(&blob_state)?;
            if let Some(want_size) = want_size
                && *want_size != size
            {
                bail!(
                    "blob {want} ({blob}): size mismatch: declared {want_size} bytes, found {size}"
                );
            }
            if &got != want {
                bail!(
                    "blob {blob}: digest mismatch: expected {want}, found {got}; the image is corrupt"
                );
            }
        }
        let (got, _) = finish(&diff_state)?;
        if got != layer.diff_id {
            bail!(
                "blob {blob}: uncompressed digest (DiffID) mismatch: expected {} from the image config, found {got}; the image is corrupt",
                layer.diff_id
            );
        }
        Ok(applied)
    }
}

/// Fails unless existing layer `id` was made from `diff_id` on `parent`.
fn check_reuse(
    driver: &dyn Driver,
    store: &LayerStore,
    id: &LayerId,
    parent: Option<&LayerId>,
    diff_id: &str,
) -> Result<()> {
    let advice = "remove it (graphctl rm) or import into another root";
    let recorded = store
        .diff_id(id)
        .with_context(|| format!("layer {id} exists"))?;
    if recorded.as_deref() != Some(diff_id) {
        let found = match &recorded {
            Some(d) => format!("with DiffID {d}"),
            None => "with no recorded DiffID".to_string(),
        };
        bail!("layer {id} exists {found}, the image needs {diff_id}: {advice}");
    }
    let got = driver.parent(id)?;
    if got.as_ref() != parent {
        let name = |p: Option<&LayerId>| p.map_or("none".to_string(), |p| p.to_string());
        bail!(
            "layer {id} exists with parent {}, the image needs parent {}: {advice}",
            name(got.as_ref()),
            name(parent)
        );
    }
    Ok(())
}

/// Hashes and counts what passes through; the state is shared so it can be read after the
/// reader has been handed to a decompressor.
pub(crate) struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
    bar: Option<indicatif::ProgressBar>,
}

/// The digest state a [`Hashing`] reader feeds.
pub(crate) type HashState = Arc<Mutex<(Sha256, u64)>>;

impl<R> Hashing<R> {
    /// Wraps `inner`; the returned state yields the digest with [`finish`].
    pub(crate) fn new(inner: R, bar: Option<indicatif::ProgressBar>) -> (Self, HashState) {
        let state = Arc::new(Mutex::new((Sha256::new(), 0)));
        (
            Hashing {
                inner,
                state: state.clone(),
                bar,
            },
            state,
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = buf.get(..n).unwrap_or_default();
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("hasher lock poisoned"))?;
        st.0.update(data);
        st.1 += n as u64;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }
}

/// Takes the digest (`sha256:…`) and byte count out of a shared hasher.
pub(crate) fn finish(state: &HashState) -> Result<(String, u64)> {
    let st = state.lock().map_err(|_| anyhow!("hasher lock poisoned"))?;
    Ok((format!("sha256:{}", hex(&st.0.clone().finalize())), st.1))
}

/// Records the DiffID of layer `id` that `graphctl apply` just made from `plain` in the store
/// at driver home `home` (`plain` is read to its end first: the tar may end before the stream
/// does, and the DiffID covers all of it; more than [`MAX_TRAILING`] bytes after the tar's end,
/// as from a stream that never ends, and nothing is recorded). A failure only loses the record
/// (import then refuses to reuse the layer), so it is logged, not returned: the DiffID
/// recorded is returned, `None` when none was.
pub(crate) fn record_diff_id(
    home: &Path,
    id: &LayerId,
    plain: &mut impl Read,
    state: &HashState,
) -> Option<String> {
    let result = io::copy(&mut plain.take(MAX_TRAILING + 1), &mut io::sink())
        .map_err(anyhow::Error::from)
        .and_then(|n| {
            if n > MAX_TRAILING {
                bail!("more than {MAX_TRAILING} bytes follow the end of the tar");
            }
            finish(state)
        })
        .and_then(|(d, _)| {
            LayerStore::open(home, graphdriver::Durability::default())?
                .0
                .set_diff_id(id, &d)?;
            Ok(d)
        });
    match result {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(layer = %id, error = %e, "could not record the layer's DiffID");
            None
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `sha256:<64 lowercase hex>` and returns the hex.
fn sha256_hex(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => bail!("expected a digest sha256:<64 hex digits>, found {digest:?}"),
    }
}

/// Reads the small file (JSON) `name` of the image whole, refusing anything over
/// [`MAX_JSON`] or over its declared size (`declared`: digest and size).
fn read_small(source: &Source, name: &str, declared: Option<(&str, u64)>) -> Result<Vec<u8>> {
    let opened = source.open(name)?;
    let limit = match declared {
        Some((digest, size)) => {
            if size > MAX_JSON {
                bail!(
                    "blob {digest}: declared size {size} bytes, expected at most {MAX_JSON} for a JSON document"
                );
            }
            if opened.len > size {
                bail!(
                    "blob {digest} ({name}): longer than its declared size of {size} bytes (the file has {} bytes)",
                    opened.len
                );
            }
            size
        }
        None => MAX_JSON,
    };
    if opened.len > limit {
        bail!(
            "{name}: {} bytes, expected at most {MAX_JSON} for a JSON document",
            opened.len
        );
    }
    let what = declared.map_or_else(|| name.to_string(), |(d, _)| format!("{d} ({name})"));
    let mut buf = Vec::new();
    Limited::new(opened.reader, limit, what)
        .read_to_end(&mut buf)
        .with_context(|| format!("read {name}"))?;
    Ok(buf)
}

// === OCI image layout ===

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: Option<u64>,
    platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The OCI annotation naming an image in a layout (`oci:DIR:NAME`).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd and docker 25+ write with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

impl Descriptor {
    /// The names this entry answers to.
    fn names(&self) -> Vec<&str> {
        let Some(a) = &self.annotations else {
            return Vec::new();
        };
        [REF_NAME, CONTAINERD_NAME]
            .iter()
            .filter_map(|k| a.get(*k).map(String::as_str))
            .collect()
    }
}

#[derive(Deserialize)]
struct Platform {
    os: Option<String>,
    architecture: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// Whether `tag` selects an image named `name`: equal, or equal as docker references
/// (`busybox` = `busybox:latest` = `docker.io/library/busybox:latest`).
fn tag_matches(name: &str, tag: &str) -> bool {
    name == tag || docker_ref(name) == docker_ref(tag)
}

/// The fully qualified form of a docker image reference: registry `docker.io` and namespace
/// `library` added where docker adds them, tag `latest` where there is neither tag nor digest.
fn docker_ref(r: &str) -> String {
    let last = r.rsplit('/').next().unwrap_or(r);
    let full = if last.contains(':') || last.contains('@') {
        r.to_string()
    } else {
        format!("{r}:latest")
    };
    match full.split_once('/') {
        None => format!("docker.io/library/{full}"),
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            full
        }
        Some(_) => format!("docker.io/{full}"),
    }
}

/// Picks the entries of the top-level index that make up the one image to import: those
/// `tag` names, or, without a tag, all of them if they are one image (no names, or one name);
/// several named images without a tag is an error listing them.
fn select_oci(manifests: Vec<Descriptor>, tag: Option<&str>) -> Result<Vec<Descriptor>> {
    let label = |d: &Descriptor| -> String {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME).or_else(|| a.get(CONTAINERD_NAME)))
            .cloned()
            .unwrap_or_else(|| format!("(unnamed) {}", d.digest))
    };
    let mut labels: Vec<String> = manifests.iter().map(label).collect();
    labels.sort();
    labels.dedup();
    match tag {
        Some(tag) => {
            let (hit, _): (Vec<_>, Vec<_>) = manifests
                .into_iter()
                .partition(|d| d.names().iter().any(|n| tag_matches(n, tag)));
            if hit.is_empty() {
                bail!(
                    "the image layout has no image named {tag:?}; it has: {}",
                    labels.join(", ")
                );
            }
            let mut names: Vec<String> = hit.iter().map(label).collect();
            names.sort();
            names.dedup();
            if names.len() > 1 {
                bail!(
                    "{tag:?} names {} images of the layout: {}; give the exact name",
                    names.len(),
                    names.join(", ")
                );
            }
            Ok(hit)
        }
        None => {
            let named = manifests.iter().any(|d| !d.names().is_empty());
            if named && labels.len() > 1 {
                bail!(
                    "the image layout holds {} images; choose one with PATH:NAME: {}",
                    labels.len(),
                    labels.join(", ")
                );
            }
            Ok(manifests)
        }
    }
}

/// Picks the manifest for this host from an index's entries.
fn pick(manifests: &[Descriptor]) -> Result<&Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|d| {
            d.platform.as_ref().is_none_or(|p| {
                p.os.as_deref().is_none_or(|o| o == "linux")
                    && p.architecture.as_deref().is_none_or(|a| a == arch)
            })
        })
        .or(manifests.first())
        .ok_or_else(|| anyhow!("the image index lists no manifests"))
}

/// Reads and verifies the blob `desc` names, as JSON.
fn read_blob_json<T: serde::de::DeserializeOwned>(source: &Source, desc: &Descriptor) -> Result<T> {
    let hex = sha256_hex(&desc.digest)?;
    let path = format!("blobs/sha256/{hex}");
    let bytes = read_small(source, &path, desc.size.map(|s| (desc.digest.as_str(), s)))?;
    let got = format!("sha256:{}", self::hex(&Sha256::digest(&bytes)));
    if got != desc.digest {
        bail!(
            "blob {path}: digest mismatch: expected {}, found {got}; the image is corrupt",
            desc.digest
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("parse {path}"))
}

fn oci_layers(
    source: &Source,
    manifests: Vec<Descriptor>,
    tag: Option<&str>,
) -> Result<Vec<LayerRef>> {
    let top = select_oci(manifests, tag)?;
    let mut desc = pick(&top)?;
    let mut nested: Index;
    let mut nested_list: Vec<Descriptor>;
    let mut depth = 0;
    while INDEX_TYPES.contains(&desc.media_type.as_str()) {
        depth += 1;
        if depth > 4 {
            bail!("index.json: image indexes nest too deeply");
        }
        nested = read_blob_json(source, desc)?;
        nested_list = nested.manifests.take().unwrap_or_default();
        desc = pick(&nested_list)?;
    }
    let manifest: Manifest = read_blob_json(source, desc)?;
    let config: ImageConfig = read_blob_json(source, &manifest.config)?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        bail!(
            "the manifest lists {} layers but the config has {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        );
    }
    let mut out = Vec::new();
    for (layer, diff_id) in manifest.layers.into_iter().zip(diff_ids) {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            bail!(
                "layer {}: unsupported media type {:?} (expected a tar, tar+gzip or tar+zstd layer)",
                layer.digest,
                layer.media_type
            );
        }
        sha256_hex(&diff_id).context("config rootfs.diff_ids")?;
        let hex = sha256_hex(&layer.digest)?;
        let Some(size) = layer.size else {
            bail!("layer {}: the manifest gives no size", layer.digest);
        };
        out.push(LayerRef {
            path: format!("blobs/sha256/{hex}"),
            digest: Some((layer.digest.clone(), Some(size))),
            diff_id,
        });
    }
    Ok(out)
}

// === docker save ===

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a content-addressed `docker save` path encodes: `blobs/sha256/<hex>` (docker
/// 25+). Other names (`<id>.json`, `<id>/layer.tar`) are only names: moby reads them by name.
fn digest_in_path(path: &str) -> Option<String> {
    let hex = path.strip_prefix("blobs/sha256/")?;
    let digest = format!("sha256:{hex}");
    sha256_hex(&digest).ok()?;
    Some(digest)
}

fn docker_layers(source: &Source, tag: Option<&str>) -> Result<Vec<LayerRef>> {
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&read_small(source, "manifest.json", None)?)
            .context("parse manifest.json")?;
    let label = |m: &DockerManifest| -> String {
        match m.repo_tags.as_deref() {
            Some(t) if !t.is_empty() => t.join(" "),
            _ => format!("(untagged) {}", m.config),
        }
    };
    let labels: Vec<String> = manifests.iter().map(label).collect();
    let manifest = match tag {
        Some(tag) => manifests
            .into_iter()
            .find(|m| m.repo_tags.iter().flatten().any(|t| tag_matches(t, tag)))
            .ok_or_else(|| {
                anyhow!(
                    "manifest.json has no image tagged {tag:?}; it has: {}",
                    labels.join(", ")
                )
            })?,
        None => {
            if manifests.len() > 1 {
                bail!(
                    "manifest.json lists {} images; choose one with PATH:TAG: {}",
                    manifests.len(),
                    labels.join(", ")
                );
            }
            manifests
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("manifest.json lists no images"))?
        }
    };
    let bytes = read_small(source, &manifest.config, None)?;
    if let Some(want) = digest_in_path(&manifest.config) {
        let got = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        if got != want {
            bail!(
                "blob {}: digest mismatch: expected {want}, found {got}; the image is corrupt",
                manifest.config
            );
        }
    }
    let config: ImageConfig =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", manifest.config))?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        bail!(
            "manifest.json lists {} layers but the config has {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        );
    }
    let mut out = Vec::new();
    for (path, diff_id) in manifest.layers.into_iter().zip(diff_ids) {
        sha256_hex(&diff_id).context("config rootfs.diff_ids")?;
        out.push(LayerRef {
            digest: digest_in_path(&path).map(|d| (d, None)),
            path,
            diff_id,
        });
    }
    Ok(out)
}

/// Normalizes a path inside the image: no absolute paths, no `..`, `.` dropped.
fn normalize(path: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| anyhow!("path {path:?} in the image is not UTF-8"))?,
            ),
            Component::CurDir => {}
            _ => bail!("path {path:?} in the image must be relative and stay inside the image"),
        }
    }
    if parts.is_empty() {
        bail!("empty path in the image");
    }
    Ok(parts.join("/"))
}

/// Resolves `..` inside a link target relative to the archive root.
fn normalize_dots(path: &str) -> Result<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("link target {path:?} leaves the archive");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize("./blobs/sha256/ab").unwrap(), "blobs/sha256/ab");
        assert!(normalize("../etc/passwd").is_err());
        assert!(normalize("/etc/passwd").is_err());
        assert_eq!(normalize_dots("a/../b/layer.tar").unwrap(), "b/layer.tar");
        assert!(normalize_dots("../x").is_err());
    }

    #[test]
    fn digests_are_checked() {
        let h = "a".repeat(64);
        assert_eq!(sha256_hex(&format!("sha256:{h}")).unwrap(), h);
        assert!(sha256_hex("sha256:../../x").is_err());
        assert!(sha256_hex(&format!("sha512:{h}")).is_err());
        assert_eq!(
            digest_in_path(&format!("blobs/sha256/{h}")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(digest_in_path("abc/layer.tar"), None);
        for (name, tag) in [
            ("docker.io/library/busybox:latest", "busybox"),
            ("busybox:latest", "docker.io/library/busybox"),
            ("quay.io/x/y:1", "quay.io/x/y:1"),
            ("docker.io/x/y:latest", "x/y"),
        ] {
            assert!(tag_matches(name, tag), "{name} {tag}");
        }
        assert!(!tag_matches("busybox:1", "busybox"));
        assert!(!tag_matches("localhost:5000/a", "a"));
        assert_eq!(digest_in_path(&format!("{h}.json")), None);
    }
}
