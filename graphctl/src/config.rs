//! graphctl's configuration policy: where the store and the config file live by default and
//! which environment variables are read. The core (`graphdriver::Config`) only parses and
//! merges; these choices are the tool's, as containers-storage's defaults are podman's.
//!
//! Precedence: command-line flags, then the environment (`GRAPHDRIVER`, `GRAPHDRIVER_OPTS`),
//! then the file, then the defaults below.

use std::path::{Path, PathBuf};

use graphdriver::{Config, Error, Result};

/// Environment variable naming the driver (like containers-storage's `STORAGE_DRIVER`).
pub const ENV_DRIVER: &str = "GRAPHDRIVER";
/// Environment variable with comma-separated `[driver.]key=value` options.
pub const ENV_OPTS: &str = "GRAPHDRIVER_OPTS";
/// Environment variable naming the config file (like `CONTAINERS_STORAGE_CONF`).
pub const ENV_CONFIG: &str = "GRAPHCTL_CONFIG";

/// The default storage root for the current user: `/var/lib/graphctl` for root, else
/// `$XDG_DATA_HOME/graphctl` or `~/.local/share/graphctl`.
pub fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/graphctl");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("graphctl");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/graphctl"),
        None => PathBuf::from("/var/lib/graphctl"),
    }
}

/// The config file read when none is named: `/etc/graphctl/storage.toml` for root, else
/// `$XDG_CONFIG_HOME/graphctl/storage.toml` (or `~/.config/graphctl/storage.toml`). Optional:
/// missing means the defaults.
pub fn default_config_path() -> Option<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Some(PathBuf::from("/etc/graphctl/storage.toml"));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("graphctl/storage.toml"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".config/graphctl/storage.toml"))
}

/// Reads the configuration over the defaults.
///
/// With `path` (`--config`), that file must exist and be readable; so must a file named by
/// `$GRAPHCTL_CONFIG` (the error names the variable). Otherwise the default file
/// ([`default_config_path`]) is read if it exists; when it is missing the defaults are used,
/// and when it cannot be read (permission denied, a directory) a warning says so and the
/// defaults are used.
pub fn load(path: Option<&Path>) -> Result<Config> {
    if let Some(path) = path {
        return load_required(path, "--config");
    }
    if let Some(p) = std::env::var_os(ENV_CONFIG).filter(|p| !p.is_empty()) {
        return load_required(Path::new(&p), ENV_CONFIG);
    }
    match default_config_path() {
        Some(path) => load_default(&path),
        None => Ok(defaults()),
    }
}

/// The configuration before any file: the default root, automatic selection.
fn defaults() -> Config {
    Config::new(default_root())
}

/// Reads `path`, which must exist: `named_by` (`--config`, `GRAPHCTL_CONFIG`) named it.
fn load_required(path: &Path, named_by: &str) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => Config::from_toml(defaults(), &text, path),
        Err(e) => Err(Error::Config {
            message: format!(
                "cannot read the file named by {named_by}: {e}; point {named_by} at a \
                 readable config file{}",
                if named_by == ENV_CONFIG {
                    " or unset it to use the default"
                } else {
                    ""
                }
            ),
            path: path.to_path_buf(),
        }),
    }
}

/// Reads the default config file `path` if it exists; an unreadable one is a warning.
fn load_default(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => Config::from_toml(defaults(), &text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(defaults()),
        Err(e) => {
            tracing::warn!(
                "cannot read the config file {}: {e}; using the defaults (fix its \
                 permissions, or name another file with --config or {ENV_CONFIG})",
                path.display()
            );
            Ok(defaults())
        }
    }
}

/// Applies `GRAPHDRIVER` and `GRAPHDRIVER_OPTS` from the environment over `config`.
pub fn apply_env(config: &mut Config) -> Result<()> {
    if let Some(driver) = std::env::var(ENV_DRIVER).ok().filter(|d| !d.is_empty()) {
        config.driver = Some(driver);
    }
    if let Ok(opts) = std::env::var(ENV_OPTS) {
        for item in opts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            config.add_option(item, ENV_OPTS)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = load(Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn load_reads_a_real_file_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("storage.toml");
        std::fs::write(&file, "[storage]\ndriver = \"vfs\"\n").unwrap();
        let c = load(Some(&file)).unwrap();
        assert_eq!(c.driver.as_deref(), Some("vfs"));
        assert_eq!(c.source.as_deref(), Some(file.as_path()));
        assert_eq!(c.root, default_root());
    }
}
