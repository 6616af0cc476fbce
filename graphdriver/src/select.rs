//! Choosing and opening a driver for a storage root.
//!
//! The order, as in moby and containers-storage:
//!
//! 1. **A name given by the user** (`driver =` in the config, `GRAPHDRIVER`, `--driver`). Any
//!    init error, "not supported" included, is returned as it is. One root holds the layers of
//!    one driver: a name that differs from the driver whose layers are already under the root is
//!    refused with [`Error::DriverMismatch`] naming both and the root (like podman's "database
//!    configuration mismatch"), instead of silently starting a second, empty store beside them.
//!    A root that holds no layers ([`prior_state`] is empty) accepts any driver.
//! 2. **Prior state**: a driver whose home `<root>/<name>` already holds layers. Two such homes
//!    is an error asking the user to choose; a prior driver that cannot start now is an error too
//!    — selection never silently switches drivers under existing layers.
//! 3. **Priority**: the first driver of `driver_priority` that starts. Drivers answering
//!    "not supported" are skipped, and their reasons end up in [`Selected::skipped`] (or in
//!    [`Error::NoUsableDriver`] when none works).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{Config, Driver, Error, LayerId, Result, lookup, registered};

/// How the driver was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectedBy {
    /// Named by the user.
    Name,
    /// Its home already held layers.
    PriorState,
    /// First supported driver of the priority list.
    Priority,
}

/// An opened driver and how it was chosen.
pub struct Selected {
    /// The driver.
    pub driver: Box<dyn Driver>,
    /// Its registered name.
    pub name: String,
    /// Its home, `<root>/<name>`.
    pub home: PathBuf,
    /// How it was chosen.
    pub selected_by: SelectedBy,
    /// Drivers tried before it and why each was refused.
    pub skipped: Vec<(String, String)>,
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("name", &self.name)
            .field("home", &self.home)
            .field("selected_by", &self.selected_by)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

/// Opens the driver `config` selects (see the module docs for the order).
///
/// A driver named in `config` is refused with [`Error::DriverMismatch`] (before its home is
/// created) when the root holds layers of other drivers and none of its own; when the root holds
/// layers of several drivers, naming one of them chooses it.
pub fn open(config: &Config) -> Result<Selected> {
    ensure_dir(&config.root, 0o711)?;
    let prior = prior_state(&config.root)?;
    if let Some(name) = &config.driver {
        if !prior.is_empty() && !prior.contains(name) {
            return Err(Error::DriverMismatch {
                root: config.root.clone(),
                requested: name.clone(),
                found: prior,
            });
        }
        let driver = init(config, name)?;
        return Ok(selected(config, name, driver, SelectedBy::Name, Vec::new()));
    }
    match prior.as_slice() {
        [] => {}
        [name] => {
            return match init(config, name) {
                Ok(driver) => Ok(selected(
                    config,
                    name,
                    driver,
                    SelectedBy::PriorState,
                    vec![],
                )),
                // Only a driver that cannot work here would tempt a switch; any other error
                // (a bad option, an unreadable home) is the user's to fix, and said as it is.
                Err(e) if e.is_not_supported() => Err(Error::PriorDriverUnusable {
                    root: config.root.clone(),
                    driver: name.clone(),
                    reason: e.to_string(),
                }),
                Err(e) => Err(e),
            };
        }
        _ => {
            return Err(Error::AmbiguousPriorState {
                root: config.root.clone(),
                drivers: prior,
            });
        }
    }
    let mut skipped = Vec::new();
    for name in &config.driver_priority {
        match init(config, name) {
            Ok(driver) => {
                return Ok(selected(
                    config,
                    name,
                    driver,
                    SelectedBy::Priority,
                    skipped,
                ));
            }
            Err(e @ Error::UnknownDriver { .. }) => {
                skipped.push((
                    name.clone(),
                    format!("not registered in this program ({e})"),
                ));
            }
            Err(e) if e.is_not_supported() => {
                // Leave no empty home behind for a driver we did not pick.
                let _ = fs::remove_dir(config.root.join(name));
                skipped.push((name.clone(), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::NoUsableDriver { tried: skipped })
}

fn selected(
    config: &Config,
    name: &str,
    driver: Box<dyn Driver>,
    selected_by: SelectedBy,
    skipped: Vec<(String, String)>,
) -> Selected {
    Selected {
        driver,
        name: name.to_string(),
        home: config.root.join(name),
        selected_by,
        skipped,
    }
}

/// Creates `<root>/<name>` and runs the driver's init with its options.
fn init(config: &Config, name: &str) -> Result<Box<dyn Driver>> {
    let reg = lookup(name)?;
    let home = config.root.join(name);
    ensure_dir(&home, 0o700)?;
    (reg.init)(&home, &config.options_for(name))
}

/// The registered drivers whose home under `root` holds at least one layer, sorted.
///
/// A layer is a directory (not followed through a symlink) whose name is a valid layer id. An
/// empty home left behind, or one holding only the store's bookkeeping (`.lock`, `.staging/`,
/// `.mounts/`, all dot-named) or stray files, holds no layers.
pub fn prior_state(root: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for name in registered() {
        let home = root.join(name);
        let entries = match fs::read_dir(&home) {
            Ok(e) => e,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue;
            }
            Err(e) => return Err(Error::io("read directory", &home, e)),
        };
        let mut has_layers = false;
        for entry in entries {
            let entry = entry.ctx("read directory", &home)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if LayerId::new(name).is_err() {
                continue;
            }
            // `file_type` does not follow a symlink: a link is not a layer.
            if entry.file_type().ctx("stat", &entry.path())?.is_dir() {
                has_layers = true;
                break;
            }
        }
        if has_layers {
            found.push(name.to_string());
        }
    }
    Ok(found)
}

fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io("create directory", path, e)),
    }
}
