//! Validated layer ids.
//!
//! A layer id becomes a directory name under the driver's home, so an unchecked id is a path
//! traversal (moby's CVE-2014-9358). [`LayerId`] can only be built by validation, which happens
//! before any filesystem call.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A layer id: 1 to 128 bytes of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
///
/// The rules make every id a safe single directory name: no `/`, no NUL, never `.` or `..`,
/// never a hidden name (drivers keep their own bookkeeping under dot-names in the home) and never
/// something a command line would read as an option. Image tooling uses 64 lowercase hex
/// characters (chain ids), which are valid ids.
///
/// ```
/// use graphdriver::LayerId;
/// let id: LayerId = "base-1.0".parse()?;
/// assert_eq!(id.as_str(), "base-1.0");
/// assert!("../etc".parse::<LayerId>().is_err());
/// # Ok::<(), graphdriver::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(String);

impl LayerId {
    /// Validates `id` and wraps it; [`Error::InvalidId`] says which rule it broke.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        match check(&id) {
            Ok(()) => Ok(LayerId(id)),
            Err(reason) => Err(Error::InvalidId { id, reason }),
        }
    }

    /// The id as a string slice; always a safe single path component.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Returns which rule `id` breaks, if any.
fn check(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("expected 1 to 128 characters, found an empty id");
    }
    if id.len() > MAX_ID_LEN {
        return Err("expected at most 128 bytes");
    }
    if let Some(bad) = id
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return Err(if bad == b'/' {
            "a '/' is not allowed: an id is a single name"
        } else if bad == 0 {
            "a NUL byte is not allowed"
        } else {
            "only letters, digits, '_', '.' and '-' are allowed"
        });
    }
    if id.starts_with('.') {
        return Err("an id must not start with '.'");
    }
    if id.starts_with('-') {
        return Err("an id must not start with '-'");
    }
    Ok(())
}

impl FromStr for LayerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        LayerId::new(s)
    }
}

impl TryFrom<&str> for LayerId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        LayerId::new(s)
    }
}

impl TryFrom<String> for LayerId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        LayerId::new(s)
    }
}

impl AsRef<str> for LayerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for LayerId {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_ids() {
        for id in [
            "a",
            "base",
            "layer-1",
            "v1.2_3",
            "A9",
            &"f".repeat(64),
            &"x".repeat(128),
        ] {
            assert_eq!(LayerId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn rejects_hostile_ids() {
        let long = "a".repeat(200);
        for (id, needle) in [
            ("", "empty"),
            ("..", "'.'"),
            (".", "'.'"),
            ("../x", "'/'"),
            ("a/b", "'/'"),
            ("/abs", "'/'"),
            ("a\0b", "NUL"),
            (long.as_str(), "128"),
            (".hidden", "'.'"),
            ("-rf", "'-'"),
            ("a b", "only letters"),
            ("é", "only letters"),
            ("a\nb", "only letters"),
        ] {
            let err = LayerId::new(id).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidId { id: got, .. } if got == id),
                "{id:?}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(needle), "{id:?}: {msg}");
        }
    }

    #[test]
    fn exactly_128_bytes_is_the_limit() {
        assert!(LayerId::new("a".repeat(128)).is_ok());
        assert!(LayerId::new("a".repeat(129)).is_err());
    }
}
