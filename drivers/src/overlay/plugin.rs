//! Registration of the `overlay` driver and its option parsing.

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Result};

use super::{NAME, Overlay, OverlayConfig};

/// The option keys `overlay` understands.
pub const OPTIONS: &[&str] = &["mount_options", "sync"];

/// Starts the overlay driver in `home`.
///
/// Options: `mount_options` (text appended to every overlay mount's options), `sync` (bool:
/// flush each layer to disk before it becomes visible). Unknown options are refused.
///
/// Fails with [`graphdriver::Error::NotSupported`] when overlay is missing from
/// `/proc/filesystems`, without root, or when a test mount under `home` fails, and with
/// [`graphdriver::Error::IncompatibleFs`] when `home` is on overlay/aufs/ecryptfs or lacks d_type.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, OPTIONS)?;
    let config = OverlayConfig {
        mount_options: options.get_str("mount_options").map(str::to_string),
        sync: options.get_bool(NAME, "sync", false)?,
    };
    Ok(Box::new(Overlay::driver(home, config)?))
}

graphdriver::register_driver!("overlay", init);
