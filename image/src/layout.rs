//! Reading an image's layer list: OCI layouts (`index.json`, on `oci-spec` types) and
//! `docker save` archives (`manifest.json`), the image chosen by name or tag.

use std::io::Read;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::digest::{chain_id, sha256_hex, sha256_of};
use crate::error::{Error, Result};
use crate::source::{Limited, Source};
use crate::{LayerRef, MAX_JSON};

/// The OCI annotation naming an image in a layout (`oci:DIR:NAME`).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd and docker 25+ write with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// How deep nested indexes are followed.
const MAX_INDEX_DEPTH: usize = 4;

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

/// The layers of the image `tag` selects (or the only image) in `source`, bottom first, with
/// their chain ids.
pub(crate) fn layers_of(source: &Source, tag: Option<&str>) -> Result<Vec<LayerRef>> {
    let mut layers = if source.has("index.json") {
        let bytes = read_small(source, "index.json", None)?;
        let parse = |source| Error::Parse {
            name: "index.json".into(),
            source,
        };
        // Looked at as plain JSON first: `docker load` falls back to manifest.json when the
        // index lists nothing (`"manifests": null`, which is not a valid OCI index).
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(parse)?;
        let listed = value
            .get("manifests")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|m| !m.is_empty());
        if listed {
            let index: ImageIndex = serde_json::from_value(value).map_err(parse)?;
            oci_layers(source, index.manifests().clone(), tag)?
        } else if source.has("manifest.json") {
            docker_layers(source, tag)?
        } else {
            return Err(Error::EmptyIndex {
                name: "index.json".into(),
            });
        }
    } else if source.has("manifest.json") {
        docker_layers(source, tag)?
    } else {
        return Err(Error::UnknownLayout);
    };
    let mut parent: Option<String> = None;
    for l in &mut layers {
        l.chain_id = chain_id(parent.as_deref(), &l.diff_id);
        parent = Some(l.chain_id.clone());
    }
    Ok(layers)
}

/// Reads the small file (JSON) `name` of the image whole, refusing anything over
/// [`MAX_JSON`] or over its declared size (`declared`: digest and size).
fn read_small(source: &Source, name: &str, declared: Option<(&str, u64)>) -> Result<Vec<u8>> {
    let opened = source.open(name)?;
    let limit = match declared {
        Some((digest, size)) => {
            if size > MAX_JSON {
                return Err(Error::JsonTooLarge {
                    name: format!("blob {digest}"),
                    size,
                    limit: MAX_JSON,
                });
            }
            if opened.len > size {
                return Err(Error::LongerThanDeclared {
                    blob: format!("{digest} ({name})"),
                    declared: size,
                    found: opened.len,
                });
            }
            size
        }
        None => MAX_JSON,
    };
    if opened.len > limit {
        return Err(Error::JsonTooLarge {
            name: name.to_string(),
            size: opened.len,
            limit: MAX_JSON,
        });
    }
    let what = declared.map_or_else(|| name.to_string(), |(d, _)| format!("{d} ({name})"));
    let mut buf = Vec::new();
    Limited::new(opened.reader, limit, what)
        .read_to_end(&mut buf)
        .map_err(|source| Error::ReadJson {
            name: name.to_string(),
            source,
        })?;
    Ok(buf)
}

/// The names an index entry answers to.
fn names(d: &Descriptor) -> Vec<&str> {
    let Some(a) = d.annotations() else {
        return Vec::new();
    };
    [REF_NAME, CONTAINERD_NAME]
        .iter()
        .filter_map(|k| a.get(*k).map(String::as_str))
        .collect()
}

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
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME).or_else(|| a.get(CONTAINERD_NAME)))
            .cloned()
            .unwrap_or_else(|| format!("(unnamed) {}", d.digest()))
    };
    let mut labels: Vec<String> = manifests.iter().map(label).collect();
    labels.sort();
    labels.dedup();
    match tag {
        Some(tag) => {
            let (hit, _): (Vec<_>, Vec<_>) = manifests
                .into_iter()
                .partition(|d| names(d).iter().any(|n| tag_matches(n, tag)));
            if hit.is_empty() {
                return Err(Error::NoSuchName {
                    name: tag.to_string(),
                    available: labels,
                });
            }
            let mut found: Vec<String> = hit.iter().map(label).collect();
            found.sort();
            found.dedup();
            if found.len() > 1 {
                return Err(Error::AmbiguousName {
                    name: tag.to_string(),
                    images: found,
                });
            }
            Ok(hit)
        }
        None => {
            let named = manifests.iter().any(|d| !names(d).is_empty());
            if named && labels.len() > 1 {
                return Err(Error::SeveralImages { images: labels });
            }
            Ok(manifests)
        }
    }
}

/// Picks the manifest for this host from an index's entries (`index`: the index's name).
fn pick<'a>(manifests: &'a [Descriptor], index: &str) -> Result<&'a Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|d| {
            d.platform().as_ref().is_none_or(|p| {
                let (os, a) = (p.os().to_string(), p.architecture().to_string());
                (os.is_empty() || os == "linux") && (a.is_empty() || a == arch)
            })
        })
        .or(manifests.first())
        .ok_or_else(|| Error::EmptyIndex {
            name: index.to_string(),
        })
}

/// Reads and verifies the blob `desc` names, as JSON of type `T`.
fn read_blob_json<T: serde::de::DeserializeOwned>(source: &Source, desc: &Descriptor) -> Result<T> {
    let digest = desc.digest().to_string();
    let hex = sha256_hex(&digest, "descriptor")?;
    let path = format!("blobs/sha256/{hex}");
    let bytes = read_small(source, &path, Some((&digest, desc.size())))?;
    let got = sha256_of(&bytes);
    if got != digest {
        return Err(Error::DigestMismatch {
            blob: path,
            expected: digest,
            found: got,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| Error::Parse { name: path, source })
}

fn oci_layers(
    source: &Source,
    manifests: Vec<Descriptor>,
    tag: Option<&str>,
) -> Result<Vec<LayerRef>> {
    let top = select_oci(manifests, tag)?;
    let mut desc = pick(&top, "index.json")?.clone();
    let mut depth = 0;
    while INDEX_TYPES.contains(&desc.media_type().as_ref()) {
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(Error::NestedTooDeep);
        }
        let nested: ImageIndex = read_blob_json(source, &desc)?;
        desc = pick(nested.manifests(), desc.digest().as_ref())?.clone();
    }
    let manifest: ImageManifest = read_blob_json(source, &desc)?;
    let config: ImageConfiguration = read_blob_json(source, manifest.config())?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::LayerCount {
            manifest: "the manifest",
            layers: manifest.layers().len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut out = Vec::new();
    for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let digest = layer.digest().to_string();
        let media_type = layer.media_type().as_ref();
        if !LAYER_TYPES.contains(&media_type) {
            return Err(Error::UnsupportedMediaType {
                digest,
                media_type: media_type.to_string(),
            });
        }
        sha256_hex(diff_id, "config rootfs.diff_ids")?;
        let hex = sha256_hex(&digest, "manifest layers")?;
        out.push(LayerRef {
            blob: format!("blobs/sha256/{hex}"),
            digest: Some(digest.clone()),
            size: Some(layer.size()),
            diff_id: diff_id.clone(),
            chain_id: String::new(),
        });
    }
    Ok(out)
}

// === docker save ===

/// One image of a `docker save` archive's `manifest.json` (moby's format, not an OCI type).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The part of a docker image config the import reads. Docker's config is read leniently, as
/// moby reads it: only `rootfs.diff_ids` must be there.
#[derive(Deserialize)]
struct DockerConfig {
    rootfs: DockerRootFs,
}

#[derive(Deserialize)]
struct DockerRootFs {
    diff_ids: Vec<String>,
}

/// The digest a content-addressed `docker save` path encodes: `blobs/sha256/<hex>` (docker
/// 25+). Other names (`<id>.json`, `<id>/layer.tar`) are only names: moby reads them by name.
fn digest_in_path(path: &str) -> Option<String> {
    let hex = path.strip_prefix("blobs/sha256/")?;
    let digest = format!("sha256:{hex}");
    sha256_hex(&digest, "path").ok()?;
    Some(digest)
}

fn docker_layers(source: &Source, tag: Option<&str>) -> Result<Vec<LayerRef>> {
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&read_small(source, "manifest.json", None)?).map_err(|source| {
            Error::Parse {
                name: "manifest.json".into(),
                source,
            }
        })?;
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
            .ok_or_else(|| Error::NoSuchTag {
                tag: tag.to_string(),
                available: labels,
            })?,
        None => {
            if manifests.len() > 1 {
                return Err(Error::SeveralTaggedImages { images: labels });
            }
            manifests.into_iter().next().ok_or(Error::NoImages)?
        }
    };
    let bytes = read_small(source, &manifest.config, None)?;
    if let Some(want) = digest_in_path(&manifest.config) {
        let got = sha256_of(&bytes);
        if got != want {
            return Err(Error::DigestMismatch {
                blob: manifest.config,
                expected: want,
                found: got,
            });
        }
    }
    let config: DockerConfig = serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
        name: manifest.config.clone(),
        source,
    })?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::LayerCount {
            manifest: "manifest.json",
            layers: manifest.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut out = Vec::new();
    for (path, diff_id) in manifest.layers.into_iter().zip(diff_ids) {
        sha256_hex(&diff_id, "config rootfs.diff_ids")?;
        out.push(LayerRef {
            digest: digest_in_path(&path),
            size: None,
            blob: path,
            diff_id,
            chain_id: String::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_and_references() {
        let h = "a".repeat(64);
        assert_eq!(
            digest_in_path(&format!("blobs/sha256/{h}")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(digest_in_path("abc/layer.tar"), None);
        assert_eq!(digest_in_path(&format!("{h}.json")), None);
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
    }
}
