//! Diffs, change lists and diff application for any [`ProtoDriver`], by comparing mounted trees.
//!
//! # Brief overview
//!
//! A driver that can store layers and make them available at a path ([`ProtoDriver`]) gets the
//! rest of the contract ([`DiffDriver`]) from this crate, the way `tracing` layers wrap a
//! subscriber. There is one wrapper, [`NaiveDiffDriver`], and one extension point, the
//! [`DiffHooks`] trait:
//!
//! * For each of diff, changes, apply and size, the wrapper first asks the driver's hook. A hook
//!   answers [`Native::Done`] with the result, or [`Native::Fallback`] — a type, not a magic
//!   error — and the naive path runs. The choice is made **per call** (the way containers/storage
//!   decides per call whether overlay's native diff is exact), so a driver can answer natively
//!   for the layers and hosts where it is exact and fall back elsewhere.
//! * Every hook has a default that falls back, so a driver with no native diff at all writes
//!   `impl DiffHooks for MyDriver {}` and gets everything from the naive path.
//! * The naive path gets the layer (and its parent), compares the two trees with
//!   [`archive::changes`] and exports or applies tars. Every get is matched by a put on every
//!   path, errors included (a guard type does the put). The reader [`DiffDriver::diff`] returns
//!   holds its gets and puts them when it is dropped.
//! * An apply hook must decide *before reading any byte* of the diff; a fallback after reading
//!   is reported as a driver bug rather than applying a truncated stream.
//!
//! ```
//! use std::path::{Path, PathBuf};
//! use graphdriver::{LayerId, LayerInfo, MountOpts, ProtoDriver, Result};
//! use naive_diff::{DiffHooks, Native, NaiveDiffDriver};
//!
//! /// A driver whose changes are known for base layers only (say, from a log it keeps).
//! struct Logged { home: PathBuf }
//!
//! impl DiffHooks for Logged {
//!     fn changes_native(&self, _id: &LayerId, parent: Option<&LayerId>)
//!         -> Result<Native<Vec<graphdriver::Change>>> {
//!         match parent {
//!             None => Ok(Native::Done(Vec::new())), // answered natively
//!             Some(_) => Ok(Native::Fallback),       // the naive tree comparison runs
//!         }
//!     }
//! }
//! # impl ProtoDriver for Logged {
//! #     fn name(&self) -> &str { "logged" }
//! #     fn home(&self) -> &Path { &self.home }
//! #     fn create(&self, _: &LayerId, _: Option<&LayerId>) -> Result<()> { Ok(()) }
//! #     fn create_read_write(&self, _: &LayerId, _: Option<&LayerId>) -> Result<()> { Ok(()) }
//! #     fn remove(&self, _: &LayerId) -> Result<()> { Ok(()) }
//! #     fn get(&self, _: &LayerId, _: &MountOpts) -> Result<PathBuf> { Ok(self.home.clone()) }
//! #     fn put(&self, _: &LayerId) -> Result<()> { Ok(()) }
//! #     fn exists(&self, _: &LayerId) -> bool { true }
//! #     fn status(&self) -> Vec<(String, String)> { Vec::new() }
//! #     fn cleanup(&self) -> Result<()> { Ok(()) }
//! #     fn list(&self) -> Result<Vec<LayerInfo>> { Ok(Vec::new()) }
//! # }
//! use graphdriver::DiffDriver;
//! let driver = NaiveDiffDriver::new(Logged { home: std::env::temp_dir() });
//! assert!(driver.changes(&LayerId::new("base")?, None)?.is_empty());
//! # Ok::<(), graphdriver::Error>(())
//! ```
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

/// A [`DiffDriver`] for any driver with [`DiffHooks`]: each call answered by the driver's hook,
/// or computed from the layers' trees when the hook falls back.
///
/// See the [crate documentation](crate) for what each call does and guarantees.
#[derive(Debug)]
pub struct NaiveDiffDriver<D> {
    inner: D,
}

impl<D: DiffHooks> NaiveDiffDriver<D> {
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

/// A driver's answer to one call of a [`DiffHooks`] hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Native<T> {
    /// The driver answered natively; this is the result.
    Done(T),
    /// The driver cannot answer this call natively (this layer, this host): the naive path runs.
    /// An apply hook may answer this only before reading any byte of the diff.
    Fallback,
}

/// How a driver answers some [`DiffDriver`] calls itself: one hook per call, each free to answer
/// natively or fall back for each call. Every hook falls back by default.
///
/// The hooks have the contract of the [`DiffDriver`] call they stand for; a hook that answers
/// [`Native::Done`] must give the result the naive path would (the conformance suite compares
/// them).
pub trait DiffHooks: ProtoDriver {
    /// [`DiffDriver::diff`] natively, or [`Native::Fallback`].
    fn diff_native<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Native<Box<dyn Read + Send + 'a>>> {
        let _ = (id, parent);
        Ok(Native::Fallback)
    }

    /// [`DiffDriver::changes`] natively, or [`Native::Fallback`].
    fn changes_native(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Native<Vec<Change>>> {
        let _ = (id, parent);
        Ok(Native::Fallback)
    }

    /// [`DiffDriver::apply_diff`] natively (the regular-file bytes applied), or
    /// [`Native::Fallback`] **before reading any byte** of `diff`. On error the layer is gone,
    /// as for [`DiffDriver::apply_diff`].
    fn apply_diff_native(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<Native<u64>> {
        let _ = (id, parent, diff);
        Ok(Native::Fallback)
    }

    /// [`DiffDriver::diff_size`] natively, or [`Native::Fallback`].
    fn diff_size_native(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Native<u64>> {
        let _ = (id, parent);
        Ok(Native::Fallback)
    }
}

impl<D: DiffHooks> ProtoDriver for NaiveDiffDriver<D> {
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

impl<D: DiffHooks> DiffDriver for NaiveDiffDriver<D> {
    /// The driver's [`DiffHooks::diff_native`]; on fallback, gets both layers and streams
    /// [`archive::export_changes`] of their differences (the whole tree via
    /// [`archive::tar_tree`] without a parent); that reader puts both when dropped.
    fn diff<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Box<dyn Read + Send + 'a>> {
        match self.inner.diff_native(id, parent)? {
            Native::Done(reader) => Ok(reader),
            Native::Fallback => naive_diff(&self.inner, id, parent),
        }
    }

    /// The driver's [`DiffHooks::changes_native`]; on fallback, [`archive::changes`] of the two
    /// mounted trees.
    fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>> {
        match self.inner.changes_native(id, parent)? {
            Native::Done(changes) => Ok(changes),
            Native::Fallback => naive_changes(&self.inner, id, parent),
        }
    }

    /// The driver's [`DiffHooks::apply_diff_native`]; on fallback, gets `id`, applies through
    /// [`chrootarchive::apply_layer`] and puts it; on failure the layer is put and removed.
    /// `parent` is not consulted by the naive apply: the layer already starts as its copy. A
    /// fallback after the hook read from `diff` is an [`Error::Io`] naming the driver bug (the
    /// layer is removed).
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
            Native::Done(bytes) => Ok(bytes),
            Native::Fallback if counting.count == 0 => {
                tracing::debug!(layer = %id, driver = self.inner.name(), "native apply fell back");
                naive_apply(&self.inner, id, counting.inner)
            }
            Native::Fallback => {
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

    /// The driver's [`DiffHooks::diff_size_native`]; on fallback, [`archive::changes_size`] of
    /// [`changes`](DiffDriver::changes).
    fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64> {
        match self.inner.diff_size_native(id, parent)? {
            Native::Done(size) => Ok(size),
            Native::Fallback => naive_diff_size(&self.inner, id, parent),
        }
    }
}

#[cfg(test)]
mod tests;
