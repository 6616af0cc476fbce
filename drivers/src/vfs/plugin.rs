//! Registration of the `vfs` driver and its option parsing.

use std::path::Path;

use graphdriver::{Driver, DriverOptions, Result};

use super::{NAME, Vfs};

/// The option keys `vfs` understands.
pub const OPTIONS: &[&str] = &["sync"];

/// Starts the vfs driver in `home`. Options: `sync` (bool, default false): flush each layer to
/// disk before it becomes visible. Unknown options are refused.
pub fn init(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>> {
    options.reject_unknown(NAME, OPTIONS)?;
    let sync = options.get_bool(NAME, "sync", false)?;
    Ok(Box::new(Vfs::driver(home, sync)?))
}

graphdriver::register_driver!("vfs", init);
