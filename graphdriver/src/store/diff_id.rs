//! The DiffID record of a layer: `<home>/<id>/diff-id`, the digest (`sha256:<hex>`) of the
//! uncompressed tar the layer was made from, so an image import can tell whether an existing
//! layer under a chain id really holds what the image says before it reuses it.
//!
//! The record is written once the layer's content is complete (to a new file, synced, renamed
//! over the old one, the directory synced), so a kill leaves the old record, the new one or none,
//! never a partial one. Any apply to the layer deletes the record first
//! ([`LayerStore::begin_apply`]): content changed after the record was made is never vouched for.

use std::io::Write;
use std::os::fd::AsFd;

use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::{LayerStore, fsync_dir, nofollow};
use crate::{Error, LayerId, Result};

/// The record's file name inside a layer directory.
pub(super) const DIFF_ID_FILE: &str = "diff-id";
/// The record being written.
const DIFF_ID_NEW: &str = "diff-id.new";
/// The longest DiffID accepted (`sha512:` and 128 hex digits fit).
const MAX_DIFF_ID: usize = 160;

/// Checks that `d` looks like a digest: `<algorithm>:<hex>`, lowercase, at most
/// [`MAX_DIFF_ID`] bytes.
fn check(d: &str) -> std::result::Result<(), String> {
    let ok = d.len() <= MAX_DIFF_ID
        && d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && !hex.is_empty()
                && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a digest <algorithm>:<lowercase hex> of at most {MAX_DIFF_ID} bytes, found {:?}",
            d.chars().take(MAX_DIFF_ID).collect::<String>()
        ))
    }
}

impl LayerStore {
    /// Records `diff_id` (a digest such as `sha256:<64 hex>`) as the DiffID of complete layer
    /// `id`, replacing any earlier record atomically (new file, fsync, rename, fsync of the
    /// layer directory). Fails with [`Error::NotFound`] for a missing or incomplete layer, with
    /// an error naming the path for a malformed digest or a symlink where the record goes.
    pub fn set_diff_id(&self, id: &LayerId, diff_id: &str) -> Result<()> {
        let dir_path = self.layer_dir(id);
        let path = dir_path.join(DIFF_ID_FILE);
        check(diff_id).map_err(|m| {
            Error::io(
                "record DiffID",
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, m),
            )
        })?;
        // Under the store lock: one writer of `diff-id.new` at a time, and no removal between
        // the check that the layer is complete and the rename.
        let _lock = self.lock_exclusive()?;
        let dir = self.require_fd(id)?;
        let tmp_path = dir_path.join(DIFF_ID_NEW);
        nofollow::remove_entry(dir.as_fd(), DIFF_ID_NEW, &tmp_path)?;
        let mut file = nofollow::create_new_file(dir.as_fd(), DIFF_ID_NEW, &tmp_path)?;
        file.write_all(diff_id.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp_path, e))?;
        // rename(2) replaces a symlink at the target rather than following it.
        rustix::fs::renameat(&dir, DIFF_ID_NEW, &dir, DIFF_ID_FILE)
            .map_err(|e| Error::io("rename into place", &path, e.into()))?;
        fsync_dir(dir.as_fd(), &dir_path)
    }

    /// The DiffID recorded for complete layer `id` by [`set_diff_id`](Self::set_diff_id);
    /// `None` if there is no record (a layer made by `create` alone, applied to after its
    /// record was made, or made by an older version). A symlink or other non-regular file
    /// where the record goes, or a malformed record, is an error naming its path.
    pub fn diff_id(&self, id: &LayerId) -> Result<Option<String>> {
        let dir = self.require_fd(id)?;
        let path = self.layer_dir(id).join(DIFF_ID_FILE);
        let Some(text) = nofollow::read_small(dir.as_fd(), DIFF_ID_FILE, &path)? else {
            return Ok(None);
        };
        check(&text).map_err(|m| {
            Error::io(
                "read DiffID",
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, m),
            )
        })?;
        Ok(Some(text))
    }
}

/// Deletes the DiffID record of the layer directory `dir` (absent is fine): called when its
/// content is about to change.
pub(super) fn forget(dir: std::os::fd::BorrowedFd<'_>, path: &std::path::Path) -> Result<()> {
    for name in [DIFF_ID_FILE, DIFF_ID_NEW] {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(Error::io("remove", path.join(name), e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn store() -> (tempfile::TempDir, LayerStore) {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) =
            LayerStore::open(&dir.path().join("home"), super::super::Durability::None).unwrap();
        (dir, s)
    }

    #[test]
    fn recorded_replaced_and_forgotten_by_an_apply() {
        let (_d, s) = store();
        let id = LayerId::new("a").unwrap();
        assert!(matches!(
            s.set_diff_id(&id, &format!("sha256:{}", "1".repeat(64))),
            Err(Error::NotFound(_))
        ));
        s.create(&id, None, false, |_| Ok(())).unwrap();
        assert_eq!(s.diff_id(&id).unwrap(), None);
        let one = format!("sha256:{}", "1".repeat(64));
        let two = format!("sha256:{}", "2".repeat(64));
        s.set_diff_id(&id, &one).unwrap();
        assert_eq!(s.diff_id(&id).unwrap().as_deref(), Some(one.as_str()));
        s.set_diff_id(&id, &two).unwrap();
        assert_eq!(s.diff_id(&id).unwrap().as_deref(), Some(two.as_str()));
        // A malformed digest is refused and the record stays.
        for bad in ["", "sha256:", "sha256:XYZ", "sha256:1\n", "no-colon"] {
            let e = s.set_diff_id(&id, bad).unwrap_err().to_string();
            assert!(e.contains("diff-id"), "{e}");
        }
        assert_eq!(s.diff_id(&id).unwrap().as_deref(), Some(two.as_str()));
        // Changing the content drops the record, whether or not the apply succeeds.
        s.begin_apply(&id).unwrap().finish().unwrap();
        assert_eq!(s.diff_id(&id).unwrap(), None);
    }

    #[test]
    fn a_planted_record_is_not_followed() {
        let (d, s) = store();
        let id = LayerId::new("a").unwrap();
        s.create(&id, None, false, |_| Ok(())).unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, format!("sha256:{}", "3".repeat(64))).unwrap();
        let record = s.layer_dir(&id).join(DIFF_ID_FILE);
        std::os::unix::fs::symlink(&outside, &record).unwrap();
        let e = s.diff_id(&id).unwrap_err().to_string();
        assert!(e.contains("diff-id") && e.contains("symlink"), "{e}");
        // Writing replaces the symlink; the file it pointed at is untouched.
        let one = format!("sha256:{}", "1".repeat(64));
        s.set_diff_id(&id, &one).unwrap();
        assert_eq!(s.diff_id(&id).unwrap().as_deref(), Some(one.as_str()));
        assert_eq!(
            std::fs::read_to_string(&outside).unwrap(),
            format!("sha256:{}", "3".repeat(64))
        );
        // Garbage in the record is an error naming it, not a DiffID.
        std::fs::write(&record, "sha256:zz").unwrap();
        let e = s.diff_id(&id).unwrap_err().to_string();
        assert!(e.contains("diff-id"), "{e}");
    }
}
