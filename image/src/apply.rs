//! Applying an image's layers to a driver: streaming digest checks, reuse of existing layers,
//! waiting for a concurrent import, cleanup on failure.

use std::io::{self, Read};

use graphdriver::{Driver, LayerId, LayerStore};

use crate::digest::Hashing;
use crate::error::{Error, Result};
use crate::source::{Limited, Source};
use crate::{ImportedLayer, LayerRef, LayerStart, Progress, Report};

/// Applies `layers` (from `source`) to `driver`; on failure removes every layer this call
/// created, so the store is left as it was.
pub(crate) fn import_layers(
    driver: &dyn Driver,
    store: &LayerStore,
    source: &Source,
    layers: &[LayerRef],
    progress: &dyn Progress,
) -> Result<Report> {
    let mut created: Vec<LayerId> = Vec::new();
    let target = Target {
        driver,
        store,
        source,
        progress,
    };
    let result = target.apply_all(layers, &mut created);
    if result.is_err() {
        for id in created.iter().rev().filter(|id| driver.exists(id)) {
            if let Err(e) = driver.remove(id) {
                tracing::error!(layer = %id, error = %e, "could not remove a layer of a failed import");
            }
        }
    }
    result
}

/// Where an import writes: the driver, its bookkeeping (DiffID records), the image read and
/// whom to tell.
#[derive(Clone, Copy)]
struct Target<'a> {
    driver: &'a dyn Driver,
    store: &'a LayerStore,
    source: &'a Source,
    progress: &'a dyn Progress,
}

/// Why one attempt at applying a layer failed: another process holds the id, or a real error.
enum Attempt {
    Taken(graphdriver::Error),
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

impl Target<'_> {
    fn apply_all(&self, layers: &[LayerRef], created: &mut Vec<LayerId>) -> Result<Report> {
        let Target { driver, store, .. } = *self;
        let mut report = Report {
            top: None,
            layers: Vec::new(),
        };
        for (n, layer) in layers.iter().enumerate() {
            let hex = layer.chain_id.trim_start_matches("sha256:");
            let id = LayerId::new(hex).map_err(|source| Error::ChainId {
                chain_id: layer.chain_id.clone(),
                source,
            })?;
            let parent = report.top.clone();
            let start = LayerStart {
                index: n,
                count: layers.len(),
                id: &id,
                blob: &layer.blob,
            };
            let applied = if driver.exists(&id) {
                None
            } else {
                self.apply_or_wait(layer, &id, parent.as_ref(), created, &start)?
            };
            let size = match applied {
                Some(size) => {
                    store
                        .set_diff_id(&id, &layer.diff_id)
                        .map_err(|source| Error::Layer {
                            action: "record the DiffID of",
                            id: id.clone(),
                            source,
                        })?;
                    size
                }
                None => {
                    check_reuse(driver, store, &id, parent.as_ref(), &layer.diff_id)?;
                    tracing::info!(layer = %id, "already present with the same DiffID, reused");
                    0
                }
            };
            report.layers.push(ImportedLayer {
                id: id.clone(),
                diff_id: layer.diff_id.clone(),
                blob: layer.blob.clone(),
                applied: applied.is_some(),
                size,
            });
            report.top = Some(id);
        }
        Ok(report)
    }

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
        start: &LayerStart<'_>,
    ) -> Result<Option<u64>> {
        let Target {
            driver,
            store,
            progress,
            ..
        } = *self;
        let mut said = false;
        let mut abandoned = 0;
        loop {
            let err = match self.apply_one(layer, id, parent, created, start) {
                Ok(size) => return Ok(Some(size)),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Taken(e)) => e,
            };
            // Taken meanwhile: finished, being built by another process, or abandoned.
            loop {
                if driver.exists(id) {
                    return Ok(None);
                }
                let building = store.is_being_built(id).map_err(|source| Error::Layer {
                    action: "check",
                    id: id.clone(),
                    source,
                })?;
                if !building {
                    break;
                }
                if !said {
                    progress.waiting(id);
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            abandoned += 1;
            if abandoned > 3 {
                return Err(Error::Abandoned {
                    id: id.clone(),
                    source: err,
                });
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
        start: &LayerStart<'_>,
    ) -> std::result::Result<u64, Attempt> {
        let Target {
            driver,
            store,
            source,
            progress,
        } = *self;
        let blob = &layer.blob;
        let opened = source.open(blob)?;
        let len = opened.len;
        let reader: Box<dyn Read + Send> = match (&layer.digest, layer.size) {
            (Some(digest), Some(size)) => {
                if len > size {
                    return Err(Error::LongerThanDeclared {
                        blob: format!("{digest} ({blob})"),
                        declared: size,
                        found: len,
                    }
                    .into());
                }
                Box::new(Limited::new(
                    opened.reader,
                    size,
                    format!("{digest} ({blob})"),
                ))
            }
            _ => opened.reader,
        };
        progress.layer_started(start, len);
        let counted = Counting {
            inner: reader,
            progress,
        };
        let (compressed, blob_digest) = Hashing::new(counted);
        let plain = archive::decompress(compressed).map_err(|source| Error::Decompress {
            blob: blob.clone(),
            source,
        })?;
        let (mut plain, diff_digest) = Hashing::new(plain);
        match driver.create_pending(id, parent) {
            Ok(()) => {}
            Err(e @ graphdriver::Error::AlreadyExists(_)) => return Err(Attempt::Taken(e)),
            Err(source) => {
                return Err(Error::Layer {
                    action: "create",
                    id: id.clone(),
                    source,
                }
                .into());
            }
        }
        created.push(id.clone());
        // Recorded while the layer is still pending (invisible to other processes), so it is
        // published together with its DiffID: a concurrent import that finds it can check it, and
        // one killed between the apply and the record does not leave a layer without one.
        store
            .set_diff_id(id, &layer.diff_id)
            .map_err(|source| Error::Layer {
                action: "record the DiffID of",
                id: id.clone(),
                source,
            })?;
        let applied = driver.apply_diff(id, parent, &mut plain);
        progress.layer_applied(id);
        let applied = applied.map_err(|source| Error::Apply {
            blob: blob.clone(),
            id: id.clone(),
            source,
        })?;
        // The tar may end before the stream does (padding): hash all of it.
        io::copy(&mut plain, &mut io::sink()).map_err(|source| Error::ReadBlob {
            blob: blob.clone(),
            source,
        })?;
        drop(plain);
        if let Some(want) = &layer.digest {
            let (got, size) = blob_digest.finish();
            if let Some(want_size) = layer.size
                && want_size != size
            {
                return Err(Error::SizeMismatch {
                    blob: format!("{want} ({blob})"),
                    declared: want_size,
                    found: size,
                }
                .into());
            }
            if &got != want {
                return Err(Error::DigestMismatch {
                    blob: blob.clone(),
                    expected: want.clone(),
                    found: got,
                }
                .into());
            }
        }
        let (got, _) = diff_digest.finish();
        if got != layer.diff_id {
            return Err(Error::DiffIdMismatch {
                blob: blob.clone(),
                expected: layer.diff_id.clone(),
                found: got,
            }
            .into());
        }
        Ok(applied)
    }
}

/// Reports the bytes read from a blob to the caller's [`Progress`].
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.blob_read(n as u64);
        Ok(n)
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
    let recorded = store.diff_id(id).map_err(|source| Error::Layer {
        action: "read the DiffID of",
        id: id.clone(),
        source,
    })?;
    if recorded.as_deref() != Some(diff_id) {
        return Err(Error::ReuseDiffId {
            id: id.clone(),
            recorded,
            needed: diff_id.to_string(),
        });
    }
    let found = driver.parent(id).map_err(|source| Error::Layer {
        action: "read the parent of",
        id: id.clone(),
        source,
    })?;
    if found.as_ref() != parent {
        return Err(Error::ReuseParent {
            id: id.clone(),
            found,
            needed: parent.cloned(),
        });
    }
    Ok(())
}
