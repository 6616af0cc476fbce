//! The driver contract: [`ProtoDriver`], [`DiffDriver`] and [`Driver`].
//!
//! # Terms
//!
//! * A **layer** is a directory tree stored by a driver under a [`LayerId`]. It has at most one
//!   **parent**; a layer starts as an exact copy of its parent's tree (or empty) and then changes.
//! * An **image layer** ([`ProtoDriver::create`]) is filled once by [`DiffDriver::apply_diff`] and
//!   afterwards only read; drivers may share its data with children (hardlinks, overlay lower).
//! * A **read-write layer** ([`ProtoDriver::create_read_write`]) is a container's writable layer:
//!   it is written through the path [`ProtoDriver::get`] returns.
//! * To **get** a layer is to make its tree available at a path (mounting it if the driver
//!   mounts); every get is matched by one **put**. Gets nest and are reference counted, also
//!   across processes that share one store.
//! * The **home** of a driver is `<root>/<driver name>`; everything the driver stores lives there.
//!
//! # Lifecycle, worked through
//!
//! Importing a two-layer image and running a container on it:
//!
//! ```text
//! create(base, None)               empty image layer
//! apply_diff(base, None, tar0)     fill it from the first layer tar; returns bytes applied
//! create(app, Some(base))          image layer on base: starts as base's tree
//! apply_diff(app, Some(base), tar1)
//! create_read_write(ctr, Some(app))
//! get(ctr) -> /root/overlay/ctr/merged   the container writes here
//! changes(ctr, Some(app))          what the container changed: [C /etc, A /etc/motd]
//! diff(ctr, Some(app))             the same as a layer tar ("docker commit")
//! put(ctr); remove(ctr)
//! ```
//!
//! # Errors
//!
//! Ids are validated before any call reaches a driver ([`LayerId`]). A driver reports
//! [`Error::NotFound`] for a missing layer or parent, [`Error::AlreadyExists`] for a duplicate id,
//! [`Error::InUse`] / [`Error::HasChildren`] when removal is not possible, and never leaves a
//! half-made layer visible under its id: a failed `create` leaves the id absent. A committed layer
//! (an image layer an apply finished into, or any layer with children; see
//! [`LayerStore::is_committed`](crate::LayerStore::is_committed)) is immutable: `apply_diff`
//! into it is refused with [`Error::WrongLayerKind`](crate::Error::WrongLayerKind) before anything changes. A failed
//! `apply_diff` never removes the layer: it keeps the part of the diff applied so far (callers
//! that created the layer for this apply remove it, as `graphctl apply` does).
//!
//! [`Error::NotFound`]: crate::Error::NotFound
//! [`Error::AlreadyExists`]: crate::Error::AlreadyExists
//! [`Error::InUse`]: crate::Error::InUse
//! [`Error::HasChildren`]: crate::Error::HasChildren

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Change, LayerId, Result};

/// Options for [`ProtoDriver::get`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MountOpts {
    /// An SELinux mount label (`context=` option) for drivers that mount; `None` for none.
    pub mount_label: Option<String>,
    /// The get must outlive the calling process (`graphctl mount`): it is released only by a
    /// put, in any process. By default (`false`) a get belongs to the calling process and is
    /// released when the process dies, so a killed reader never leaves a layer busy.
    pub durable: bool,
    /// Ask for a **read-only view** (containerd's `View`): the path returned shows the layer's
    /// tree, and every write through it fails with `EROFS`, so nothing done there can change
    /// this layer or any layer that shares data with it. What a tree handed to users (a shell,
    /// a build step, `graphctl mount` of an image layer) must be. By default (`false`) a get
    /// returns the layer's tree as the driver keeps it, for callers that write (read-write
    /// layers) or that only read in process (the naive differ).
    pub read_only: bool,
}

impl MountOpts {
    /// Options with the given mount label.
    pub fn with_label(label: impl Into<String>) -> Self {
        MountOpts {
            mount_label: Some(label.into()),
            ..MountOpts::default()
        }
    }

    /// Options for a get that outlives the calling process (see [`MountOpts::durable`]).
    pub fn durable() -> Self {
        MountOpts {
            durable: true,
            ..MountOpts::default()
        }
    }

    /// These options, asking for a read-only view (see [`MountOpts::read_only`]).
    pub fn view(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Who owns the reference a get with these options takes (for
    /// [`LayerStore::acquire_ref`](crate::LayerStore::acquire_ref)).
    pub fn holder(&self) -> crate::Holder {
        if self.durable {
            crate::Holder::Durable
        } else {
            crate::Holder::Process
        }
    }
}

/// One layer as [`ProtoDriver::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LayerInfo {
    /// The layer's id.
    pub id: LayerId,
    /// Its parent, if any.
    pub parent: Option<LayerId>,
    /// True for read-write (container) layers.
    pub read_write: bool,
}

/// The part of the contract every driver implements: storing layer trees and making them
/// available at a path.
///
/// Implementations are shared across threads (`Send + Sync`) and across processes that open the
/// same home; they do their own locking.
pub trait ProtoDriver: Send + Sync {
    /// The driver's registered name, for example `"overlay"`.
    fn name(&self) -> &str;

    /// The driver's home directory (`<root>/<name>`).
    fn home(&self) -> &Path;

    /// Creates image layer `id` whose tree starts as a copy of `parent`'s (or empty).
    ///
    /// Fails with `AlreadyExists` if `id` exists and `NotFound` if `parent` does not; on any
    /// failure `id` stays absent.
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()>;

    /// Creates read-write (container) layer `id` on `parent`; otherwise as [`create`](Self::create).
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()>;

    /// Creates image layer `id` like [`create`](Self::create), for the diff this process
    /// applies into it next (moby's `Create` then `ApplyDiff`; what `graphctl apply` and
    /// `import` do), promising that **no other process sees the layer before its data**: it
    /// is absent for them until the first [`apply_diff`](crate::DiffDriver::apply_diff) into
    /// it finishes, and removed if that apply fails or this process dies first, so an
    /// interrupted import never leaves a listed layer without its files.
    ///
    /// The default calls [`create`](Self::create) (no such promise); drivers built on
    /// [`LayerStore`](crate::LayerStore) keep it with
    /// [`LayerStore::create_pending`](crate::LayerStore::create_pending).
    fn create_pending(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create(id, parent)
    }

    /// Removes layer `id` and everything stored for it.
    ///
    /// Refused with `InUse` while it is mounted (gets outnumber puts, in any process) and with
    /// `HasChildren` while other layers name it as parent. The id disappears atomically.
    fn remove(&self, id: &LayerId) -> Result<()>;

    /// Makes layer `id`'s tree available and returns its path, mounting it if needed.
    ///
    /// Reference counted: each call must be matched by one [`put`](Self::put); the tree stays
    /// available until the last put, in this or any other process sharing the home. The
    /// reference belongs to the calling process and dies with it unless `opts.durable` is set
    /// (then only a put, in any process, releases it).
    ///
    /// With `opts.read_only` the path is a read-only view: reads show the layer's tree and
    /// every write fails with `EROFS` (a read-only bind mount, or an overlay with lower
    /// directories only). Views and plain gets of one layer share its reference count; the
    /// last put takes every mount of the layer down. A driver that cannot make a view here
    /// (no mount privilege) fails with [`Error::NotSupported`](crate::Error::NotSupported)
    /// rather than hand out a writable tree. Without it, the tree of a committed layer
    /// ([`LayerStore::is_committed`](crate::LayerStore::is_committed)) may be the driver's own
    /// storage, shared with other layers: only in-process readers that never write take it.
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf>;

    /// Releases one [`get`](Self::get) of `id` (one this process made if it holds any, else a
    /// durable one); the last release unmounts.
    fn put(&self, id: &LayerId) -> Result<()>;

    /// True if a complete layer `id` exists (unfinished layers count as absent).
    fn exists(&self, id: &LayerId) -> bool;

    /// Human-readable key/value pairs describing the driver's state (backing filesystem, layer
    /// count, …) for `graphctl status`.
    fn status(&self) -> Vec<(String, String)>;

    /// Releases what this driver holds in the system: unmounts every layer it has mounted.
    fn cleanup(&self) -> Result<()>;

    /// Every complete layer with its parent, sorted by id.
    fn list(&self) -> Result<Vec<LayerInfo>>;

    /// The parent of layer `id`, `NotFound` if `id` does not exist.
    fn parent(&self, id: &LayerId) -> Result<Option<LayerId>> {
        self.list()?
            .into_iter()
            .find(|l| &l.id == id)
            .map(|l| l.parent)
            .ok_or_else(|| crate::Error::NotFound(id.clone()))
    }
}

/// The diff half of the contract: layers as tar streams and change lists.
///
/// Drivers with no native diff get all of it from `naive_diff::NaiveDiffDriver`, which compares
/// mounted trees. `parent` is the layer to compare against; `None` means "against nothing", so
/// the whole tree is the diff.
pub trait DiffDriver: Send + Sync {
    /// The changes from `parent` to `id` as a layer tar, streamed (bounded memory).
    ///
    /// The stream may hold the layers mounted until it is dropped.
    fn diff<'a>(
        &'a self,
        id: &LayerId,
        parent: Option<&LayerId>,
    ) -> Result<Box<dyn Read + Send + 'a>>;

    /// What changed from `parent` to `id`, sorted by path.
    fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>>;

    /// Applies the layer tar `diff` (plain, gzip, zstd, xz or bzip2) to layer `id`, whose
    /// parent is `parent`, and returns the regular-file bytes applied.
    ///
    /// Refused with [`Error::WrongLayerKind`](crate::Error::WrongLayerKind) if `id` is
    /// committed. On failure the layer `id` stays, holding the part of the diff applied so far;
    /// it is never removed (a layer that existed before the call keeps existing).
    fn apply_diff(
        &self,
        id: &LayerId,
        parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<u64>;

    /// The regular-file bytes that differ from `parent` to `id` (each hardlinked inode once);
    /// equal to what [`apply_diff`](Self::apply_diff) of [`diff`](Self::diff) returns.
    fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64>;
}

/// A complete driver: [`ProtoDriver`] and [`DiffDriver`]. Implemented for every type that has
/// both.
pub trait Driver: ProtoDriver + DiffDriver {}

impl<T: ProtoDriver + DiffDriver + ?Sized> Driver for T {}

// === forwarding ===

/// Writes the body of a `ProtoDriver` impl that forwards every method to another
/// `ProtoDriver`: `delegate_proto_driver!(self => <expression naming the inner driver>)`.
///
/// For wrappers that add behaviour to some other part of a driver (a diff half, logging,
/// metrics) and must pass the whole [`ProtoDriver`] through unchanged; every method is
/// forwarded, so a method added to the trait later is forwarded too, not silently left to its
/// default.
///
/// ```
/// use graphdriver::ProtoDriver;
///
/// /// A driver wrapper that counts nothing yet: it only forwards.
/// struct Wrapper<D> {
///     inner: D,
/// }
///
/// impl<D: ProtoDriver> ProtoDriver for Wrapper<D> {
///     graphdriver::delegate_proto_driver!(self => self.inner);
/// }
/// ```
#[macro_export]
macro_rules! delegate_proto_driver {
    ($this:ident => $inner:expr) => {
        fn name(&$this) -> &str {
            $inner.name()
        }
        fn home(&$this) -> &::std::path::Path {
            $inner.home()
        }
        fn create(
            &$this,
            id: &$crate::LayerId,
            parent: Option<&$crate::LayerId>,
        ) -> $crate::Result<()> {
            $inner.create(id, parent)
        }
        fn create_read_write(
            &$this,
            id: &$crate::LayerId,
            parent: Option<&$crate::LayerId>,
        ) -> $crate::Result<()> {
            $inner.create_read_write(id, parent)
        }
        fn create_pending(
            &$this,
            id: &$crate::LayerId,
            parent: Option<&$crate::LayerId>,
        ) -> $crate::Result<()> {
            $inner.create_pending(id, parent)
        }
        fn remove(&$this, id: &$crate::LayerId) -> $crate::Result<()> {
            $inner.remove(id)
        }
        fn get(
            &$this,
            id: &$crate::LayerId,
            opts: &$crate::MountOpts,
        ) -> $crate::Result<::std::path::PathBuf> {
            $inner.get(id, opts)
        }
        fn put(&$this, id: &$crate::LayerId) -> $crate::Result<()> {
            $inner.put(id)
        }
        fn exists(&$this, id: &$crate::LayerId) -> bool {
            $inner.exists(id)
        }
        fn status(&$this) -> Vec<(String, String)> {
            $inner.status()
        }
        fn cleanup(&$this) -> $crate::Result<()> {
            $inner.cleanup()
        }
        fn list(&$this) -> $crate::Result<Vec<$crate::LayerInfo>> {
            $inner.list()
        }
        fn parent(&$this, id: &$crate::LayerId) -> $crate::Result<Option<$crate::LayerId>> {
            $inner.parent(id)
        }
    };
}

/// A `Box`, `Arc` or reference to a driver is that driver.
macro_rules! forward_pointer {
    ($ty:ty) => {
        impl<T: ProtoDriver + ?Sized> ProtoDriver for $ty {
            delegate_proto_driver!(self => (**self));
        }

        impl<T: DiffDriver + ?Sized> DiffDriver for $ty {
            fn diff<'a>(
                &'a self,
                id: &LayerId,
                parent: Option<&LayerId>,
            ) -> Result<Box<dyn Read + Send + 'a>> {
                (**self).diff(id, parent)
            }
            fn changes(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<Vec<Change>> {
                (**self).changes(id, parent)
            }
            fn apply_diff(
                &self,
                id: &LayerId,
                parent: Option<&LayerId>,
                diff: &mut dyn Read,
            ) -> Result<u64> {
                (**self).apply_diff(id, parent, diff)
            }
            fn diff_size(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<u64> {
                (**self).diff_size(id, parent)
            }
        }
    };
}

forward_pointer!(Box<T>);
forward_pointer!(Arc<T>);
forward_pointer!(&T);
