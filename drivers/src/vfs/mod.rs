//! The `vfs` driver: every layer is a full copy of its parent.
//!
//! Layout: `<home>/<id>/root` is the layer's tree (plus the [`LayerStore`] bookkeeping files).
//! Creating a layer copies the parent's `root` ([`CopyMode::Content`]) or makes an empty 0755
//! root; get and put only count references (nothing is mounted, except a read-only bind mount
//! at `<id>/view` for a get that asks for a view); a diff is applied natively
//! under [`LayerStore::begin_apply`], so a half-applied layer is never visible. Diffs and change
//! lists come from `naive_diff`. It is slow and uses a lot of space, and it is the oracle the
//! other drivers are tested against: keep it simple enough to trust.

mod plugin;

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use graphdriver::{
    Error, IoContext, LayerId, LayerInfo, LayerStore, MountOpts, ProtoDriver, Result,
};
use naive_diff::{DiffHooks, NaiveDiffDriver, Native};

use crate::Kind;
use crate::copy::{CopyMode, copy_tree};

pub use plugin::init;

/// The registered name.
pub const NAME: &str = "vfs";

/// The vfs driver's state: only its store.
#[derive(Debug)]
pub struct Vfs {
    store: LayerStore,
}

impl Vfs {
    /// Opens (creating) the driver home `home`; `durability` says what is flushed to disk (see
    /// [`graphdriver::Durability`]).
    pub fn new(home: &Path, durability: graphdriver::Durability) -> Result<Vfs> {
        let (store, _recovery) = LayerStore::open(home, durability)?;
        Ok(Vfs { store })
    }

    /// The vfs driver as a complete [`graphdriver::Driver`].
    pub fn driver(
        home: &Path,
        durability: graphdriver::Durability,
    ) -> Result<NaiveDiffDriver<Vfs>> {
        Ok(NaiveDiffDriver::new(Vfs::new(home, durability)?))
    }

    /// The tree of layer `id` (whether or not it exists).
    pub fn root(&self, id: &LayerId) -> PathBuf {
        self.store.layer_dir(id).join("root")
    }

    /// The tree of existing layer `id`, checked to be a real directory (a planted symlink is
    /// refused, not followed).
    fn checked_root(&self, id: &LayerId) -> Result<PathBuf> {
        self.store.layer_subdir(id, "root")?.ok_or_else(|| {
            Error::io(
                "open layer directory",
                self.root(id),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    fn create_layer(&self, id: &LayerId, parent: Option<&LayerId>, kind: Kind) -> Result<()> {
        kind.create(&self.store, id, parent, |dir| {
            let root = dir.join("root");
            match parent {
                Some(p) => copy_tree(&self.checked_root(p)?, &root, CopyMode::Content),
                None => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&root)
                    .ctx("create directory", &root),
            }
        })
    }
}

impl ProtoDriver for Vfs {
    fn name(&self) -> &str {
        NAME
    }
    fn home(&self) -> &Path {
        self.store.home()
    }
    fn create(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::Image)
    }
    fn create_read_write(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::ReadWrite)
    }
    fn create_pending(&self, id: &LayerId, parent: Option<&LayerId>) -> Result<()> {
        self.create_layer(id, parent, Kind::Pending)
    }
    fn remove(&self, id: &LayerId) -> Result<()> {
        self.store.remove(id, |_| Ok(()))
    }
    fn get(&self, id: &LayerId, opts: &MountOpts) -> Result<PathBuf> {
        self.store.require(id)?;
        let root = self.checked_root(id)?;
        self.store
            .acquire_tree(NAME, id, &root, opts, rustix::mount::MountFlags::empty())
    }
    fn put(&self, id: &LayerId) -> Result<()> {
        self.store.release_ref(id, || Ok(())).map(|_| ())
    }
    fn exists(&self, id: &LayerId) -> bool {
        self.store.exists(id)
    }
    fn status(&self) -> Vec<(String, String)> {
        let layers = self.store.list().map(|l| l.len().to_string());
        vec![(
            "Layers".to_string(),
            layers.unwrap_or_else(|e| format!("unknown ({e})")),
        )]
    }
    /// Drops every reference (durable ones included) and unmounts every read-only view.
    fn cleanup(&self) -> Result<()> {
        self.store.release_every_layer(|_| Ok(()))
    }
    fn list(&self) -> Result<Vec<LayerInfo>> {
        self.store.list()
    }
    fn parent(&self, id: &LayerId) -> Result<Option<LayerId>> {
        self.store.parent(id)
    }
}

impl DiffHooks for Vfs {
    /// Always applies natively: marks the layer incomplete, applies into its root in a confined
    /// child, and makes it visible again; on failure the layer stays, holding the part of the diff
    /// applied so far (a committed layer is refused before anything changes).
    fn apply_diff_native(
        &self,
        id: &LayerId,
        _parent: Option<&LayerId>,
        diff: &mut dyn Read,
    ) -> Result<Native<u64>> {
        let guard = self.store.begin_apply(id)?;
        let root = self.checked_root(id)?;
        let opts = archive::ApplyOptions::default();
        let bytes = crate::apply_all_or_nothing(&guard, id, &root, diff, &opts)?;
        guard.finish()?;
        Ok(Native::Done(bytes))
    }
}
