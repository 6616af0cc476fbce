//! Importing images: OCI image layouts and `docker save` archives, from a directory or a tar.
//!
//! Every layer is read once, as a stream: the compressed blob goes through a SHA-256 hasher
//! (checked against the manifest's digest), is decompressed, goes through a second hasher (the
//! DiffID, checked against the config's `rootfs.diff_ids`) and into the driver's `apply_diff`.
//! Digests are only known at the end of the stream, so a mismatch removes the layer that was
//! just applied; any failure removes every layer this import created, leaving the store as it
//! was. Layer ids are chain ids (OCI image spec): ChainID(L0) = DiffID(L0),
//! ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)), written as bare hex.
//!
//! A tar input is indexed once (entry name to offset and size) and blobs are read by seeking
//! into it, so memory stays bounded and nothing is extracted to disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use graphdriver::{Driver, LayerId};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;
/// The most entries indexed in an image tar.
const MAX_TAR_ENTRIES: usize = 1_000_000;

/// One layer of an import.
#[derive(Debug)]
pub struct ImportedLayer {
    /// The layer's id: its chain id as hex.
    pub id: LayerId,
    /// The DiffID (`sha256:…` of the uncompressed tar).
    pub diff_id: String,
    /// Where the layer came from in the image.
    pub blob: String,
    /// False when the layer was already present and skipped.
    pub applied: bool,
    /// Bytes applied (0 when skipped).
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
    /// The blob's digest (`sha256:…`) and size, when the manifest gives them (OCI).
    digest: Option<(String, Option<u64>)>,
    /// The expected DiffID.
    diff_id: String,
}

/// Imports the image at `path` into `driver`.
pub fn import(driver: &dyn Driver, path: &Path) -> Result<Report> {
    let source = Source::new(path)?;
    let layers = if source.has("index.json") {
        oci_layers(&source)?
    } else if source.has("manifest.json") {
        docker_layers(&source)?
    } else {
        bail!(
            "expected an OCI image layout (index.json) or a `docker save` archive (manifest.json), found neither"
        );
    };
    let mut created: Vec<LayerId> = Vec::new();
    let result = apply_all(driver, &source, &layers, &mut created);
    if result.is_err() {
        for id in created.iter().rev().filter(|id| driver.exists(id)) {
            if let Err(e) = driver.remove(id) {
                tracing::error!(layer = %id, error = %e, "could not remove a layer of a failed import");
            }
        }
    }
    result
}

fn apply_all(
    driver: &dyn Driver,
    source: &Source,
    layers: &[LayerRef],
    created: &mut Vec<LayerId>,
) -> Result<Report> {
    let mut report = Report {
        top: None,
        layers: Vec::new(),
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
        if driver.exists(&id) {
            tracing::info!(layer = %id, "already present, skipped");
            report.layers.push(ImportedLayer {
                id: id.clone(),
                diff_id: layer.diff_id.clone(),
                blob: layer.path.clone(),
                applied: false,
                size: 0,
            });
        } else {
            let message = format!("layer {}/{}", n + 1, layers.len());
            let size = apply_one(
                driver,
                source,
                layer,
                &id,
                parent.as_ref(),
                created,
                message,
            )?;
            report.layers.push(ImportedLayer {
                id: id.clone(),
                diff_id: layer.diff_id.clone(),
                blob: layer.path.clone(),
                applied: true,
                size,
            });
        }
        chain = Some(next);
        report.top = Some(id);
    }
    Ok(report)
}

/// Hashes and counts what passes through; the state is shared so it can be read after the
/// reader has been handed to a decompressor.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
    bar: Option<indicatif::ProgressBar>,
}

impl<R> Hashing<R> {
    fn new(inner: R, bar: Option<indicatif::ProgressBar>) -> (Self, Arc<Mutex<(Sha256, u64)>>) {
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
fn finish(state: &Arc<Mutex<(Sha256, u64)>>) -> Result<(String, u64)> {
    let st = state.lock().map_err(|_| anyhow!("hasher lock poisoned"))?;
    Ok((format!("sha256:{}", hex(&st.0.clone().finalize())), st.1))
}

/// Creates layer `id` on `parent` and applies `layer`'s blob, verifying both digests.
fn apply_one(
    driver: &dyn Driver,
    source: &Source,
    layer: &LayerRef,
    id: &LayerId,
    parent: Option<&LayerId>,
    created: &mut Vec<LayerId>,
    message: String,
) -> Result<u64> {
    let blob = &layer.path;
    let (reader, len) = source.open(blob)?;
    let bar = crate::commands::progress_bar(Some(len), message);
    let (compressed, blob_state) = Hashing::new(reader, Some(bar.clone()));
    let plain = archive::decompress(compressed).with_context(|| format!("read blob {blob}"))?;
    let (mut plain, diff_state) = Hashing::new(plain, None);
    driver.create(id, parent)?;
    created.push(id.clone());
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
        if &got != want {
            bail!(
                "blob {blob}: digest mismatch: expected {want}, found {got}; the image is corrupt"
            );
        }
        if let Some(want_size) = want_size
            && *want_size != size
        {
            bail!("blob {blob}: size mismatch: expected {want_size} bytes, found {size}");
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

// === OCI image layout ===

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: Option<u64>,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: Option<String>,
    architecture: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
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
        .ok_or_else(|| anyhow!("index.json lists no manifests"))
}

/// Reads and verifies the blob `desc` names, as JSON.
fn read_blob_json<T: serde::de::DeserializeOwned>(source: &Source, desc: &Descriptor) -> Result<T> {
    let hex = sha256_hex(&desc.digest)?;
    let path = format!("blobs/sha256/{hex}");
    let bytes = source.read_small(&path)?;
    let got = format!("sha256:{}", self::hex(&Sha256::digest(&bytes)));
    if got != desc.digest {
        bail!(
            "blob {path}: digest mismatch: expected {}, found {got}; the image is corrupt",
            desc.digest
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("parse {path}"))
}

fn oci_layers(source: &Source) -> Result<Vec<LayerRef>> {
    let index: Index =
        serde_json::from_slice(&source.read_small("index.json")?).context("parse index.json")?;
    let mut desc = pick(&index.manifests)?;
    let mut nested: Index;
    let mut depth = 0;
    while INDEX_TYPES.contains(&desc.media_type.as_str()) {
        depth += 1;
        if depth > 4 {
            bail!("index.json: image indexes nest too deeply");
        }
        nested = read_blob_json(source, desc)?;
        desc = pick(&nested.manifests)?;
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
        out.push(LayerRef {
            path: format!("blobs/sha256/{hex}"),
            digest: Some((layer.digest.clone(), layer.size)),
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
    layers: Vec<String>,
}

/// The digest a `docker save` path encodes: `blobs/sha256/<hex>` (docker 25+) or `<hex>.json`
/// (older configs).
fn digest_in_path(path: &str) -> Option<String> {
    let hex = path
        .strip_prefix("blobs/sha256/")
        .or_else(|| path.strip_suffix(".json"))?;
    let digest = format!("sha256:{hex}");
    sha256_hex(&digest).ok()?;
    Some(digest)
}

fn docker_layers(source: &Source) -> Result<Vec<LayerRef>> {
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&source.read_small("manifest.json")?)
            .context("parse manifest.json")?;
    let Some(manifest) = manifests.into_iter().next() else {
        bail!("manifest.json lists no images");
    };
    let bytes = source.read_small(&manifest.config)?;
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

// === image sources ===

/// Where the image's files are: a directory, or a tar file indexed by entry name.
enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        /// Regular entries: name to (data offset, size).
        files: HashMap<String, (u64, u64)>,
        /// Link entries: name to the (normalized) name they point at.
        links: HashMap<String, String>,
    },
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

impl Source {
    fn new(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).with_context(|| format!("open {}", path.display()))?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let mut ar = tar::Archive::new(io::BufReader::new(f));
        // Seeking past member data: indexing a large image reads only its headers.
        let entries = ar
            .entries_with_seek()
            .with_context(|| format!("read {} as a tar archive", path.display()))?;
        for (n, entry) in entries.enumerate() {
            if n >= MAX_TAR_ENTRIES {
                bail!("{}: more than {MAX_TAR_ENTRIES} entries", path.display());
            }
            let entry = entry.with_context(|| {
                format!(
                    "read {} as a tar archive (expected an OCI layout or `docker save` tar)",
                    path.display()
                )
            })?;
            let raw = entry.path()?.to_string_lossy().into_owned();
            let Ok(name) = normalize(&raw) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() {
                files.insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_hard_link() || kind.is_symlink() {
                let Some(target) = entry.link_name()? else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                let joined = if kind.is_symlink() {
                    match name.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                if let Ok(t) = normalize_dots(&joined) {
                    links.insert(name, t);
                }
            }
        }
        Ok(Source::Tar {
            file: path.to_path_buf(),
            files,
            links,
        })
    }

    /// True if the image has a file `name`.
    fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { .. } => self.resolve(name).is_ok(),
        }
    }

    /// The (offset, size) of tar member `name`, following links.
    fn resolve(&self, name: &str) -> Result<(u64, u64)> {
        let Source::Tar { files, links, file } = self else {
            bail!("not a tar source");
        };
        let mut name = normalize(name)?;
        for _ in 0..16 {
            if let Some(found) = files.get(&name) {
                return Ok(*found);
            }
            match links.get(&name) {
                Some(next) => name = next.clone(),
                None => break,
            }
        }
        bail!("{}: the archive has no file {name}", file.display())
    }

    /// A reader for the file `name` and its size.
    fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Source::Dir(dir) => {
                let path = dir.join(normalize(name)?);
                let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                let len = f.metadata()?.len();
                Ok((Box::new(io::BufReader::new(f)), len))
            }
            Source::Tar { file, .. } => {
                let (offset, size) = self.resolve(name)?;
                let mut f = File::open(file).with_context(|| format!("open {}", file.display()))?;
                f.seek(SeekFrom::Start(offset))?;
                Ok((Box::new(io::BufReader::new(f).take(size)), size))
            }
        }
    }

    /// Reads a small file (JSON) whole, refusing anything over [`MAX_JSON`].
    fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let (reader, len) = self.open(name)?;
        if len > MAX_JSON {
            bail!("{name}: {len} bytes, expected at most {MAX_JSON} for a JSON document");
        }
        let mut buf = Vec::new();
        reader
            .take(MAX_JSON)
            .read_to_end(&mut buf)
            .with_context(|| format!("read {name}"))?;
        Ok(buf)
    }
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
    }
}
