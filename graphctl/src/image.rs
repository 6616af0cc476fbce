//! Glue between `graphctl` and [`graphdriver_image`]: progress bars for `import`, and the DiffID
//! record `apply` leaves for a later import to reuse the layer.

use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use graphdriver::LayerId;
use graphdriver_image::{DigestHandle, LayerStart, Progress};

pub use graphdriver_image::Hashing;

/// [`Progress`] as `graphctl` shows it: one bar per layer on stderr when it is a terminal, a
/// `warning:` line per entry the apply skipped, and a line when waiting for another process.
#[derive(Default)]
pub struct Bars {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Bars {
    fn with_bar(&self, f: impl FnOnce(&mut Option<indicatif::ProgressBar>)) {
        let mut bar = self
            .bar
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut bar);
    }
}

impl Progress for Bars {
    fn layer_started(&self, layer: &LayerStart<'_>, blob_len: u64) {
        let message = format!("layer {}/{}", layer.index + 1, layer.count);
        let new = crate::commands::progress_bar(Some(blob_len), message);
        self.with_bar(|bar| *bar = Some(new));
    }

    fn blob_read(&self, bytes: u64) {
        self.with_bar(|bar| {
            if let Some(bar) = bar {
                bar.inc(bytes);
            }
        });
    }

    fn layer_applied(&self, _id: &LayerId) {
        self.with_bar(|bar| {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
        });
        crate::commands::warn_skipped();
    }

    fn waiting(&self, id: &LayerId) {
        eprintln!("waiting for another process that is building layer {id}");
    }
}

/// Records the DiffID of layer `id` that `graphctl apply` just made from `plain` in the store
/// at driver home `home` (see [`graphdriver_image::diff_id_to_end`]: `plain` is read to its end
/// first, and nothing is recorded after a stream that does not end). A failure only loses the
/// record (import then refuses to reuse the layer), so it is logged, not returned: the DiffID
/// recorded is returned, `None` when none was.
pub fn record_diff_id(
    home: &Path,
    id: &LayerId,
    plain: &mut impl Read,
    hashed: &DigestHandle,
) -> Option<String> {
    let result = graphdriver_image::diff_id_to_end(plain, hashed, "the layer tar")
        .map_err(anyhow::Error::from)
        .and_then(|d| {
            graphdriver::LayerStore::open(home, graphdriver::Durability::default())?
                .0
                .set_diff_id(id, &d)?;
            Ok(d)
        });
    match result {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(layer = %id, error = %e, "could not record the layer's DiffID");
            None
        }
    }
}
