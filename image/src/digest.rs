//! Digests as the OCI image spec uses them: streaming SHA-256, DiffIDs and chain ids.

use std::io::{self, Read};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// The most bytes [`diff_id_to_end`] reads after the end of a layer tar to hash the whole
/// stream.
pub const MAX_TRAILING: u64 = 1 << 20;

/// The chain id of a layer whose parent layer has chain id `parent` (`None` for a bottom layer)
/// and whose DiffID is `diff_id`, as the OCI image spec defines it:
/// `ChainID(L0) = DiffID(L0)`, `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`.
///
/// Both ids are digests in their `sha256:<hex>` form and so is the result. The importer names
/// each layer by the hex part of its chain id.
///
/// ```
/// use graphdriver_image::chain_id;
///
/// let base = format!("sha256:{}", "a".repeat(64));
/// assert_eq!(chain_id(None, &base), base);
/// let next = chain_id(Some(&base), &format!("sha256:{}", "b".repeat(64)));
/// assert!(next.starts_with("sha256:") && next.len() == 71);
/// ```
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(prev) => format!(
            "sha256:{}",
            hex(&Sha256::digest(format!("{prev} {diff_id}")))
        ),
    }
}

/// The chain ids of a stack of layers given bottom first by their DiffIDs (see [`chain_id`]),
/// bottom first.
pub fn chain_ids<S: AsRef<str>>(diff_ids: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = chain_id(out.last().map(String::as_str), d.as_ref());
        out.push(next);
    }
    out
}

/// A reader that hashes (SHA-256) and counts every byte passing through it.
///
/// The digest is read through the [`DigestHandle`] [`Hashing::new`] returns with it, so it
/// can be had after the reader itself was handed to a decompressor or a driver.
pub struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

/// The digest of what a [`Hashing`] reader has read so far.
#[derive(Clone)]
pub struct DigestHandle(Arc<Mutex<(Sha256, u64)>>);

impl std::fmt::Debug for DigestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (digest, bytes) = self.finish();
        f.debug_struct("DigestHandle")
            .field("digest", &digest)
            .field("bytes", &bytes)
            .finish()
    }
}

impl<R> Hashing<R> {
    /// Wraps `inner`; the handle yields the digest of the bytes read through the wrapper.
    pub fn new(inner: R) -> (Self, DigestHandle) {
        let state = Arc::new(Mutex::new((Sha256::new(), 0)));
        (
            Hashing {
                inner,
                state: state.clone(),
            },
            DigestHandle(state),
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = buf.get(..n).unwrap_or_default();
        // A panic while holding the lock cannot leave the hasher half-updated in a way that
        // matters: the digest would be wrong and the check fail, which is the safe side.
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0.update(data);
        st.1 += n as u64;
        Ok(n)
    }
}

impl DigestHandle {
    /// The digest (`sha256:<hex>`) and the count of the bytes read so far.
    pub fn finish(&self) -> (String, u64) {
        let st = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (format!("sha256:{}", hex(&st.0.clone().finalize())), st.1)
    }
}

/// The DiffID of a layer stream after the driver applied its tar: reads `plain` (the
/// uncompressed stream, after the [`Hashing`] reader whose handle is `hashed`) to its end first
/// — a tar may end before the stream does (padding), and the DiffID covers all of it — and
/// returns the digest.
///
/// More than [`MAX_TRAILING`] bytes after the end of the tar (a stream that never ends) is
/// [`Error::TrailingData`]; a read error is [`Error::ReadBlob`] naming `what`.
pub fn diff_id_to_end(plain: &mut dyn Read, hashed: &DigestHandle, what: &str) -> Result<String> {
    let n = io::copy(&mut plain.take(MAX_TRAILING + 1), &mut io::sink()).map_err(|e| {
        Error::ReadBlob {
            blob: what.to_string(),
            source: e,
        }
    })?;
    if n > MAX_TRAILING {
        return Err(Error::TrailingData {
            limit: MAX_TRAILING,
        });
    }
    Ok(hashed.finish().0)
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex; `what` says where
/// the digest came from, for the error.
pub(crate) fn sha256_hex<'a>(digest: &'a str, what: &'static str) -> Result<&'a str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(Error::InvalidDigest {
            what,
            found: digest.to_string(),
        }),
    }
}

/// The SHA-256 digest of `bytes`, `sha256:<hex>`.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The chain ids of a known stack, computed by hand from the spec's formula.
    #[test]
    fn chain_ids_follow_the_spec() {
        let d: Vec<String> = ["1", "2", "3"]
            .iter()
            .map(|c| format!("sha256:{}", c.repeat(64)))
            .collect();
        let ids = chain_ids(&d);
        assert_eq!(ids[0], d[0]);
        assert_eq!(ids[1], sha256_of(format!("{} {}", d[0], d[1]).as_bytes()));
        assert_eq!(ids[2], sha256_of(format!("{} {}", ids[1], d[2]).as_bytes()));
        // A value computed elsewhere (Python's hashlib) so the formula itself is checked.
        assert_eq!(
            ids[1],
            "sha256:9932074217c35353d2e03a3f5a86549f7c67bfeb0ba53e23d69f4d4c8f7958f5"
        );
        assert_eq!(chain_ids::<String>(&[]), Vec::<String>::new());
    }

    #[test]
    fn hashing_reports_digest_and_count() {
        let (mut r, h) = Hashing::new(&b"hello"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(
            h.finish(),
            (
                "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
                5
            )
        );
    }

    #[test]
    fn trailing_data_is_bounded() {
        let (mut r, h) = Hashing::new(io::repeat(0));
        let e = diff_id_to_end(&mut r, &h, "stdin").unwrap_err();
        assert!(matches!(e, Error::TrailingData { .. }), "{e}");
        let (mut r, h) = Hashing::new(&[0u8; 1024][..]);
        assert!(
            diff_id_to_end(&mut r, &h, "x")
                .unwrap()
                .starts_with("sha256:")
        );
    }

    #[test]
    fn digests_are_checked() {
        let h = "a".repeat(64);
        assert_eq!(sha256_hex(&format!("sha256:{h}"), "t").unwrap(), h);
        assert!(sha256_hex("sha256:../../x", "t").is_err());
        assert!(sha256_hex(&format!("sha512:{h}"), "t").is_err());
    }
}
