//! Configuration: which driver, where the store lives, and driver options.
//!
//! Modelled on containers-storage's `storage.conf`:
//!
//! ```toml
//! [storage]
//! driver = "overlay"                  # optional; otherwise prior state, then priority
//! root = "/var/lib/graphctl"          # each driver's home is <root>/<driver>
//! driver_priority = ["overlay", "vfs"]
//!
//! [storage.options.overlay]
//! mount_options = "nodev"
//! ```
//!
//! Per-driver tables flatten to `key=value` options, the same form as `-o overlay.key=value` on
//! the command line and `GRAPHDRIVER_OPTS`, so one parser ([`crate::DriverOptions`]) serves all
//! three. Precedence: command line, then the environment (`GRAPHDRIVER`, `GRAPHDRIVER_OPTS`),
//! then the file, then defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::registry::split_option;
use crate::{DriverOption, DriverOptions, Error, Result};

/// The driver order tried when nothing else decides.
pub const DEFAULT_PRIORITY: &[&str] = &["overlay", "vfs"];

/// Environment variable naming the driver (like `STORAGE_DRIVER`).
pub const ENV_DRIVER: &str = "GRAPHDRIVER";
/// Environment variable with comma-separated `[driver.]key=value` options.
pub const ENV_OPTS: &str = "GRAPHDRIVER_OPTS";
/// Environment variable naming the config file (like `CONTAINERS_STORAGE_CONF`).
pub const ENV_CONFIG: &str = "GRAPHCTL_CONFIG";

/// A resolved configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The driver to use; `None` selects automatically (prior state, then priority).
    pub driver: Option<String>,
    /// The storage root; each driver's home is `<root>/<driver>`.
    pub root: PathBuf,
    /// The order in which drivers are tried when selecting automatically.
    pub driver_priority: Vec<String>,
    /// Driver options; `scope` is the driver they are for (`None`: whichever is selected).
    pub options: Vec<ScopedOption>,
    /// The file this configuration was read from, if any.
    pub source: Option<PathBuf>,
}

/// A driver option and the driver it is meant for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopedOption {
    /// The driver the option is for; `None` for the selected driver, whichever it is.
    pub scope: Option<String>,
    /// The option.
    pub option: DriverOption,
}

/// One `[storage.options.<driver>]` table, with spans for error messages.
type OptionTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    storage: Option<StorageRepr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageRepr {
    driver: Option<String>,
    root: Option<PathBuf>,
    driver_priority: Option<Vec<String>>,
    options: Option<BTreeMap<String, OptionTable>>,
}

impl Default for Config {
    /// Automatic selection, the default priority, and the default root for this user:
    /// `/var/lib/graphctl` for root, else `$XDG_DATA_HOME/graphctl` or `~/.local/share/graphctl`.
    fn default() -> Self {
        Config {
            driver: None,
            root: default_root(),
            driver_priority: DEFAULT_PRIORITY.iter().map(|s| s.to_string()).collect(),
            options: Vec::new(),
            source: None,
        }
    }
}

/// The default storage root for the current user.
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

/// The config file read when none is named: `$GRAPHCTL_CONFIG`, else `/etc/graphctl/storage.toml`
/// for root, else `$XDG_CONFIG_HOME/graphctl/storage.toml` (or `~/.config/graphctl/storage.toml`).
///
/// A file named by `$GRAPHCTL_CONFIG` must exist ([`Config::load`]); the others are optional.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_CONFIG).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
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

impl Config {
    /// Reads the configuration.
    ///
    /// With `path`, that file must exist and be readable; so must a file named by
    /// `$GRAPHCTL_CONFIG` (the error names the variable). Otherwise the default file
    /// ([`default_config_path`]) is read if it exists; when it is missing the defaults are used,
    /// and when it cannot be read (permission denied, a directory) a warning says so through
    /// `tracing` and the defaults are used.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        if let Some(path) = path {
            return Config::load_required(path, "--config");
        }
        if let Some(p) = std::env::var_os(ENV_CONFIG).filter(|p| !p.is_empty()) {
            return Config::load_required(Path::new(&p), ENV_CONFIG);
        }
        match default_config_path() {
            Some(path) => Config::load_default(&path),
            None => Ok(Config::default()),
        }
    }

    /// Reads `path`, which must exist: `named_by` (`--config`, `GRAPHCTL_CONFIG`) named it.
    fn load_required(path: &Path, named_by: &str) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml(&text, path),
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
            Ok(text) => Config::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => {
                tracing::warn!(
                    "cannot read the config file {}: {e}; using the defaults (fix its \
                     permissions, or name another file with --config or {ENV_CONFIG})",
                    path.display()
                );
                Ok(Config::default())
            }
        }
    }

    /// Parses `text` as a config file; `path` names it in errors.
    ///
    /// Unknown keys, wrong types and malformed TOML are errors naming the file, line and key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config> {
        let config_err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let repr: FileRepr =
            toml::from_str(text).map_err(|e| config_err(describe_toml_error(text, &e)))?;
        let mut config = Config {
            source: Some(path.to_path_buf()),
            ..Config::default()
        };
        let Some(storage) = repr.storage else {
            return Ok(config);
        };
        if let Some(driver) = storage.driver.filter(|d| !d.is_empty()) {
            config.driver = Some(driver);
        }
        if let Some(root) = storage.root {
            if !root.is_absolute() {
                return Err(config_err(format!(
                    "key storage.root: expected an absolute path, found {:?}",
                    root.display().to_string()
                )));
            }
            config.root = root;
        }
        if let Some(priority) = storage.driver_priority {
            config.driver_priority = priority;
        }
        for (driver, table) in storage.options.unwrap_or_default() {
            for (key, value) in table {
                let line = line_of(text, key.span().start);
                let origin = format!("{}:{line}", path.display());
                let value = match value.get_ref() {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Array(items) => {
                        let mut parts = Vec::new();
                        for item in items {
                            match item {
                                toml::Value::String(s) => parts.push(s.clone()),
                                other => parts.push(other.to_string()),
                            }
                        }
                        parts.join(",")
                    }
                    other => {
                        return Err(config_err(format!(
                            "line {line}, key storage.options.{driver}.{}: expected a string, number, boolean or array, found a {}",
                            key.get_ref(),
                            other.type_str()
                        )));
                    }
                };
                config.options.push(ScopedOption {
                    scope: Some(driver.clone()),
                    option: DriverOption {
                        key: key.into_inner(),
                        value,
                        origin,
                    },
                });
            }
        }
        Ok(config)
    }

    /// Applies `GRAPHDRIVER` and `GRAPHDRIVER_OPTS` from the environment over this config.
    pub fn apply_env(&mut self) -> Result<()> {
        if let Some(driver) = std::env::var(ENV_DRIVER).ok().filter(|d| !d.is_empty()) {
            self.driver = Some(driver);
        }
        if let Ok(opts) = std::env::var(ENV_OPTS) {
            for item in opts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                self.add_option(item, ENV_OPTS)?;
            }
        }
        Ok(())
    }

    /// Adds an option given as `key=value` (for the selected driver) or `driver.key=value` (for
    /// that driver only, when `driver` is a registered name); `origin` names where it came from.
    pub fn add_option(&mut self, item: &str, origin: &str) -> Result<()> {
        let registered = crate::registered();
        let scope = item
            .split_once('=')
            .and_then(|(k, _)| k.split_once('.'))
            .map(|(d, _)| d.trim())
            .filter(|d| registered.contains(d))
            .map(str::to_string);
        let (key, value) = split_option(scope.as_deref().unwrap_or(""), item, origin)?;
        self.options.push(ScopedOption {
            scope,
            option: DriverOption {
                key,
                value,
                origin: origin.to_string(),
            },
        });
        Ok(())
    }

    /// The options meant for `driver`: those scoped to it and the unscoped ones, in order.
    pub fn options_for(&self, driver: &str) -> DriverOptions {
        DriverOptions::new(
            self.options
                .iter()
                .filter(|o| o.scope.as_deref().is_none_or(|s| s == driver))
                .map(|o| o.option.clone())
                .collect(),
        )
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

/// toml's message with the line number and key in front, on one line.
///
/// The file may hold secrets, so neither the offending line nor a string value is echoed: the
/// message names the line, the key when it is a plain TOML key, and what was wrong, with quoted
/// values replaced by `(value not shown)`.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let msg = redact_quoted(err.message().trim()).replace('\n', " ");
    let Some(span) = err.span() else {
        return msg;
    };
    let line = line_of(text, span.start);
    let source_line = text.lines().nth(line - 1).unwrap_or("").trim();
    let key = source_line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| is_plain_key(k));
    match key {
        Some(key) => format!("line {line}, key {key}: {msg}"),
        None => format!("line {line}: {msg}"),
    }
}

/// True for a dotted TOML bare key of a sane length (`storage.driver`, `mount_options`): the
/// only part of a line an error message repeats.
fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `msg` with every double-quoted run (serde quotes string values it did not expect, `\"`
/// escapes inside) replaced by `(value not shown)`, and every backquoted run (a key serde did
/// not expect) that is not a plain key replaced by `(key not shown)`.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        if c == '`' {
            let quoted: String = chars.by_ref().take_while(|c| *c != '`').collect();
            if is_plain_key(&quoted) {
                out.push('`');
                out.push_str(&quoted);
                out.push('`');
            } else {
                out.push_str("(key not shown)");
            }
            continue;
        }
        if c != '"' {
            out.push(c);
            continue;
        }
        out.push_str("(value not shown)");
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_toml(text, Path::new("/etc/graphctl/storage.toml"))
    }

    #[test]
    fn good_file() {
        let c = parse(
            r#"
[storage]
driver = "overlay"
root = "/srv/layers"
driver_priority = ["vfs", "overlay"]

[storage.options.overlay]
mount_options = "nodev"
sync = true
"#,
        )
        .unwrap();
        assert_eq!(c.driver.as_deref(), Some("overlay"));
        assert_eq!(c.root, PathBuf::from("/srv/layers"));
        assert_eq!(c.driver_priority, vec!["vfs", "overlay"]);
        let opts = c.options_for("overlay");
        assert_eq!(opts.get_str("mount_options"), Some("nodev"));
        assert!(opts.get_bool("overlay", "sync", false).unwrap());
        assert_eq!(
            opts.get("sync").unwrap().origin,
            "/etc/graphctl/storage.toml:9"
        );
        assert!(c.options_for("vfs").is_empty());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.driver, None);
        assert_eq!(c.driver_priority, vec!["overlay", "vfs"]);
        assert_eq!(c.root, default_root());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[storage]\ndriver = \"vfs\"\ndriverr = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Config { .. }));
        assert!(msg.contains("/etc/graphctl/storage.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("driverr"), "{msg}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let msg = parse("[storag]\ndriver = \"vfs\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 1") && msg.contains("storag"), "{msg}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let msg = parse("[storage]\n\ndriver_priority = \"overlay\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("driver_priority"), "{msg}");
    }

    #[test]
    fn relative_root_is_refused() {
        let msg = parse("[storage]\nroot = \"layers\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("storage.root") && msg.contains("absolute"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_toml_names_line() {
        let msg = parse("[storage]\ndriver = \n").unwrap_err().to_string();
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn nested_table_option_is_refused() {
        let msg = parse("[storage.options.overlay.deep]\nx = 1\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("deep"), "{msg}");
    }

    #[test]
    fn errors_never_echo_the_file() {
        let secret = "hunter2-s3cr3t";
        for text in [
            // Malformed TOML on a line that holds a secret and no key.
            format!("[storage]\n{secret}\n"),
            format!("[storage]\ndriver = \"vfs\" {secret}\n"),
            // A string where a list was expected: serde would quote the value.
            format!("[storage]\ndriver_priority = \"{secret}\"\n"),
            format!("[storage]\ndriver_priority = \"a\\\"{secret}\"\n"),
            // An unterminated string.
            format!("[storage]\ndriver = \"{secret}\n"),
            // A quoted key that is no plain key (a plain one is named: it is the key).
            format!("[storage]\n\"{secret} and more\" = 1\n"),
        ] {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(!msg.contains(secret), "{text:?}: {msg}");
            assert!(msg.contains("/etc/graphctl/storage.toml"), "{msg}");
            assert!(msg.contains("line 2"), "{text:?}: {msg}");
        }
        let msg = parse(&format!("[storage]\ndriver_priority = \"{secret}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("key driver_priority"), "{msg}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn load_reads_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("storage.toml");
        std::fs::write(&file, "[storage]\ndriver = \"vfs\"\n").unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.driver.as_deref(), Some("vfs"));
        assert_eq!(c.source.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn unscoped_options_apply_to_any_driver() {
        let mut c = Config::default();
        c.add_option("sync=true", "command line").unwrap();
        assert_eq!(c.options_for("vfs").get_str("sync"), Some("true"));
        assert_eq!(c.options_for("overlay").get_str("sync"), Some("true"));
        assert!(c.add_option("novalue", "command line").is_err());
    }
}
