//! What [`LayerStore::open`] cleans up after interrupted work ([`Recovery`]).

use super::*;

/// What [`LayerStore::open`] cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Staging directories of interrupted creates and removals that were deleted.
    pub staging_removed: Vec<PathBuf>,
    /// Fresh layers (created for the apply) left incomplete by an interrupted apply, now
    /// removed.
    pub incomplete_removed: Vec<LayerId>,
    /// Layers that existed before an interrupted apply, rolled back to their tree from before
    /// it (the staged copy removed).
    pub applies_rolled_back: Vec<LayerId>,
    /// Mount records of layers that no longer exist, dropped.
    pub stale_mount_records: Vec<String>,
    /// Layers whose process-owned mount references belonged to dead processes, with how many
    /// were dropped.
    pub dead_references: Vec<(LayerId, u32)>,
    /// Leftovers that could not be removed (for example a mount inside them) and entries the
    /// store did not make (a symlink where it expects a directory), one message each naming the
    /// path; they stay for the next open to retry, and the store is usable meanwhile.
    pub failed: Vec<String>,
}

impl Recovery {
    /// True if nothing needed cleaning.
    pub fn is_empty(&self) -> bool {
        self.staging_removed.is_empty()
            && self.incomplete_removed.is_empty()
            && self.applies_rolled_back.is_empty()
            && self.stale_mount_records.is_empty()
            && self.dead_references.is_empty()
            && self.failed.is_empty()
    }
}

impl LayerStore {
    pub(super) fn recover(&self) -> Result<Recovery> {
        let mut rec = Recovery::default();
        let _lock = self.lock_exclusive()?;
        let staging = self.staging_fd()?;
        let staging_path = self.home.join(STAGING_DIR);
        for name in names_in(staging.as_fd(), &staging_path)? {
            let path = staging_path.join(&name);
            // Only real directories are ours; anything else is reported and left alone (never
            // followed, never deleted through).
            let dir = match open_dir_opt(staging.as_fd(), &name, &path) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    rec.failed.push(e.to_string());
                    continue;
                }
            };
            // A live owner (builder or remover) holds the flock on its entry: the same answer as
            // every other check (see `staging`). Any other directory here is abandoned too,
            // whatever its name.
            if let Some(_held) = staging::claim(dir) {
                // One undeletable leftover must not make the whole store unusable.
                match nofollow::remove_entry(staging.as_fd(), &name, &path) {
                    Ok(()) => rec.staging_removed.push(path),
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        for id in ids_in(self.fd(), &self.home)? {
            let dir = match open_dir(self.fd(), id.as_str(), &self.layer_dir(&id)) {
                Ok(d) => d,
                Err(e) => {
                    rec.failed.push(e.to_string());
                    continue;
                }
            };
            let marker = self.layer_dir(&id).join(INCOMPLETE_FILE);
            let file =
                match nofollow::open_file(dir.as_fd(), INCOMPLETE_FILE, &marker, false, false) {
                    Ok(Some(f)) => f,
                    Ok(None) => continue,
                    Err(e) => {
                        rec.failed.push(e.to_string());
                        continue;
                    }
                };
            if let Some(held) = FileLock::try_exclusive(file) {
                // An apply that finished between our open and our lock removed the marker
                // first: the layer is complete, not abandoned.
                if !still_linked(&held, dir.as_fd(), INCOMPLETE_FILE) {
                    continue;
                }
                let fresh = lstat_type(
                    dir.as_fd(),
                    atomic::FRESH_FILE,
                    &self.layer_dir(&id).join(atomic::FRESH_FILE),
                );
                match fresh {
                    // Created for this apply by the dead process: it goes.
                    Ok(Some(_)) => match self.discard_layer_dir(&id) {
                        Ok(()) => rec.incomplete_removed.push(id),
                        Err(e) => rec.failed.push(format!("incomplete layer {id}: {e}")),
                    },
                    // It existed before: the apply went into a staged copy, which goes.
                    Ok(None) => match self.roll_back_apply(&id, dir.as_fd()) {
                        Ok(()) => rec.applies_rolled_back.push(id),
                        Err(e) => rec.failed.push(format!("interrupted apply of {id}: {e}")),
                    },
                    Err(e) => rec.failed.push(e.to_string()),
                }
            }
        }
        self.recover_mounts(&mut rec)?;
        Ok(rec)
    }
}
