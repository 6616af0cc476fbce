//! Log output on stderr in graphctl's own style: `warning: what happened (key: value; ...)`,
//! one line per event, like the `error:` and `note:` lines.
//!
//! Colour (the level word only) is used only when stderr is a terminal and `NO_COLOR` is unset
//! or empty (<https://no-color.org>). A field recorded with `?` (a Debug dump such as
//! `Recovery { staging_removed: [], incomplete_removed: ["big"], ... }`) is shortened to the
//! fields that hold something (`incomplete_removed: ["big"]`). Control characters in messages
//! and fields (paths from layers may hold them) are escaped, never sent to the terminal.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the stderr logger; `RUST_LOG` wins over `-v` (`verbose` 0 warn, 1 info, 2 debug,
/// more trace).
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .event_format(Plain)
        .try_init();
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything but the empty string.
fn use_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The event format: `level: message (key: value; ...)`; the target too at debug and trace.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let (word, colour) = match *meta.level() {
            Level::ERROR => ("error", "31"),
            Level::WARN => ("warning", "33"),
            Level::INFO => ("info", "32"),
            Level::DEBUG => ("debug", "34"),
            Level::TRACE => ("trace", "35"),
        };
        if writer.has_ansi_escapes() {
            write!(writer, "\x1b[1;{colour}m{word}:\x1b[0m ")?;
        } else {
            write!(writer, "{word}: ")?;
        }
        if *meta.level() >= Level::DEBUG {
            write!(writer, "{}: ", meta.target())?;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = fields.message;
        if !fields.rest.is_empty() {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = write!(line, "({})", fields.rest.join("; "));
        }
        writeln!(writer, "{}", crate::one_line(&line))
    }
}

/// An event's message and its other fields as `key: value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest.push(format!("{}: {value}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Display fields (`%x`) arrive here too, formatted by their Display.
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.rest
                .push(format!("{}: {}", field.name(), shorten_debug(&text)));
        }
    }
}

/// `Name { a: [], b: ["x"], c: None }` becomes `b: ["x"]`: the type name and the empty fields
/// (`[]`, `{}`, `None`, `""`) of a Debug-printed struct are left out (`nothing` if none is
/// left). Anything else is returned as it is.
fn shorten_debug(text: &str) -> String {
    let Some((name, inner)) = text.split_once(" { ") else {
        return text.to_string();
    };
    let Some(inner) = inner.strip_suffix(" }") else {
        return text.to_string();
    };
    let is_type_name = name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !is_type_name {
        return text.to_string();
    }
    let Some(parts) = split_top_level(inner) else {
        return text.to_string();
    };
    let kept: Vec<&str> = parts
        .into_iter()
        .filter(|p| match p.split_once(": ") {
            Some((_, v)) => !matches!(v, "[]" | "{}" | "None" | "\"\""),
            None => true,
        })
        .collect();
    if kept.is_empty() {
        "nothing".to_string()
    } else {
        kept.join(", ")
    }
}

/// `text` split at the `, ` that are outside brackets and quoted strings; `None` if the
/// brackets or quotes do not balance (not Debug output after all).
fn split_top_level(text: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '(' | '{' => depth += 1,
            ']' | ')' | '}' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 && text[i..].starts_with(", ") => {
                parts.push(&text[start..i]);
                start = i + 2;
            }
            _ => {}
        }
    }
    if depth != 0 || in_string {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_structs_keep_only_what_they_hold() {
        assert_eq!(
            shorten_debug(
                r#"Recovery { staging_removed: [], incomplete_removed: ["big", "a, b"], failed: [] }"#
            ),
            r#"incomplete_removed: ["big", "a, b"]"#
        );
        assert_eq!(shorten_debug("Recovery { a: [], b: None }"), "nothing");
        for plain in [
            "/var/lib/graphctl/vfs",
            r#"[("a", 1)]"#,
            "No { such: \"thing }",
            "lower { a: [] }",
        ] {
            assert_eq!(shorten_debug(plain), plain);
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }
}
