//! `diff` and `export` output: a layer tar, plain or compressed, to a file or stdout, with its
//! digest and DiffID.
//!
//! With `--compress` or `--json` the tar streams through a SHA-256 of the uncompressed bytes
//! (the DiffID), the compressor and a SHA-256 of what is written (the blob's digest, as an OCI
//! manifest names it), so a blob of any size is written with bounded memory and hashed once; a
//! plain `diff` or `export` is copied straight through. The output file is not fsynced
//! (as GNU tar does not): a command that must survive a power cut runs `sync FILE` after.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::flags::{BlobOutput, CompressFormat};
use crate::output;

/// Refuses, before anything is read, what `write` could not do: a tar to a terminal, or JSON
/// on the stdout that carries the tar.
pub fn check_output(out: &BlobOutput, json: bool) -> Result<()> {
    if out.output.is_none() {
        if json {
            return Err(output::invalid_argument(
                "--json needs -o FILE here: stdout carries the tar (graphctl --json diff ID -o \
                 layer.tar)",
            ));
        }
        if io::stdout().is_terminal() {
            return Err(output::invalid_argument(
                "refusing to write the layer tar to a terminal (stdout); name a file with -o \
                 FILE (graphctl diff ID -o layer.tar) or redirect it (graphctl diff ID > \
                 layer.tar)",
            ));
        }
    }
    Ok(())
}

/// A writer that hashes what passes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, `sha256:<hex>` of everything written, and the byte count.
    fn finish(self) -> (W, String, u64) {
        let digest = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        (self.inner, format!("sha256:{digest}"), self.bytes)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`write_to`] wrote.
struct Written {
    /// `sha256:` of the blob as written.
    digest: String,
    /// Bytes written.
    size: u64,
    /// `sha256:` of the uncompressed tar.
    diff_id: String,
    /// Bytes of the uncompressed tar.
    tar_size: u64,
}

/// Streams `tar` into `dest` as `format`; with `report`, through the DiffID hasher, the
/// compressor and the digest hasher, returning the digests. Without it (a plain `diff` or
/// `export`) the bytes are copied as they come: no hashing costs the export speed nobody asked
/// for. Returns `dest`, flushed.
fn write_to<W: Write>(
    mut tar: impl Read,
    dest: W,
    format: CompressFormat,
    report: bool,
) -> Result<(W, Option<Written>)> {
    if !report && format == CompressFormat::None {
        let mut dest = dest;
        io::copy(&mut tar, &mut dest)?;
        dest.flush()?;
        return Ok((dest, None));
    }
    let blob = HashWriter::new(BufWriter::with_capacity(1 << 20, dest));
    let encoder = archive::Encoder::new(blob, format.compression())?;
    let mut plain = HashWriter::new(encoder);
    io::copy(&mut tar, &mut plain)?;
    let (encoder, diff_id, tar_size) = plain.finish();
    let (buffered, digest, size) = encoder.finish()?.finish();
    let dest = buffered.into_inner().map_err(|e| e.into_error())?;
    Ok((
        dest,
        Some(Written {
            digest,
            size,
            diff_id,
            tar_size,
        }),
    ))
}

/// Writes the tar `tar` as `out` asks (file or stdout, compressed or not) and reports the
/// digests: with `--compress` as text (on stdout after a file, on stderr after a stdout blob),
/// with `--json` as the command's document.
pub fn write(tar: impl Read, out: &BlobOutput, json: bool) -> Result<()> {
    let format = out.compress.unwrap_or(CompressFormat::None);
    let report = json || out.compress.is_some();
    let written = match &out.output {
        None => {
            let (mut stdout, w) = write_to(tar, io::stdout().lock(), format, report)
                .context("write the layer tar to stdout")?;
            stdout.flush().context("write the layer tar to stdout")?;
            w
        }
        Some(path) => {
            let (file, created) = open_output(path)?;
            match write_to(tar, file, format, report) {
                Ok((_, w)) => w,
                Err(e) => {
                    if let Some(made) = created {
                        remove_if_same(path, &made);
                    }
                    return Err(e.context(format!("write the layer tar to {}", path.display())));
                }
            }
        }
    };
    let Some(written) = written else {
        return Ok(());
    };
    if json {
        let mut obj = serde_json::Map::new();
        if let Some(path) = &out.output {
            crate::commands::insert_path(&mut obj, "output", path);
        }
        obj.insert("media_type".into(), json!(format.media_type()));
        obj.insert("digest".into(), json!(written.digest));
        obj.insert("size".into(), json!(written.size));
        obj.insert("diff_id".into(), json!(written.diff_id));
        obj.insert("uncompressed_size".into(), json!(written.tar_size));
        return output::print_json(serde_json::Value::Object(obj));
    }
    let text = format!(
        "digest: {}\nsize: {}\ndiff_id: {}\n",
        written.digest, written.size, written.diff_id
    );
    if out.output.is_some() {
        let mut stdout = io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
    } else {
        eprint!("{text}");
    }
    Ok(())
}

/// The identity of a file: device and inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What the file of `meta` is, for errors ("a symlink", "a FIFO", …).
fn type_name(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::MetadataExt;
    archive::fs::describe(archive::fs::FileType::from_raw_mode(meta.mode()))
}

/// Opens the `diff -o` output file.
///
/// A missing `path` is created (`O_CREAT | O_EXCL`, mode 0600: a layer may hold files only
/// root can read) and its identity is returned so that a failed write can remove it. An existing
/// `path` must be a regular file, reached without following a symbolic link in its last
/// component; it is truncated and written, and never removed. Anything else (a symbolic link, a
/// device node, a FIFO, a socket, a directory) is refused, with an error naming the path,
/// without being opened for writing.
fn open_output(path: &Path) -> Result<(File, Option<FileId>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let new = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match new {
        Ok(f) => {
            let id = f
                .metadata()
                .map(|m| FileId::of(&m))
                .with_context(|| format!("stat {}", path.display()))?;
            return Ok((f, Some(id)));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
    }
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "refusing to write the layer tar to {}: it is {what}, not a regular file \
             (name a new file or an existing regular file)",
            path.display()
        )
    };
    let before =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !before.file_type().is_file() {
        return Err(refuse(type_name(&before)));
    }
    // O_NONBLOCK: should the path turn into a FIFO after the check, the open does not wait.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(refuse(type_name(&meta)));
    }
    if FileId::of(&meta) != FileId::of(&before) {
        bail!(
            "{} was replaced while it was being opened; not writing to it",
            path.display()
        );
    }
    f.set_len(0)
        .with_context(|| format!("truncate {}", path.display()))?;
    Ok((f, None))
}

/// Removes `path` after a failed write, if it is still the file this process created.
fn remove_if_same(path: &Path, made: &FileId) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if FileId::of(&meta) == *made => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the partial output");
            }
        }
        _ => {
            tracing::warn!(path = %path.display(), "the output file was replaced; not removing it")
        }
    }
}
