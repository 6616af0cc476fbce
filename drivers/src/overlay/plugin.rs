//! Registration of the `overlay` driver and its option parsing.

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Result};

use super::{NAME, Overlay, OverlayConfig};

/// The option keys `overlay` understands.
pub const OPTIONS: &[&str] = &["mount_options", "sync"];

/// Starts the overlay driver in `home`.
///
/// Options: `mount_options` (comma-separated mount flags such as `nodev,nosuid` and the overlay
/// options [`super::mountopt`] allows; what the driver controls, such as `upperdir`, is
/// refused), `sync` (bool: flush each layer to disk before it becomes visible). Unknown options
/// and bad `mount_options` are refused with [`graphdriver::Error::InvalidOption`] naming the
/// option and where it came from, before anything is mounted.
///
/// Fails with [`graphdriver::Error::NotSupported`] when overlay is missing from
/// `/proc/filesystems`, without root, or when a test mount under `home` fails, and with
/// [`graphdriver::Error::IncompatibleFs`] when `home` is on overlay/aufs/ecryptfs or lacks d_type.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, OPTIONS)?;
    if let Some(opt) = options.get("mount_options") {
        super::mountopt::parse(&opt.value).map_err(|reason| graphdriver::Error::InvalidOption {
            driver: NAME.to_string(),
            key: opt.key.clone(),
            origin: Some(opt.origin.clone()),
            reason,
        })?;
    }
    let config = OverlayConfig {
        mount_options: options.get_str("mount_options").map(str::to_string),
        durability: options.get_durability(NAME)?,
    };
    Ok(Box::new(Overlay::driver(home, config)?))
}

graphdriver::register_driver!("overlay", init);
