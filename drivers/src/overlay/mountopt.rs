//! The `mount_options` of the overlay driver, told apart and checked as containers-storage's
//! `mountopt` does: generic mount flags go to `mount(2)`'s flags, overlay options to its data,
//! and nothing may override what the driver itself controls.
//!
//! `mount_options` is a comma-separated list (commas inside a double-quoted value, as in an
//! SELinux label, do not split it; spaces around an item are ignored):
//!
//! * **Mount flags:** `nodev`, `nosuid`, `noexec`, `noatime`, `nodiratime`, `relatime`,
//!   `strictatime`, `lazytime`, `sync`, `dirsync`, and their no-op opposites `dev`, `suid`,
//!   `exec`, `atime`, `diratime`, `async`, `rw`. `ro` is refused: the driver writes through its
//!   mounts (read-write layers, applies).
//! * **Overlay options that do not change how layers are stored:** `xino=on|off|auto`,
//!   `uuid=on|off|null|auto`, `default_permissions`, the SELinux labels `context=`,
//!   `fscontext=`, `defcontext=`, `rootcontext=`, and the safe settings `redirect_dir=off`,
//!   `redirect_dir=nofollow`, `metacopy=off`, `verity=off`, `nfs_export=off`.
//! * **Refused, naming the option:** what the driver sets (`lowerdir`, `upperdir`, `workdir`,
//!   `lowerdir+`, `datadir+`, `index`), what changes what the upper directory holds and so what
//!   `diff` and `changes` read (`redirect_dir=on|follow`, `metacopy=on`, `verity=on|require`,
//!   `userxattr`, which moves whiteouts and opaque markers to `user.overlay.*`), what breaks the
//!   durability the driver promises (`volatile`), `nfs_export=on` (needs `index`), any other
//!   key, an empty item (`nodev,,upperdir=/x`), an empty key (`=x`), a key with characters
//!   other than `a-z 0-9 _ +`, and a value with a control character, or a stray quote.

use rustix::mount::MountFlags;

/// `mount_options` split into mount flags and overlay mount data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for `mount(2)` (`MS_NODEV`, ...).
    pub flags: MountFlags,
    /// Overlay options, each `key` or `key=value`, appended after the driver's own.
    pub data: Vec<String>,
}

impl Default for MountOptions {
    /// No flags, no data.
    fn default() -> Self {
        MountOptions {
            flags: MountFlags::empty(),
            data: Vec::new(),
        }
    }
}

/// What a key may be.
enum Rule {
    /// A mount flag that sets these bits.
    Set(MountFlags),
    /// A mount flag that clears these bits (the default already has them clear).
    Clear(MountFlags),
    /// An overlay option with no value.
    Bare,
    /// An overlay option with one of these values.
    Values(&'static [&'static str]),
    /// An overlay option whose value is a security label (quoted if it holds commas).
    Label,
    /// Refused, for this reason.
    Refused(&'static str),
}

const DRIVER_SETS: &str = "set by the driver for each layer and cannot be overridden";

fn rule(key: &str) -> Option<Rule> {
    use MountFlags as F;
    Some(match key {
        "nodev" => Rule::Set(F::NODEV),
        "nosuid" => Rule::Set(F::NOSUID),
        "noexec" => Rule::Set(F::NOEXEC),
        "noatime" => Rule::Set(F::NOATIME),
        "nodiratime" => Rule::Set(F::NODIRATIME),
        "relatime" => Rule::Set(F::RELATIME),
        "strictatime" => Rule::Set(F::STRICTATIME),
        "lazytime" => Rule::Set(F::LAZYTIME),
        "sync" => Rule::Set(F::SYNCHRONOUS),
        "dirsync" => Rule::Set(F::DIRSYNC),
        "dev" => Rule::Clear(F::NODEV),
        "suid" => Rule::Clear(F::NOSUID),
        "exec" => Rule::Clear(F::NOEXEC),
        "atime" => Rule::Clear(F::NOATIME),
        "diratime" => Rule::Clear(F::NODIRATIME),
        "async" => Rule::Clear(F::SYNCHRONOUS),
        "rw" => Rule::Clear(F::RDONLY),
        "ro" => Rule::Refused(
            "the driver writes through its mounts (read-write layers, applies); a read-only mount \
             would break them",
        ),
        "xino" => Rule::Values(&["on", "off", "auto"]),
        "uuid" => Rule::Values(&["on", "off", "null", "auto"]),
        "redirect_dir" => Rule::Values(&["off", "nofollow"]),
        "metacopy" => Rule::Values(&["off"]),
        "verity" => Rule::Values(&["off"]),
        "nfs_export" => Rule::Values(&["off"]),
        "default_permissions" => Rule::Bare,
        "context" | "fscontext" | "defcontext" | "rootcontext" => Rule::Label,
        "lowerdir" | "upperdir" | "workdir" | "lowerdir+" | "datadir+" | "index" => {
            Rule::Refused(DRIVER_SETS)
        }
        "userxattr" => Rule::Refused(
            "it moves whiteouts and opaque markers to user.overlay.* xattrs, which diff and \
             changes would not see",
        ),
        "volatile" => Rule::Refused(
            "it skips the syncs the driver relies on, and a crash leaves layers that cannot be \
             mounted again",
        ),
        _ => return None,
    })
}

/// Why `value` of `key` is refused, if it is, given the allowed `values`.
fn value_reason(key: &str, value: Option<&str>, values: &[&str]) -> Option<String> {
    match value {
        Some(v) if values.contains(&v) => None,
        Some(v) => Some(match key {
            "redirect_dir" | "metacopy" | "verity" => format!(
                "{key}={v} changes what the upper directory holds (redirects, metadata-only \
                 copies), which diff and changes do not follow; allowed: {}",
                values.join(", ")
            ),
            "nfs_export" => format!(
                "{key}={v} needs the index feature, which the driver turns off; allowed: {}",
                values.join(", ")
            ),
            _ => format!("expected one of {}", values.join(", ")),
        }),
        None => Some(format!("expected {key}=<{}>", values.join("|"))),
    }
}

/// Splits `text` on commas that are not inside double quotes; `Err` on an unterminated quote.
fn split(text: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("a double quote is not closed".to_string());
    }
    items.push(&text[start..]);
    Ok(items)
}

/// Checks a security label value: `"..."` or bare, no control character, no inner quote, a
/// bare one without commas (the split already saw to that).
pub(crate) fn label_ok(value: &str) -> bool {
    let inner = match value.strip_prefix('"') {
        Some(rest) => match rest.strip_suffix('"') {
            Some(inner) => inner,
            None => return false,
        },
        None => value,
    };
    !inner.is_empty() && !inner.chars().any(|c| c.is_control() || c == '"')
}

/// Parses `mount_options`; the error says which item is wrong and why (for
/// [`graphdriver::Error::InvalidOption`] on the `mount_options` key).
pub fn parse(text: &str) -> Result<MountOptions, String> {
    let mut out = MountOptions::default();
    if text.trim().is_empty() {
        return Ok(out);
    }
    for item in split(text)? {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!(
                "{text:?} has an empty item (a leading, trailing or doubled comma)"
            ));
        }
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if key.is_empty() {
            return Err(format!("{item:?} has no key before '='"));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'+')
        {
            return Err(format!(
                "{key:?} is not a mount option (a-z, 0-9, _ and + only)"
            ));
        }
        let Some(rule) = rule(key) else {
            return Err(format!(
                "{key:?} is neither a mount flag nor an overlay option this driver allows \
                 (see the overlay driver's documentation for the list)"
            ));
        };
        let needs_no_value = |what: &str| -> Result<(), String> {
            match value {
                None => Ok(()),
                Some(_) => Err(format!("{key:?} is {what} and takes no value")),
            }
        };
        match rule {
            Rule::Refused(why) => return Err(format!("{key:?} is refused: {why}")),
            Rule::Set(bits) => {
                needs_no_value("a mount flag")?;
                out.flags |= bits;
            }
            Rule::Clear(bits) => {
                needs_no_value("a mount flag")?;
                out.flags &= !bits;
            }
            Rule::Bare => {
                needs_no_value("an overlay flag")?;
                out.data.push(key.to_string());
            }
            Rule::Values(values) => {
                if let Some(why) = value_reason(key, value, values) {
                    return Err(format!("{key:?}: {why}"));
                }
                out.data.push(item.to_string());
            }
            Rule::Label => match value {
                Some(v) if label_ok(v) => out.data.push(item.to_string()),
                _ => {
                    return Err(format!(
                        "{key:?} expects a label, {key}=\"user:role:type:level\" (no control \
                         characters or inner quotes)"
                    ));
                }
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn flags_and_data_are_told_apart() {
        let o = parse("nodev, nosuid,noexec,xino=off,context=\"system_u:object_r:c:s0:c1,c2\"")
            .unwrap();
        assert_eq!(
            o.flags,
            MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC
        );
        assert_eq!(
            o.data,
            ["xino=off", "context=\"system_u:object_r:c:s0:c1,c2\""]
        );
        assert_eq!(parse("nodev,dev").unwrap().flags, MountFlags::empty());
        assert_eq!(parse("").unwrap(), MountOptions::default());
        assert_eq!(
            parse("redirect_dir=off").unwrap().data,
            ["redirect_dir=off"]
        );
    }

    #[test]
    fn each_refused_option_names_itself() {
        for (text, name) in [
            ("upperdir=/x", "upperdir"),
            ("lowerdir=/", "lowerdir"),
            ("workdir=/tmp", "workdir"),
            ("lowerdir+=/x", "lowerdir+"),
            ("datadir+=/x", "datadir+"),
            ("index=on", "index"),
            ("index=off", "index"),
            ("metacopy=on", "metacopy"),
            ("redirect_dir=on", "redirect_dir"),
            ("redirect_dir=follow", "redirect_dir"),
            ("verity=require", "verity"),
            ("userxattr", "userxattr"),
            ("volatile", "volatile"),
            ("nfs_export=on", "nfs_export"),
            ("ro", "ro"),
            ("nodev,upperdir=/x", "upperdir"),
            ("bind", "bind"),
            (
                "noatime_is_not_an_overlay_option",
                "noatime_is_not_an_overlay_option",
            ),
            ("UPPERDIR=/x", "UPPERDIR"),
            ("nodev=1", "nodev"),
            ("xino", "xino"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(&format!("{name:?}")), "{text}: {err}");
        }
    }

    #[test]
    fn labels_cannot_break_out_of_their_quotes() {
        assert!(label_ok("system_u:object_r:container_file_t:s0:c1,c2"));
        assert!(label_ok("\"system_u:object_r:t:s0\""));
        for bad in ["a\",upperdir=/x", "a\nb", "", "\"\"", "\"open"] {
            assert!(!label_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn stray_commas_quotes_and_empty_keys_are_refused() {
        for text in [
            "nodev,,upperdir=/x",
            ",nodev",
            "nodev,",
            "=x",
            "nodev,=upperdir",
            "context=\"a,upperdir=/x",
            "context=a\"b",
            "context=",
            "context=\"\"",
            "context=\"a\nb\"",
            " upper dir=/x",
            "nodev\0upperdir=/x",
        ] {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
    }
}
