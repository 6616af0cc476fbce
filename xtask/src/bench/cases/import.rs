//! The image import rows: `graphctl import` of a multi-layer gzip OCI layout, end to end (a
//! fresh process and a fresh store per run, the default driver), against GNU `tar -xzf` of the
//! same layer blobs in sequence into one directory; `umoci unpack` and `podman load` when they
//! are installed.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::super::report::CaseResult;
use super::super::{run_cmd, workspace_root};
use super::{Bench, remove_tree};

/// Layers of the generated image.
const LAYERS: usize = 20;

/// One layer blob of an OCI layout, in manifest order.
struct Blob {
    path: PathBuf,
    gzip: bool,
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| anyhow!("unexpected digest {digest:?} in {}", layout.display()))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The layer blobs of the first manifest of the OCI layout at `layout`.
fn layout_layers(layout: &Path) -> Result<Vec<Blob>> {
    let index = read_json(&layout.join("index.json"))?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("{}/index.json names no manifest", layout.display()))?;
    let manifest = read_json(&blob_path(layout, manifest)?)?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("the manifest in {} has no layers", layout.display()))?;
    layers
        .iter()
        .map(|l| {
            let digest = l["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("a layer without a digest in {}", layout.display()))?;
            let media = l["mediaType"].as_str().unwrap_or("");
            Ok(Blob {
                path: blob_path(layout, digest)?,
                gzip: media.ends_with("+gzip"),
            })
        })
        .collect()
}

/// Writes `data` as a blob of `layout` and returns its digest.
fn write_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let hex = sha256_hex(data);
    let path = layout.join("blobs/sha256").join(&hex);
    fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("sha256:{hex}"))
}

/// Writes an OCI layout at `layout` (which must not exist) holding the layer tars in `tars`,
/// gzip-compressed (fast level), in order, as one image named `bench`.
fn write_layout(layout: &Path, tars: &[PathBuf]) -> Result<()> {
    fs::create_dir_all(layout.join("blobs/sha256"))
        .with_context(|| format!("creating {}", layout.display()))?;
    let (mut diff_ids, mut descriptors) = (Vec::new(), Vec::new());
    for tar in tars {
        let plain = fs::read(tar).with_context(|| format!("reading {}", tar.display()))?;
        diff_ids.push(format!("sha256:{}", sha256_hex(&plain)));
        let mut enc = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain)?;
        let gz = enc.finish()?;
        let digest = write_blob(layout, &gz)?;
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": gz.len(),
        }));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = write_blob(layout, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descriptors,
    }))?;
    let manifest_digest = write_blob(layout, &manifest)?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "bench"},
        }],
    }))?;
    fs::write(layout.join("index.json"), index)?;
    fs::write(
        layout.join("oci-layout"),
        b"{\"imageLayoutVersion\":\"1.0.0\"}\n",
    )?;
    Ok(())
}

/// Whether `tool` is on `PATH`.
fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first line `cmd` prints on stdout, for the notes.
fn first_line(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

impl Bench {
    /// The `graphctl` binary of this build: built with cargo (a no-op when it is fresh) into
    /// the target directory and profile this xtask binary runs from.
    pub(super) fn graphctl(&mut self) -> Result<PathBuf> {
        if let Some(p) = &self.graphctl {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let profile_dir = exe
            .parent()
            .ok_or_else(|| anyhow!("the xtask binary {} has no directory", exe.display()))?
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", profile_dir.display()))?
            .to_path_buf();
        let bin = profile_dir.join("graphctl");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile = if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        };
        self.setup_step(&format!("graphctl ({profile} build)"), |_| {
            run_cmd(
                Command::new(&cargo)
                    .args(["build", "--quiet", "-p", "graphctl", "--profile", profile])
                    .arg("--manifest-path")
                    .arg(workspace_root().join("Cargo.toml"))
                    .arg("--target-dir")
                    .arg(&target_dir),
            )
            .with_context(|| {
                format!(
                    "building graphctl (needed next to the xtask binary, at {})",
                    bin.display()
                )
            })
        })?;
        if !bin.is_file() {
            bail!("cargo built graphctl, but {} does not exist", bin.display());
        }
        self.graphctl = Some(bin.clone());
        Ok(bin)
    }

    /// An empty graphctl config file, so a host `/etc/graphctl/storage.toml` or
    /// `$GRAPHCTL_CONFIG` does not change what the bench measures: defaults everywhere.
    pub(super) fn graphctl_config(&self) -> Result<PathBuf> {
        let p = self.corpus.join("graphctl.toml");
        if !p.exists() {
            fs::write(&p, "").with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(p)
    }

    /// The sample image, copied onto the scratch filesystem.
    fn sample_image(&mut self) -> Result<PathBuf> {
        let dst = self.corpus.join("sample-image");
        if !dst.exists() {
            let src = workspace_root().join("examples/sample-image");
            if !src.join("index.json").is_file() {
                bail!(
                    "{} is not an OCI layout (run `cargo xtask sample-image`)",
                    src.display()
                );
            }
            run_cmd(Command::new("cp").arg("-a").arg(&src).arg(&dst))?;
        }
        Ok(dst)
    }

    /// The generated image: the `small` tree split into [`LAYERS`] gzip layers.
    fn generated_image(&mut self) -> Result<PathBuf> {
        let dst = self.corpus.join(format!("image-{LAYERS}"));
        if !dst.exists() {
            self.small()?;
            let (spec, small, corpus) = (
                self.spec.clone(),
                self.corpus.join("small"),
                self.corpus.clone(),
            );
            self.setup_step(
                &format!("{LAYERS}-layer gzip OCI image of the small tree"),
                |_| {
                    let tars: Vec<PathBuf> = (0..LAYERS)
                        .map(|k| corpus.join(format!("image-layer-{k:02}.tar")))
                        .collect();
                    super::super::corpus::split_small_into_layers(&spec, &small, LAYERS, |k| {
                        tars[k].clone()
                    })?;
                    write_layout(&dst, &tars)?;
                    for t in &tars {
                        fs::remove_file(t)?;
                    }
                    Ok(())
                },
            )?;
        }
        Ok(dst)
    }

    /// All import rows: the sample image and the generated one.
    pub(super) fn case_import(&mut self) -> Result<()> {
        for which in ["sample", "generated"] {
            let layout = match which {
                "sample" => self.sample_image(),
                _ => self.generated_image(),
            };
            let name = format!("import({which})");
            let layout = match layout {
                Ok(l) => l,
                Err(e) => {
                    self.record(name, Err(e))?;
                    continue;
                }
            };
            let r = self.case_import_graphctl(&name, &layout);
            self.record(name.clone(), r)?;
            for tool in ["umoci", "podman"] {
                let row = format!("{name}: {tool}");
                if !installed(tool) {
                    eprintln!("bench: {row}: not available ({tool} is not installed)");
                    self.results.push(CaseResult {
                        name: row,
                        ours: match tool {
                            "umoci" => "umoci unpack",
                            _ => "podman load",
                        }
                        .into(),
                        baseline: Some("tar -xzf of each layer in sequence".into()),
                        unavailable: Some(format!("{tool} is not installed")),
                        ..CaseResult::default()
                    });
                    continue;
                }
                let r = self.case_import_tool(&row, tool, &layout);
                self.record(row, r)?;
            }
        }
        Ok(())
    }

    /// GNU tar of every layer blob of `layout`, in order, into `dst`.
    fn tar_layers(layers: &[Blob], dst: &Path) -> Result<()> {
        for l in layers {
            let mut c = Command::new("tar");
            c.arg(if l.gzip { "-xzf" } else { "-xf" })
                .arg(&l.path)
                .arg("-C")
                .arg(dst);
            run_cmd(&mut c)?;
        }
        Ok(())
    }

    fn case_import_graphctl(&mut self, name: &str, layout: &Path) -> Result<CaseResult> {
        let graphctl = self.graphctl()?;
        let config = self.graphctl_config()?;
        let layers = layout_layers(layout)?;
        let gz = layers.iter().filter(|l| l.gzip).count();
        let blob_bytes: u64 = layers
            .iter()
            .map(|l| fs::metadata(&l.path).map(|m| m.len()).unwrap_or(0))
            .sum();
        let ctx = &self.ctx;
        let gctl = |root: &Path, args: &[&OsStr]| -> Command {
            let mut c = Command::new(&graphctl);
            c.arg("--config")
                .arg(&config)
                .arg("--root")
                .arg(root)
                .args(args);
            c
        };
        let driver = std::cell::RefCell::new(String::new());
        let mut ours = |run: usize| -> Result<f64> {
            let root = ctx.fresh("import-root");
            fs::create_dir(&root)?;
            let (secs, _) =
                ctx.timed(|| run_cmd(&mut gctl(&root, &["import".as_ref(), layout.as_os_str()])))?;
            if run == 0 {
                *driver.borrow_mut() = first_line(&mut gctl(&root, &["status".as_ref()]))?;
            }
            run_cmd(&mut gctl(&root, &["cleanup".as_ref()]))?;
            remove_tree(&root)?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("import-gnu");
            fs::create_dir(&dst)?;
            let (secs, _) = ctx.timed(|| Self::tar_layers(&layers, &dst))?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired(name, &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name: name.into(),
            what: format!(
                "OCI layout {} ({} layers, {gz} gzip, {} KiB of blobs): import into a fresh store",
                layout.display(),
                layers.len(),
                blob_bytes >> 10
            ),
            ours: "graphctl import (fresh process and store, default driver)".into(),
            baseline: Some("tar -xzf of each layer blob in sequence into one directory".into()),
            target: None,
            ours_secs: o,
            baseline_secs: t,
            notes: vec![
                format!("graphctl status after the import: {}", driver.borrow()),
                "GNU tar does not interpret whiteouts, verify digests or record layers: the baseline does less work".into(),
            ],
            ..CaseResult::default()
        })
    }

    /// `umoci unpack` or `podman load` of `layout` against the same tar baseline.
    fn case_import_tool(&mut self, name: &str, tool: &str, layout: &Path) -> Result<CaseResult> {
        let layers = layout_layers(layout)?;
        let index = read_json(&layout.join("index.json"))?;
        let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or("latest")
            .to_string();
        let ctx = &self.ctx;
        let mut ours = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh(&format!("import-{tool}"));
            let mut c = Command::new(tool);
            match tool {
                "umoci" => {
                    c.arg("unpack")
                        .arg("--image")
                        .arg(format!("{}:{tag}", layout.display()))
                        .arg(&dst);
                }
                _ => {
                    fs::create_dir(&dst)?;
                    c.arg("--root")
                        .arg(dst.join("root"))
                        .arg("--runroot")
                        .arg(dst.join("run"))
                        .arg("load")
                        .arg("--quiet")
                        .arg("-i")
                        .arg(layout);
                }
            }
            let (secs, _) = ctx.timed(|| run_cmd(&mut c))?;
            if tool == "podman" {
                // Let podman take down whatever it mounted in its store before deleting it.
                let _ = Command::new("podman")
                    .arg("--root")
                    .arg(dst.join("root"))
                    .arg("--runroot")
                    .arg(dst.join("run"))
                    .args(["system", "reset", "--force"])
                    .stdin(Stdio::null())
                    .output();
            }
            remove_tree(&dst)?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("import-tool-gnu");
            fs::create_dir(&dst)?;
            let (secs, _) = ctx.timed(|| Self::tar_layers(&layers, &dst))?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired(name, &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name: name.into(),
            what: format!("{tool} of the OCI layout {}", layout.display()),
            ours: match tool {
                "umoci" => "umoci unpack (a runtime bundle)".into(),
                _ => "podman load (into a fresh --root)".into(),
            },
            baseline: Some("tar -xzf of each layer blob in sequence into one directory".into()),
            target: None,
            ours_secs: o,
            baseline_secs: t,
            notes: vec![format!("{tool} is a reference, not ours")],
            ..CaseResult::default()
        })
    }
}
