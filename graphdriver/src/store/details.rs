//! What `graphctl info` and `ls --json` show about one layer: the bookkeeping the store keeps
//! (parent, kind, DiffID, mount count) and when the layer was created.

use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, StatxFlags};

use super::{LayerStore, RW_FILE, is_complete, nofollow, read_parent};
use crate::{Error, LayerId, Result};

/// One layer's bookkeeping, as [`LayerStore::details`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerDetails {
    /// The layer's id.
    pub id: LayerId,
    /// Its parent, if any.
    pub parent: Option<LayerId>,
    /// True for a read-write (container) layer, false for an image layer.
    pub read_write: bool,
    /// The digest of the uncompressed tar the layer was made from (`sha256:…`), when an
    /// `apply` or `import` recorded one and nothing changed the layer since.
    pub diff_id: Option<String>,
    /// When the layer was created: the birth time of its directory (made when the layer was
    /// staged). `None` where the filesystem or kernel does not report birth times.
    pub created: Option<SystemTime>,
    /// References currently held (mounts and readers of live processes, durable mounts).
    pub mount_count: u32,
}

impl LayerStore {
    /// The bookkeeping of complete layer `id` ([`Error::NotFound`] if it is absent or still
    /// being applied), read without following symlinks.
    pub fn details(&self, id: &LayerId) -> Result<LayerDetails> {
        let dir = self.layer_dir(id);
        let fd = self
            .layer_fd(id)?
            .filter(|fd| is_complete(fd.as_fd()))
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        let parent = read_parent(fd.as_fd(), &dir)?;
        let read_write = nofollow::lstat_type(fd.as_fd(), RW_FILE, &dir.join(RW_FILE))?.is_some();
        let created = rustix::fs::statx(&fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BTIME)
            .ok()
            .filter(|st| st.stx_mask & StatxFlags::BTIME.bits() != 0)
            .and_then(|st| {
                let secs = u64::try_from(st.stx_btime.tv_sec).ok()?;
                UNIX_EPOCH.checked_add(Duration::new(secs, st.stx_btime.tv_nsec))
            });
        Ok(LayerDetails {
            diff_id: self.diff_id(id)?,
            mount_count: self.mount_count(id)?,
            id: id.clone(),
            parent,
            read_write,
            created,
        })
    }
}
