//! What scripts read: the `--json` form of every command and of errors.
//!
//! Every JSON document graphctl writes is one object with `schema_version` (this module's
//! [`SCHEMA_VERSION`]) and `command` (the subcommand as typed, e.g. `"diff-size"`), then the
//! command's own keys: snake_case names, numbers as numbers, `null` where a value is unknown.
//! `graphctl/schema/v1.json` (JSON Schema 2020-12) describes each command's keys; a key is
//! added to a version only when old readers may ignore it, anything else makes a new version.
//!
//! An error, with `--json`, is such an object on stderr with an `error` key: `kind` (a stable
//! snake_case name such as `not_found`), `message` (the line the text form prints) and `hint`
//! (what to do, or `null`).

use std::fmt;
use std::io::{self, Write};
use std::sync::OnceLock;

use anyhow::Result;
use serde_json::{Map, Value, json};

/// The version of the JSON documents this graphctl writes.
pub const SCHEMA_VERSION: u64 = 1;

/// The command being run, for the `command` key (set once by [`set_command`]).
static COMMAND: OnceLock<&'static str> = OnceLock::new();

/// Records the name of the command this process runs, for every document it prints.
pub fn set_command(name: &'static str) {
    let _ = COMMAND.set(name);
}

/// `value` (an object) with `schema_version` and `command` added.
fn document(value: Value) -> Value {
    let mut obj = match value {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("value".into(), other);
            map
        }
    };
    obj.insert("schema_version".into(), json!(SCHEMA_VERSION));
    // `null` when the command line could not be parsed.
    obj.insert("command".into(), json!(COMMAND.get().copied()));
    Value::Object(obj)
}

/// Prints `value` (an object of the command's keys) as the command's JSON document on stdout;
/// a write error (a closed pipe included) is returned.
pub fn print_json(value: Value) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &document(value))?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The JSON error document for an error of kind `kind` with the one-line `message` and `hint`,
/// as one line (for stderr).
pub fn error_json(kind: &str, message: &str, hint: Option<&str>) -> String {
    document(json!({"error": {"kind": kind, "message": message, "hint": hint}})).to_string()
}

/// An error graphctl itself raises about how it was called (not about the store), with the
/// kind its JSON form reports.
#[derive(Debug)]
pub struct CliError {
    /// The stable kind, e.g. `invalid_argument`.
    pub kind: &'static str,
    /// What happened and what to do.
    pub message: String,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// An [`anyhow::Error`] of kind `invalid_argument`: the command line asks for something that
/// cannot be done this way; `message` says what to do instead.
pub fn invalid_argument(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(CliError {
        kind: "invalid_argument",
        message: message.into(),
    })
}

/// The kind of `err` for its JSON form: the most specific kind a cause carries (a layer tar's
/// `bad_entry` over the driver's `archive`, the driver's over the image importer's), `io` for a
/// bare OS error, else `error`.
pub fn error_kind(err: &anyhow::Error) -> &'static str {
    let chain = || err.chain();
    if let Some(e) = chain().find_map(|c| c.downcast_ref::<CliError>()) {
        return e.kind;
    }
    // The confined apply's error is transparent over the tar code's: ask it first.
    if let Some(e) = chain().find_map(|c| c.downcast_ref::<chrootarchive::Error>()) {
        return e.kind();
    }
    if let Some(e) = chain().find_map(|c| c.downcast_ref::<archive::Error>()) {
        return e.kind();
    }
    if let Some(e) = chain().find_map(|c| c.downcast_ref::<graphdriver::Error>()) {
        return e.kind();
    }
    if let Some(e) = chain().find_map(|c| c.downcast_ref::<graphdriver_image::Error>()) {
        return e.kind();
    }
    if chain().any(|c| c.is::<io::Error>()) {
        return "io";
    }
    "error"
}
