//! Diffs, change lists and diff application for any [`ProtoDriver`], by comparing mounted trees.
//!
//! # Brief overview
//!
//! A driver that can store layers and make them available at a path ([`ProtoDriver`]) gets the
//! rest of the contract ([`DiffDriver`]) from this crate, the way `tracing` layers wrap a
//! subscriber:
//!
//! * [`NaiveDiffDriver`] wraps any `D: ProtoDriver` and answers every [`DiffDriver`] call by
//!   getting the layer (and its parent), comparing the two trees with [`archive::changes`] and
//!   exporting or applying tars. Every get is matched by a put on every path, errors included
//!   (a guard type does the put). The reader [`DiffDriver::diff`] returns holds its gets and
//!   puts them when it is dropped.
//! * [`NaiveDiffDriverWithApply`] is the same for drivers that can apply a diff faster themselves
//!   ([`ApplyDiffProtoDriver`]): their native apply runs first and answers
//!   [`NativeApply::Fallback`] — a type, not a magic error — when the naive apply should run
//!   instead. A driver must decide *before reading any byte* of the diff; a fallback after
//!   reading is reported as a driver bug rather than applying a truncated stream.
//!
//! # Guarantees about failed applies
//!
//! The naive [`DiffDriver::apply_diff`] applies through the mounted path with
//! [`chrootarchive::apply_layer`]; on failure it puts the layer and then *removes* it, so no
//! half-applied layer remains. During the apply the layer is visible under its id, half-applied.
//! Drivers that want the stronger guarantee "never visible while half-applied" apply natively
//! under [`graphdriver::LayerStore::begin_apply`], as the in-tree `vfs` and `overlay` drivers do.
//!
//! # Same-second changes
//!
//! Layer tars store whole-second mtimes, so a file rewritten with the same size within the same
//! second as its copy looks unchanged by metadata alone (moby issues 21555, 31805). No sleeping is
//! needed here: [`archive::changes`] compares the contents of such racily-clean files.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;

use archive::{ApplyOptions, TarOptions};
use graphdriver::{Change, DiffDriver, Error, LayerId, MountOpts, ProtoDriver, Result};

/// A [`DiffDriver`] for any [`ProtoDriver`], computed from the layers' trees.
///
/// See the [crate documentation](crate) for what each call does and guarantees.
#[derive(Debug)]
pub struct NaiveDiffDriver<D> {
    inner: D,
}

impl<D: ProtoDriver> NaiveDiffDriver<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        NaiveDiffDriver { inner }
    }

    /// The wrapped driver.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the driver.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

/// One outstanding [`ProtoDriver::get`], put when dropped.
struct Got<'a, D: ProtoDriver + ?Sized> {
    driver: &'a D,
    id: LayerId,
    path: PathBuf,
    released: bool,
}

impl<'a, D: ProtoDriver + ?Sized> Got<'a, D> {
    fn get(driver: &'a D, id: &LayerId) -> Result<Self> {
        let path = driver.get(id, &MountOpts::default())?;
        Ok(Got {
            driver,
            id: id.clone(),
            path,
            released: false,
        })
    }

    /// Puts now, reporting a failed put.
    fn put(mut self) -> Result<()> {
        self.released = true;
        self.driver.put(&self.id)
    }
}

impl<D: ProtoDriver + ?Sized> Drop for Got<'_, D> {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.driver.put(&self.id)
        {
            tracing::error!(layer = %self.id, error = %e, "could not put a layer");
        }
    }
}

/// Gets `id` and, if given, `parent`; both are put when the pair is dropped.
fn get_pair<'a, D: ProtoDriver + ?Sized>(
    driver: &'a D,
    id: &LayerId,
    parent: Option<&LayerId>,
) -> Result<(Got<'a, D>, Option<Got<'a, D>>)> {
    let layer = Got::get(driver, id)?;
    // If the parent's get fails, `layer` is dropped here and put.
    let parent = parent.map(|p| Got::get(driver, p)).transpose()?;
    Ok((layer, parent))
}

/// The tar of [`DiffDriver::diff`]: holds the gets of both layers until dropped.
struct DiffReader<'a, D: ProtoDriver + ?Sized> {
    // Field order is drop order: the producer thread is joined before the layers are put.
    stream: archive::TarStream,
    _layer: Got<'a, D>,
    _parent: Option<Got<'a, D>>,
}

impl<D: ProtoDriver + ?Sized> Read for DiffReader<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

/// Applies `diff` through the mounted path of `id`; on failure puts and removes the layer.
fn naive_apply<D: ProtoDriver + ?Sized>(
    driver: &D,
    id: &LayerId,
    diff: &mut dyn Read,
) -> Result<u64> {
    let layer = Got::get(driver, id)?;
    let applied = chrootarchive::apply_layer(&layer.path, diff, &ApplyOptions::default())
        .map_err(|e| Error::archive(id, e));
    match applied {
        Ok(bytes) => {
            layer.put()?;
            Ok(bytes)
        }
        Err(err) => {
            drop(layer);
            if let Err(e) = driver.remove(id) {
                tracing::error!(layer = %id, error = %e, "could not remove a half-applied layer");
            }
            Err(err)
        }
    }
}

fn naive_diff<'a, D: ProtoDriver + ?Sized>(
    driver: &'a D,
    id: &LayerId,
    parent: Option<&LayerId>,
) -> Result<Box<dyn Read + Send + 'a>> {
    let (layer, parent_got) = get_pair(driver, id, parent)?;
    let opts = TarOptions::default();
    let stream = match &parent_got {
        None => archive::tar_tree(&layer.path, &opts),
        Some(p) => archive::changes(&layer.path, Some(&p.path))
            .and_then(|changes| archive::export_changes(&layer.path, &changes, &opts)),
    }
    .map_err(|e| Error::archive(id, e))?;
    Ok(Box::new(DiffReader {
        stream,
        _layer: layer,
        _parent: parent_got,
    }))
}

fn naive_changes<D: ProtoDriver + ?Sized>(
    driver: &D,
    id: &LayerId,
    parent: Option<&LayerId>,
) -> Result<Vec<Change>> {
    let (layer, parent_got) = get_pair(driver, id, parent)?;
    archive::changes(&layer.path, parent_got.as_ref().map(|p| p.path.as_path()))
        .map_err(|e| Error::archive(id, e))
}

fn naive_diff_size<D: ProtoDriver + ?Sized>(
    driver: &D,
    id: &LayerId,
    parent: Option<&LayerId>,
) -> Result<u64> {
    let (layer, parent_got) = get_pair(driver, id, parent)?;
    archive::changes(&layer.path, parent_got.as_ref().map(|p| p.path.as_path()))
        .and_then(|changes| archive::changes_size(&layer.path, &changes))
        .map_err(|e| Error::archive(id, e))
}

impl<D: ProtoDriver> ProtoDriver for NaiveDiffDriver<D> {
    graphdriver::delegate_proto_driver!(self => self.inner);
}

impl<D: ProtoDriver> DiffDriver for NaiveDiffDriver<D> {
    /// Gets both layers and streams [`archive::export_changes`] of their differences (the whole
    /// tree via [`archive::tar_tree`] without a parent); the reader puts both when dropped.
    fn diff<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Box<dyn Read + Send + 'a>> {
        naive_diff(&self.inner, id, parent)
    }

    /// [`archive::changes`] of the two mounted trees.
    fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>> {
        naive_changes(&self.inner, id, parent)
    }

    /// Gets `id`, applies through [`chrootarchive::apply_layer`] and puts it; on failure the layer
    /// is put and removed. `parent` is not consulted: the layer already starts as its copy.
    fn apply_diff(
        &self,
        id: &LayerId,
        _parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<u64> {
        naive_apply(&self.inner, id, diff)
    }

    /// [`archive::changes_size`] of [`changes`](DiffDriver::changes).
    fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64> {
        naive_diff_size(&self.inner, id, parent)
    }
}

/// What a driver's native apply did ([`ApplyDiffProtoDriver::apply_diff_native`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeApply {
    /// The diff was applied natively; the regular-file bytes applied.
    Applied(u64),
    /// The driver cannot apply this diff natively; the naive apply must run. Only valid when no
    /// byte of the diff was read.
    Fallback,
}

/// A [`ProtoDriver`] with its own, faster way of applying some diffs.
pub trait ApplyDiffProtoDriver: ProtoDriver {
    /// Applies `diff` to layer `id` (whose parent is `parent`) natively, or answers
    /// [`NativeApply::Fallback`] **before reading any byte** of `diff`.
    ///
    /// Same contract as [`DiffDriver::apply_diff`] otherwise: on error the layer is gone.
    fn apply_diff_native(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<NativeApply>;
}

/// A complete [`graphdriver::Driver`] from an [`ApplyDiffProtoDriver`]: native apply first, the
/// naive one on [`NativeApply::Fallback`]; diff, changes and sizes as [`NaiveDiffDriver`].
#[derive(Debug)]
pub struct NaiveDiffDriverWithApply<D> {
    inner: D,
}

impl<D: ApplyDiffProtoDriver> NaiveDiffDriverWithApply<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        NaiveDiffDriverWithApply { inner }
    }

    /// The wrapped driver.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the driver.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

impl<D: ApplyDiffProtoDriver> ProtoDriver for NaiveDiffDriverWithApply<D> {
    graphdriver::delegate_proto_driver!(self => self.inner);
}

/// Counts the bytes read through it, so a late fallback is detected.
struct CountingReader<'r> {
    inner: &'r mut dyn Read,
    count: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count = self.count.saturating_add(n as u64);
        Ok(n)
    }
}

/// The error for a native apply that answered Fallback after reading input.
struct LateFallback<'a> {
    driver: &'a str,
    consumed: u64,
}

impl fmt::Display for LateFallback<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "driver bug: {} answered fallback after reading {} byte(s) of the diff; a native \
             apply must decide before reading (expected 0 bytes read)",
            self.driver, self.consumed
        )
    }
}

impl<D: ApplyDiffProtoDriver> DiffDriver for NaiveDiffDriverWithApply<D> {
    /// As [`NaiveDiffDriver`].
    fn diff<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Box<dyn Read + Send + 'a>> {
        naive_diff(&self.inner, id, parent)
    }

    /// As [`NaiveDiffDriver`].
    fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>> {
        naive_changes(&self.inner, id, parent)
    }

    /// The native apply; on [`NativeApply::Fallback`] the naive one. A fallback after the native
    /// apply read from `diff` is an [`Error::Io`] naming the driver bug (the layer is removed).
    fn apply_diff(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<u64> {
        let mut counting = CountingReader {
            inner: diff,
            count: 0,
        };
        match self.inner.apply_diff_native(id, parent, &mut counting)? {
            NativeApply::Applied(bytes) => Ok(bytes),
            NativeApply::Fallback if counting.count == 0 => {
                tracing::debug!(layer = %id, driver = self.inner.name(), "native apply fell back");
                naive_apply(&self.inner, id, counting.inner)
            }
            NativeApply::Fallback => {
                let msg = LateFallback {
                    driver: self.inner.name(),
                    consumed: counting.count,
                }
                .to_string();
                let path = self.inner.home().join(id.as_str());
                if let Err(e) = self.inner.remove(id) {
                    tracing::error!(layer = %id, error = %e, "could not remove a layer after a late fallback");
                }
                Err(Error::io("apply diff", path, io::Error::other(msg)))
            }
        }
    }

    /// As [`NaiveDiffDriver`].
    fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64> {
        naive_diff_size(&self.inner, id, parent)
    }
}

#[cfg(test)]
mod tests;
