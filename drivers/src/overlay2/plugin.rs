//! Registration of the `overlay2` driver and its option parsing.

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Result};

use super::{NAME, Overlay2, Overlay2Config};

/// The option keys `overlay2` understands.
pub const OPTIONS: &[&str] = &["mount_options", "sync", "mount_api"];

/// Starts the overlay2 driver in `home`.
///
/// Options: `mount_options` (as for `overlay`), `sync` (see [`graphdriver::Durability`]),
/// `mount_api` (`auto`, the default: `lowerdir+` where the kernel has it; `legacy`: `mount(2)`
/// option strings always). Unknown options are refused naming the key and its origin.
///
/// Fails with [`graphdriver::Error::NotSupported`] when overlay is missing, without root, or
/// when a test mount under `home` fails, and with [`graphdriver::Error::IncompatibleFs`] on
/// overlay/aufs/ecryptfs or without d_type: automatic selection then moves on.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, OPTIONS)?;
    if let Some(opt) = options.get("mount_options") {
        crate::overlay::mountopt::parse(&opt.value).map_err(|reason| {
            graphdriver::Error::InvalidOption {
                driver: NAME.to_string(),
                key: opt.key.clone(),
                origin: Some(opt.origin.clone()),
                reason,
            }
        })?;
    }
    let legacy_mount_api = match options.get("mount_api") {
        None => false,
        Some(opt) => match opt.value.as_str() {
            "auto" => false,
            "legacy" => true,
            other => {
                return Err(graphdriver::Error::InvalidOption {
                    driver: NAME.to_string(),
                    key: opt.key.clone(),
                    origin: Some(opt.origin.clone()),
                    reason: format!("expected \"auto\" or \"legacy\", found {other:?}"),
                });
            }
        },
    };
    let config = Overlay2Config {
        mount_options: options.get_str("mount_options").map(str::to_string),
        durability: options.get_durability(NAME)?,
        legacy_mount_api,
    };
    Ok(Box::new(Overlay2::driver(home, config)?))
}

graphdriver::register_driver!("overlay2", init);
