//! Paths inside an image: normalized, relative, never leaving the image.

use std::path::{Component, Path};

use crate::error::{Error, Result};

/// Normalizes a path inside the image: no absolute paths, no `..`, `.` dropped.
pub(crate) fn normalize(path: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidPath {
        path: path.to_string(),
        reason,
    };
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| invalid("is not UTF-8"))?),
            Component::CurDir => {}
            _ => return Err(invalid("must be relative and stay inside the image")),
        }
    }
    if parts.is_empty() {
        return Err(invalid("is empty"));
    }
    Ok(parts.join("/"))
}

/// Resolves `..` inside a link target relative to the archive root; `None` if it leaves the
/// archive.
pub(crate) fn normalize_dots(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize("./blobs/sha256/ab").unwrap(), "blobs/sha256/ab");
        assert!(normalize("../etc/passwd").is_err());
        assert!(normalize("/etc/passwd").is_err());
        assert_eq!(normalize_dots("a/../b/layer.tar").unwrap(), "b/layer.tar");
        assert!(normalize_dots("../x").is_none());
    }
}
