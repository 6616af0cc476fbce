//! Registration of the `vfs` driver and its option parsing.

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Result};

use super::{NAME, Vfs};

/// The option keys `vfs` understands.
pub const OPTIONS: &[&str] = &["sync"];

/// Starts the vfs driver in `home`. Options: `sync` (`none`, `layers` (default) or `full`: what
/// is flushed to disk, see [`graphdriver::Durability`]). Unknown options are refused.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, OPTIONS)?;
    let durability = options.get_durability(NAME)?;
    Ok(Box::new(Vfs::driver(home, durability)?))
}

graphdriver::register_driver!("vfs", init);
