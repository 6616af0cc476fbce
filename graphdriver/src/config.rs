//! Configuration: which driver, where the store lives, and driver options.
//!
//! Modelled on containers-storage's `storage.conf`:
//!
//! ```toml
//! [storage]
//! driver = "overlay"                  # optional; otherwise prior state, then priority
//! root = "/var/lib/graphctl"          # each driver's home is <root>/<driver>
//! driver_priority = ["overlay2", "overlay", "vfs"]
//!
//! [storage.options.overlay]
//! mount_options = "nodev"
//! ```
//!
//! Per-driver tables flatten to `key=value` options, the same form a tool takes on its command
//! line or from its environment ([`Config::add_option`]), so one parser
//! ([`crate::DriverOptions`]) serves them all. Where the file and the store live by default,
//! which environment variables are read and in what order is the tool's policy: graphctl's is
//! in its `config` module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::registry::split_option;
use crate::{DriverOption, DriverOptions, Error, Result};

/// The driver order tried when nothing else decides.
pub const DEFAULT_PRIORITY: &[&str] = &["overlay2", "overlay", "vfs"];

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

impl Config {
    /// A configuration with automatic selection, the default priority, no options and the
    /// storage root `root`. Where the root and the config file live by default is the tool's
    /// policy, not the core's (graphctl: `/var/lib/graphctl`, `/etc/graphctl/storage.toml`).
    pub fn new(root: impl Into<PathBuf>) -> Config {
        Config {
            driver: None,
            root: root.into(),
            driver_priority: DEFAULT_PRIORITY.iter().map(|s| s.to_string()).collect(),
            options: Vec::new(),
            source: None,
        }
    }

    /// Parses `text` as a config file over `base` (what the file does not set stays as in
    /// `base`); `path` names the file in errors.
    ///
    /// Unknown keys, wrong types and malformed TOML are errors naming the file, line and key.
    pub fn from_toml(base: Config, text: &str, path: &Path) -> Result<Config> {
        let config_err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let repr: FileRepr =
            toml::from_str(text).map_err(|e| config_err(describe_toml_error(text, &e)))?;
        let mut config = Config {
            source: Some(path.to_path_buf()),
            ..base
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
        Config::from_toml(
            Config::new("/default/root"),
            text,
            Path::new("/etc/graphctl/storage.toml"),
        )
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
        assert_eq!(c.driver_priority, vec!["overlay2", "overlay", "vfs"]);
        assert_eq!(c.root, PathBuf::from("/default/root"));
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
    fn unscoped_options_apply_to_any_driver() {
        let mut c = Config::new("/r");
        c.add_option("sync=true", "command line").unwrap();
        assert_eq!(c.options_for("vfs").get_str("sync"), Some("true"));
        assert_eq!(c.options_for("overlay").get_str("sync"), Some("true"));
        assert!(c.add_option("novalue", "command line").is_err());
    }
}
