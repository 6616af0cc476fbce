//! The driver registry: drivers register `(name, init)` at link time, programs select by name.
//!
//! Registration uses [`inventory`]: a driver crate writes
//!
//! ```ignore
//! graphdriver::register_driver!("mydriver", my_init);
//! ```
//!
//! and every program that links that crate can open `"mydriver"`. Registration lives apart from
//! the driver's implementation (a `plugin` module), like containerd's plugins.
//!
//! # The linking trap
//!
//! rustc does not link a dependency that the code never names, so a binary that only lists a
//! driver crate in `Cargo.toml` sees none of its drivers. Every binary, test and bench root that
//! wants the in-tree drivers says `use drivers as _;`. The error for an unknown driver says so.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Driver, Error, Result};

/// The signature of a driver's constructor: its home (`<root>/<name>`, created by the caller)
/// and its options. Answering [`Error::NotSupported`] (or another
/// [`Error::is_not_supported`] kind) makes selection skip the driver.
pub type InitFn = fn(home: &Path, options: &DriverOptions) -> Result<Box<dyn Driver>>;

/// One registration, made with [`register_driver!`](crate::register_driver).
#[derive(Debug)]
pub struct Registration {
    /// The driver's name; also the name of its home directory.
    pub name: &'static str,
    /// Its constructor.
    pub init: InitFn,
    /// The module that registered it (for duplicate reports).
    pub module: &'static str,
}

inventory::collect!(Registration);

/// Registers a driver under `name` with its constructor ([`InitFn`]).
///
/// ```ignore
/// fn init(home: &std::path::Path, opts: &graphdriver::DriverOptions)
///     -> graphdriver::Result<Box<dyn graphdriver::Driver>> { todo!() }
/// graphdriver::register_driver!("mydriver", init);
/// ```
#[macro_export]
macro_rules! register_driver {
    ($name:expr, $init:path) => {
        $crate::inventory::submit! {
            $crate::Registration { name: $name, init: $init, module: ::core::module_path!() }
        }
    };
}

/// The registered drivers by name; [`Error::DuplicateDriver`] if a name is registered twice.
pub fn registrations() -> Result<BTreeMap<&'static str, &'static Registration>> {
    let mut map: BTreeMap<&'static str, &'static Registration> = BTreeMap::new();
    for reg in inventory::iter::<Registration> {
        if let Some(first) = map.insert(reg.name, reg) {
            // Report in a stable order, whatever order the linker chose.
            let (a, b) = if first.module <= reg.module {
                (first.module, reg.module)
            } else {
                (reg.module, first.module)
            };
            return Err(Error::DuplicateDriver {
                name: reg.name.to_string(),
                first: a.to_string(),
                second: b.to_string(),
            });
        }
    }
    Ok(map)
}

/// The names of all registered drivers, sorted (duplicates listed once).
pub fn registered() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = inventory::iter::<Registration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Finds the registration for `name`: [`Error::UnknownDriver`] (listing what is registered and
/// how to link more) if there is none, [`Error::DuplicateDriver`] if there are two.
pub fn lookup(name: &str) -> Result<&'static Registration> {
    let regs = registrations()?;
    regs.get(name).copied().ok_or_else(|| Error::UnknownDriver {
        name: name.to_string(),
        known: regs.keys().map(|s| s.to_string()).collect(),
    })
}

/// One `key=value` driver option and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverOption {
    /// The key, without any `driver.` prefix.
    pub key: String,
    /// The value as text.
    pub value: String,
    /// Where it was set (`"storage.toml:7"`, `"command line"`, `"GRAPHDRIVER_OPTS"`).
    pub origin: String,
}

/// The options handed to one driver's [`InitFn`].
///
/// Drivers read them with the typed getters and call [`DriverOptions::reject_unknown`] with the
/// keys they understand, so a misspelt option is an error that names the key and its origin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverOptions {
    options: Vec<DriverOption>,
}

impl DriverOptions {
    /// Wraps a list of options (later entries win over earlier ones with the same key).
    pub fn new(options: Vec<DriverOption>) -> Self {
        DriverOptions { options }
    }

    /// Builds options from `key=value` strings, all with the same origin.
    pub fn parse<'a>(
        driver: &str,
        items: impl IntoIterator<Item = &'a str>,
        origin: &str,
    ) -> Result<Self> {
        let mut options = Vec::new();
        for item in items {
            let (key, value) = split_option(driver, item, origin)?;
            options.push(DriverOption {
                key,
                value,
                origin: origin.to_string(),
            });
        }
        Ok(DriverOptions { options })
    }

    /// Every option, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &DriverOption> {
        self.options.iter()
    }

    /// True when no option was given.
    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&DriverOption> {
        self.options.iter().rev().find(|o| o.key == key)
    }

    /// The value of `key` as text, if given.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).map(|o| o.value.as_str())
    }

    /// The value of `key` as a boolean (`true`/`false`/`1`/`0`/`yes`/`no`), `default` if absent.
    pub fn get_bool(&self, driver: &str, key: &str, default: bool) -> Result<bool> {
        let Some(opt) = self.get(key) else {
            return Ok(default);
        };
        match opt.value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(invalid(
                driver,
                opt,
                format!("expected true or false, found {other:?}"),
            )),
        }
    }

    /// The `sync` option as a [`Durability`](crate::Durability) (`none`, `layers`, `full`, or a
    /// boolean: `false` is `none`, `true` is `full`); the default mode if absent.
    pub fn get_durability(&self, driver: &str) -> Result<crate::Durability> {
        let Some(opt) = self.get("sync") else {
            return Ok(crate::Durability::default());
        };
        crate::Durability::parse(&opt.value).ok_or_else(|| {
            invalid(
                driver,
                opt,
                format!(
                    "expected none, layers or full (or true/false), found {:?}",
                    opt.value
                ),
            )
        })
    }

    /// The value of `key` as an unsigned integer, `default` if absent.
    pub fn get_u64(&self, driver: &str, key: &str, default: u64) -> Result<u64> {
        let Some(opt) = self.get(key) else {
            return Ok(default);
        };
        opt.value.trim().parse().map_err(|_| {
            invalid(
                driver,
                opt,
                format!("expected a whole number, found {:?}", opt.value),
            )
        })
    }

    /// Fails with [`Error::InvalidOption`] for the first key not in `known`.
    pub fn reject_unknown(&self, driver: &str, known: &[&str]) -> Result<()> {
        match self
            .options
            .iter()
            .find(|o| !known.contains(&o.key.as_str()))
        {
            None => Ok(()),
            Some(opt) => Err(invalid(
                driver,
                opt,
                if known.is_empty() {
                    "unknown option: this driver takes no options".to_string()
                } else {
                    format!("unknown option, expected one of: {}", known.join(", "))
                },
            )),
        }
    }
}

fn invalid(driver: &str, opt: &DriverOption, reason: String) -> Error {
    Error::InvalidOption {
        driver: driver.to_string(),
        key: opt.key.clone(),
        origin: Some(opt.origin.clone()),
        reason,
    }
}

/// Splits `key=value`, dropping a `driver.` prefix on the key.
pub(crate) fn split_option(driver: &str, item: &str, origin: &str) -> Result<(String, String)> {
    let Some((key, value)) = item.split_once('=') else {
        return Err(Error::InvalidOption {
            driver: driver.to_string(),
            key: item.to_string(),
            origin: Some(origin.to_string()),
            reason: "no '=' in it; expected KEY=VALUE or DRIVER.KEY=VALUE \
                     (for example overlay.mount_options=nodev)"
                .to_string(),
        });
    };
    let key = key.trim();
    let key = key
        .strip_prefix(driver)
        .and_then(|k| k.strip_prefix('.'))
        .unwrap_or(key);
    if key.is_empty() {
        return Err(Error::InvalidOption {
            driver: driver.to_string(),
            key: item.to_string(),
            origin: Some(origin.to_string()),
            reason: "the key is empty; expected KEY=VALUE or DRIVER.KEY=VALUE \
                     (for example overlay.mount_options=nodev)"
                .to_string(),
        });
    }
    Ok((key.to_string(), value.to_string()))
}
