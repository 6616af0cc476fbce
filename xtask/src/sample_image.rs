//! `cargo xtask sample-image`: writes `examples/sample-image`, a small OCI image layout.
//!
//! The image has three layers that between them exercise every layer feature a driver must get
//! right: a whiteout deleting a lower file, a whiteout deleting a lower directory, an opaque
//! directory, a hardlink, a symlink, a setuid file and a `user.*` xattr (PAX `SCHILY.xattr`).
//! Layers 0 and 1 are gzip-compressed, layer 2 is a plain tar, so both media types are read.
//!
//! The output is reproducible: every header is built by hand (fixed mtime, owner 0:0, no user
//! names), entries are written in a fixed order, gzip headers carry mtime 0 and no file name, and
//! JSON objects are written with sorted keys. Running it twice gives byte-identical files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Arguments of `sample-image`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the layout (default: `examples/sample-image` in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not write: fail if the layout on disk differs from what would be generated.
    #[arg(long)]
    check: bool,
}

/// The fixed mtime of every entry: 2024-01-01T00:00:00Z.
const MTIME: u64 = 1_704_067_200;

/// The default output directory.
fn default_out() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("examples/sample-image")
}

/// Regenerates the sample image (or, with `--check`, verifies the one on disk).
pub fn run(args: Args) -> Result<()> {
    let out = args.out.unwrap_or_else(default_out);
    if args.check {
        let tmp = tempfile::tempdir()?;
        generate(tmp.path())?;
        let diffs = compare_dirs(tmp.path(), &out)?;
        if !diffs.is_empty() {
            anyhow::bail!(
                "{} is stale ({}); run `cargo xtask sample-image`",
                out.display(),
                diffs.join(", ")
            );
        }
        println!("{} is up to date", out.display());
        return Ok(());
    }
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let digest = generate(&out)?;
    println!("wrote {} (manifest {digest})", out.display());
    Ok(())
}

/// One tar entry of a sample layer.
enum Entry {
    Dir(&'static str, u32),
    File(&'static str, u32, Vec<u8>),
    /// A file with one `user.*` xattr.
    XattrFile(&'static str, u32, Vec<u8>, &'static str, &'static [u8]),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
}

/// Deterministic filler bytes, so a layer has some size without looking empty when compressed.
fn filler(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b"abcdefghijklmnopqrstuvwxyz \n"[(x % 28) as usize]
        })
        .collect()
}

/// The three layers, bottom first.
fn layers() -> Vec<Vec<Entry>> {
    use Entry::*;
    let base = vec![
        Dir("bin/", 0o755),
        File("bin/tool", 0o755, b"#!/bin/sh\necho tool\n".to_vec()),
        Hardlink("bin/tool-hardlink", "bin/tool"),
        File("bin/sutool", 0o4755, b"#!/bin/sh\necho setuid\n".to_vec()),
        Dir("etc/", 0o755),
        Dir("etc/config/", 0o755),
        File("etc/config/a.conf", 0o644, b"a = 1\n".to_vec()),
        File("etc/config/b.conf", 0o644, b"b = 2\n".to_vec()),
        File("etc/hostname", 0o644, b"sample\n".to_vec()),
        File("etc/motd", 0o644, b"welcome to layer 0\n".to_vec()),
        File("etc/remove-me", 0o644, b"deleted by layer 1\n".to_vec()),
        Dir("usr/", 0o755),
        Dir("usr/local/", 0o755),
        Dir("usr/local/bin/", 0o755),
        Symlink("usr/local/bin/tool", "/bin/tool"),
        Dir("usr/share/", 0o755),
        Dir("usr/share/doc/", 0o755),
        XattrFile(
            "usr/share/doc/readme.txt",
            0o644,
            b"a file with a user xattr\n".to_vec(),
            "user.comment",
            b"sample",
        ),
        File("usr/share/words.txt", 0o644, filler(32 * 1024, 1)),
        Dir("var/", 0o755),
        Dir("var/cache/", 0o755),
        Dir("var/cache/old/", 0o755),
        File("var/cache/old/one", 0o644, b"1\n".to_vec()),
        File("var/cache/old/two", 0o644, b"2\n".to_vec()),
        Dir("var/cache/old/nested/", 0o700),
        File("var/cache/old/nested/three", 0o600, b"3\n".to_vec()),
    ];
    let middle = vec![
        Dir("app/", 0o755),
        File("app/app.txt", 0o644, filler(8 * 1024, 2)),
        Dir("etc/", 0o755),
        File("etc/.wh.remove-me", 0o644, Vec::new()),
        Dir("etc/config/", 0o755),
        File("etc/config/.wh..wh..opq", 0o644, Vec::new()),
        File("etc/config/c.conf", 0o644, b"c = 3\n".to_vec()),
        File("etc/motd", 0o644, b"welcome to layer 1\n".to_vec()),
        Dir("var/", 0o755),
        Dir("var/cache/", 0o755),
        File("var/cache/.wh.old", 0o644, Vec::new()),
    ];
    let top = vec![
        Dir("app/", 0o755),
        Symlink("app/current", "run.sh"),
        File(
            "app/run.sh",
            0o755,
            b"#!/bin/sh\nexec cat /app/app.txt\n".to_vec(),
        ),
        Hardlink("app/run-alias.sh", "app/run.sh"),
        XattrFile(
            "app/tagged",
            0o644,
            b"tagged in layer 2\n".to_vec(),
            "user.layer",
            b"2",
        ),
        Dir("var/", 0o755),
        Dir("var/cache/", 0o755),
        Dir("var/cache/old/", 0o755),
        File(
            "var/cache/old/fresh",
            0o644,
            b"a new directory of the same name\n".to_vec(),
        ),
    ];
    vec![base, middle, top]
}

/// A header with everything fixed except name, type, mode and size.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes one layer as a plain tar.
fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(path, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File(path, mode, data) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::XattrFile(path, mode, data, key, value) => {
                let pax_key = format!("SCHILY.xattr.{key}");
                b.append_pax_extensions([(pax_key.as_str(), *value)])?;
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target)?;
            }
            Entry::Hardlink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// gzip with a fixed header: mtime 0, no file name, OS "unknown".
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `data` as a blob and returns its descriptor digest (`sha256:…`).
fn write_blob(out: &Path, data: &[u8]) -> Result<String> {
    let hex = sha256_hex(data);
    let path = out.join("blobs/sha256").join(&hex);
    fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("sha256:{hex}"))
}

/// Generates the layout into `out` (created if missing) and returns the manifest digest.
pub fn generate(out: &Path) -> Result<String> {
    fs::create_dir_all(out.join("blobs/sha256"))
        .with_context(|| format!("creating {}", out.display()))?;
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    let mut history = Vec::new();
    for (i, entries) in layers().iter().enumerate() {
        let tar = layer_tar(entries)?;
        diff_ids.push(format!("sha256:{}", sha256_hex(&tar)));
        let (blob, media_type) = if i < 2 {
            (gzip(&tar)?, "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (tar, "application/vnd.oci.image.layer.v1.tar")
        };
        let digest = write_blob(out, &blob)?;
        descriptors.push(json!({"mediaType": media_type, "digest": digest, "size": blob.len()}));
        history.push(json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": format!("cargo xtask sample-image (layer {i})"),
        }));
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/app/run.sh"], "WorkingDir": "/app"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let config = serde_json::to_vec_pretty(&config)?;
    let config_digest = write_blob(out, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descriptors,
    });
    let manifest = serde_json::to_vec_pretty(&manifest)?;
    let manifest_digest = write_blob(out, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "sample"},
        }],
    });
    let mut index = serde_json::to_vec_pretty(&index)?;
    index.push(b'\n');
    fs::write(out.join("index.json"), index)?;
    fs::write(
        out.join("oci-layout"),
        b"{\"imageLayoutVersion\":\"1.0.0\"}\n",
    )?;
    Ok(manifest_digest)
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The relative paths that differ between two trees of files (missing, extra or other bytes).
fn compare_dirs(expected: &Path, actual: &Path) -> Result<Vec<String>> {
    let want = files_under(expected)?;
    let have = if actual.is_dir() {
        files_under(actual)?
    } else {
        Vec::new()
    };
    let mut diffs = Vec::new();
    for p in &want {
        match fs::read(actual.join(p)) {
            Ok(bytes) if bytes == fs::read(expected.join(p))? => {}
            Ok(_) => diffs.push(format!("{} differs", p.display())),
            Err(_) => diffs.push(format!("{} is missing", p.display())),
        }
    }
    for p in have.iter().filter(|p| !want.contains(p)) {
        diffs.push(format!("{} is extra", p.display()));
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_reproducible() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let da = generate(a.path()).unwrap();
        let db = generate(b.path()).unwrap();
        assert_eq!(da, db);
        assert_eq!(
            compare_dirs(a.path(), b.path()).unwrap(),
            Vec::<String>::new()
        );
        // 3 layers + config + manifest.
        assert_eq!(files_under(&a.path().join("blobs")).unwrap().len(), 5);
        let total: u64 = files_under(a.path())
            .unwrap()
            .iter()
            .map(|p| fs::metadata(a.path().join(p)).unwrap().len())
            .sum();
        assert!(total < 300 * 1024, "sample image is {total} bytes");
    }

    #[test]
    fn committed_sample_image_is_up_to_date() {
        let tmp = tempfile::tempdir().unwrap();
        generate(tmp.path()).unwrap();
        let diffs = compare_dirs(tmp.path(), &default_out()).unwrap();
        assert!(
            diffs.is_empty(),
            "examples/sample-image is stale, run `cargo xtask sample-image`: {diffs:?}"
        );
    }

    #[test]
    fn layers_carry_the_features() {
        let layers = layers();
        let tars: Vec<Vec<u8>> = layers.iter().map(|l| layer_tar(l).unwrap()).collect();
        let mut names = Vec::new();
        let mut xattrs = 0;
        let mut setuid = 0;
        for tar in &tars {
            let mut ar = tar::Archive::new(tar.as_slice());
            for e in ar.entries().unwrap() {
                let mut e = e.unwrap();
                if let Some(exts) = e.pax_extensions().unwrap() {
                    for ext in exts {
                        if ext
                            .unwrap()
                            .key()
                            .unwrap()
                            .starts_with("SCHILY.xattr.user.")
                        {
                            xattrs += 1;
                        }
                    }
                }
                if e.header().mode().unwrap() & 0o4000 != 0 {
                    setuid += 1;
                }
                names.push((
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                ));
            }
        }
        let has = |n: &str, t: tar::EntryType| names.iter().any(|(p, k)| p == n && *k == t);
        assert!(has("etc/.wh.remove-me", tar::EntryType::Regular));
        assert!(has("var/cache/.wh.old", tar::EntryType::Regular));
        assert!(has("etc/config/.wh..wh..opq", tar::EntryType::Regular));
        assert!(has("bin/tool-hardlink", tar::EntryType::Link));
        assert!(has("usr/local/bin/tool", tar::EntryType::Symlink));
        assert_eq!(xattrs, 2);
        assert_eq!(setuid, 1);
    }
}
