//! graphctl: the command-line tool for graph driver layer stores.
//!
//! This binary is argument parsing plus glue: [`flags`] turns the command line, environment and
//! config file into a [`graphdriver::Config`]; [`commands`] opens the selected driver and calls
//! one driver method per subcommand; `import` is [`graphdriver_image::import`] with the progress
//! bars of [`image`].
//!
//! Exit status: 0 on success, 1 on an error (one `error:` line on stderr), 2 on a usage error;
//! `exists` answers 0 or 1 and uses 125 for an error, as podman does.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

// The in-tree drivers register themselves at link time; naming the crate links it.
use drivers as _;

mod blob;
mod commands;
mod config;
mod flags;
mod image;
mod limits;
mod logging;
mod output;
mod usage;

fn main() -> ExitCode {
    let cli = match flags::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            if e.use_stderr() && std::env::args_os().any(|a| a == "--json") {
                // The first line of clap's text, without its "error: ".
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or_default();
                let message = one_line(first.strip_prefix("error: ").unwrap_or(first));
                let _ = writeln!(
                    std::io::stderr(),
                    "{}",
                    output::error_json("usage", &message, Some("see graphctl --help"))
                );
                return ExitCode::from(2);
            }
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    output::set_command(cli.command.name());
    logging::init(cli.verbose);
    let nofile = limits::raise_nofile_limit();
    tracing::debug!(
        before = ?nofile.before,
        after = ?nofile.after,
        hard = ?nofile.hard,
        "open-file limit"
    );
    match commands::run(&cli) {
        Ok(status) => status,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let message = one_line(&describe(&err));
            let hint = hint(&err).map(|h| one_line(&h));
            let line = if cli.json {
                output::error_json(output::error_kind(&err), &message, hint.as_deref())
            } else {
                match &hint {
                    Some(hint) => format!("error: {message}; {hint}"),
                    None => format!("error: {message}"),
                }
            };
            let _ = writeln!(std::io::stderr(), "{line}");
            ExitCode::from(cli.command.error_status())
        }
    }
}

/// The error and its causes on one line, `a: b: c`, leaving out a cause whose text the line
/// already holds (some errors print their source in their own message).
fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `text` on one line that cannot move the cursor or colour the terminal: a newline becomes a
/// space, any other control character (C0, DEL, C1) a `\xNN` or `\u{NNNN}` escape. Error
/// messages name paths from layers, which may hold such characters.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push(' '),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// True when the error is a closed stdout (`graphctl diff X | head`): not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// What the user can do about an error, where we can tell.
fn hint(err: &anyhow::Error) -> Option<String> {
    use graphdriver::Error as E;
    for cause in err.chain() {
        if let Some(
            graphdriver_image::Error::ReuseDiffId { id, .. }
            | graphdriver_image::Error::ReuseParent { id, .. },
        ) = cause.downcast_ref::<graphdriver_image::Error>()
        {
            return Some(format!("`graphctl rm {id}` removes it"));
        }
        if let Some(e) = cause.downcast_ref::<E>() {
            match e {
                E::NotFound(_) => {
                    return Some("`graphctl ls` lists the layers of this store".into());
                }
                E::InUse { id, .. } => {
                    return Some(format!("unmount it first with `graphctl unmount {id}`"));
                }
                E::AlreadyExists(_) => {
                    return Some("choose another id or remove the layer first".into());
                }
                _ => {}
            }
            let path = match e {
                E::Io { path, .. } => Some(path.as_path()),
                E::Mount { target, .. } => Some(target.as_path()),
                _ => None,
            };
            if let Some(hint) = e.errno().and_then(|n| errno_hint(n, path)) {
                return Some(hint);
            }
        }
        if let Some(code) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .and_then(|n| errno_hint(n, None))
        {
            return Some(code);
        }
    }
    None
}

/// What to do about OS error `errno`, met on `path` when known.
fn errno_hint(errno: i32, path: Option<&std::path::Path>) -> Option<String> {
    match errno {
        libc::EACCES => Some(access_hint(path, &config::default_root())),
        _ => other_errno_hint(errno),
    }
}

/// The hint for "permission denied" on `path`: choose a root you own, suggesting the default
/// root `default` unless that is where the error happened (or on the way to it): then it says
/// to fix the permissions there or to choose another root.
fn access_hint(path: Option<&std::path::Path>, default: &std::path::Path) -> String {
    match path {
        Some(p) if p.starts_with(default) || default.starts_with(p) => format!(
            "this user may not write {}: fix the permissions there (or of the directory above), \
             or choose another --root, in a directory you own",
            p.display()
        ),
        _ => format!(
            "choose a --root you own (e.g. --root {})",
            default.display()
        ),
    }
}

fn other_errno_hint(errno: i32) -> Option<String> {
    match errno {
        libc::EROFS => {
            Some("the storage root is read-only; choose a writable one with --root".into())
        }
        libc::ENOSPC => {
            Some("no space left on the device; free some space or choose another --root".into())
        }
        libc::EPERM => Some("this operation needs more privileges here (run as root)".into()),
        _ => None,
    }
}
