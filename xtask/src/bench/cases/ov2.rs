//! The overlay2 rows: applying a layer on a big base, native `changes` of a read-write layer,
//! and the inodes a chain of layers consumes (the deep chain read is
//! [`Bench::case_deep_read`] with [`Kind::Overlay2`]).

use std::cell::Cell;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use drivers::overlay2::{Overlay2, Overlay2Config};
use graphdriver::{Driver, LayerId, MountOpts};

use super::super::corpus;
use super::super::report::{CaseResult, InodeResult};
use super::super::run_cmd;
use super::{Bench, Kind, id, remove_tree, tar_x};

/// Free inodes of the filesystem holding `path` (`statvfs` `f_ffree`).
fn free_inodes(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} holds a NUL byte", path.display()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    // SAFETY: statvfs succeeded, so it initialised the struct (and it was zeroed before).
    let st = unsafe { st.assume_init() };
    Ok(st.f_ffree)
}

impl Bench {
    /// The overlay2 driver, opened on first use in `<scratch>/graph-overlay2`.
    pub(super) fn driver2(&mut self) -> Result<&dyn Driver> {
        if self.driver2.is_none() {
            let home = self.graph_root.with_file_name("graph-overlay2");
            fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
            let d = Overlay2::driver(&home, Overlay2Config::default())
                .map_err(|e| anyhow!("opening the overlay2 driver in {}: {e}", home.display()))?;
            self.driver2 = Some(Box::new(d));
        }
        self.opened(Kind::Overlay2)
    }

    /// The `small` tree as an overlay2 base layer.
    fn small_layer2(&mut self) -> Result<LayerId> {
        if let Some(l) = &self.small_layer2 {
            return Ok(l.clone());
        }
        self.small()?;
        let tar = self.corpus.join("small.tar");
        let l = id("small")?;
        self.setup_step("overlay2 base layer from small.tar", |b| {
            let d = b.driver2()?;
            d.create(&l, None)?;
            d.apply_diff(&l, None, &mut File::open(&tar)?)?;
            Ok(())
        })?;
        self.small_layer2 = Some(l.clone());
        Ok(l)
    }

    /// An empty overlay2 base layer (an empty tar applied), for the "empty base" side.
    fn empty_layer2(&mut self) -> Result<LayerId> {
        let l = id("empty")?;
        let d = self.driver2()?;
        if !d.exists(&l) {
            d.create(&l, None)?;
            d.apply_diff(&l, None, &mut &corpus::layer_tar(&[])?[..])?;
        }
        Ok(l)
    }

    /// `added.tar`: the layer of `spec.added` new files (see [`corpus::generate_added`]).
    fn added(&mut self) -> Result<PathBuf> {
        let (root, tar) = (self.corpus.join("added"), self.corpus.join("added.tar"));
        if !self.have_added {
            let spec = self.spec.clone();
            self.setup_step("added tree and added.tar (GNU tar --sort=name)", |_| {
                corpus::generate_added(&spec, &root)?;
                run_cmd(
                    Command::new("tar")
                        .arg("--sort=name")
                        .arg("-c")
                        .arg("-f")
                        .arg(&tar)
                        .arg("-C")
                        .arg(&root)
                        .arg("."),
                )
            })?;
            self.have_added = true;
        }
        Ok(tar)
    }

    /// overlay2 `create` + `apply_diff(added.tar)` on the `small` base against the same on an
    /// empty base: the cost of applying must follow the layer, not the base.
    pub(super) fn case_overlay2_apply(&mut self) -> Result<CaseResult> {
        let tar = self.added()?;
        let big = self.small_layer2()?;
        let empty = self.empty_layer2()?;
        let small_n = corpus::count_entries(&self.corpus.join("small"))?;
        let added = self.spec.added;
        let d = self.opened(Kind::Overlay2)?;
        let ctx = &self.ctx;
        let (n_big, n_empty) = (Cell::new(0), Cell::new(0));
        let run_on = |base: &LayerId, tag: &str, run: usize, n: &Cell<u64>| -> Result<f64> {
            let l = id(&format!("apply2-{tag}-{run}"))?;
            let mut f = File::open(&tar)?;
            let (secs, _) = ctx.timed(|| {
                d.create(&l, Some(base))?;
                Ok(d.apply_diff(&l, Some(base), &mut f)?)
            })?;
            if run == 0 {
                let p = d.get(&l, &MountOpts::default())?;
                let c = corpus::count_entries(&p);
                d.put(&l)?;
                n.set(c?);
            }
            d.remove(&l)?;
            Ok(secs)
        };
        let mut ours = |run: usize| run_on(&big, "big", run, &n_big);
        let mut theirs = |run: usize| run_on(&empty, "empty", run, &n_empty);
        let (o, t) = ctx.paired("overlay2-apply", &mut ours, &mut theirs)?;
        // The layer adds `added` files and one new directory (`new/`) to the base.
        let want_big = small_n + added as u64 + 1;
        let mut notes = vec![format!(
            "merged views: {} entries on the {small_n}-entry base (expected {want_big}), {} on the empty base",
            n_big.get(),
            n_empty.get()
        )];
        if n_big.get() != want_big {
            notes.push("ENTRY COUNT DIFFERS on the big base".into());
        }
        Ok(CaseResult {
            name: "overlay2-apply".into(),
            what: format!(
                "a {added}-file layer (added.tar) applied on the {}-file small base vs on an empty base",
                self.spec.files
            ),
            ours: format!(
                "overlay2 create + apply_diff on the {}-file base",
                self.spec.files
            ),
            baseline: Some("the same on an empty base layer".into()),
            target: Some("≤ 1.1×".into()),
            ours_secs: o,
            baseline_secs: t,
            notes,
            ..CaseResult::default()
        })
    }

    /// overlay2 `create` + `apply_diff(added.tar)` on the `small` base against GNU `tar -x` of
    /// the same tar into an empty directory.
    pub(super) fn case_overlay2_apply_vs_tar(&mut self) -> Result<CaseResult> {
        let tar = self.added()?;
        let big = self.small_layer2()?;
        let added_n = corpus::count_entries(&self.corpus.join("added"))?;
        let added = self.spec.added;
        let d = self.opened(Kind::Overlay2)?;
        let ctx = &self.ctx;
        let gnu_n = Cell::new(0);
        let mut ours = |run: usize| -> Result<f64> {
            let l = id(&format!("apply2-tar-{run}"))?;
            let mut f = File::open(&tar)?;
            let (secs, _) = ctx.timed(|| {
                d.create(&l, Some(&big))?;
                Ok(d.apply_diff(&l, Some(&big), &mut f)?)
            })?;
            d.remove(&l)?;
            Ok(secs)
        };
        let mut theirs = |run: usize| -> Result<f64> {
            let dst = ctx.fresh("apply2-gnu");
            fs::create_dir(&dst)?;
            let (secs, _) = ctx.timed(|| tar_x(&tar, &dst))?;
            if run == 0 {
                gnu_n.set(corpus::count_entries(&dst)?);
            }
            remove_tree(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired("overlay2-apply-vs-tar", &mut ours, &mut theirs)?;
        let check = if gnu_n.get() == added_n {
            format!("GNU tar wrote the {added_n} entries of the added tree")
        } else {
            format!(
                "ENTRY COUNT DIFFERS: GNU tar {}, added tree {added_n}",
                gnu_n.get()
            )
        };
        Ok(CaseResult {
            name: "overlay2-apply-vs-tar".into(),
            what: format!("a {added}-file layer (added.tar): overlay2 apply vs GNU tar"),
            ours: format!(
                "overlay2 create + apply_diff on the {}-file base",
                self.spec.files
            ),
            baseline: Some("tar -x -f added.tar into an empty directory".into()),
            target: Some("≤ 1.0×".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec![check],
            ..CaseResult::default()
        })
    }

    /// `graphctl apply --parent small` (a fresh process, overlay2) against GNU `tar -x`.
    pub(super) fn case_overlay2_apply_cli(&mut self) -> Result<CaseResult> {
        let tar = self.added()?;
        self.small()?;
        let small_tar = self.corpus.join("small.tar");
        let graphctl = self.graphctl()?;
        let root = self.corpus.join("graphctl-root");
        let config = self.graphctl_config()?;
        let gctl = |args: &[&std::ffi::OsStr]| -> Command {
            let mut c = Command::new(&graphctl);
            c.arg("--config")
                .arg(&config)
                .arg("--root")
                .arg(&root)
                .args(["--driver", "overlay2"])
                .args(args);
            c
        };
        if !root.exists() {
            self.setup_step("graphctl overlay2 base layer from small.tar", |_| {
                fs::create_dir(&root)?;
                run_cmd(&mut gctl(&[
                    "apply".as_ref(),
                    "small".as_ref(),
                    small_tar.as_os_str(),
                ]))
            })?;
        }
        let ctx = &self.ctx;
        let mut ours = |run: usize| -> Result<f64> {
            let l = format!("cli-{run}");
            let (secs, _) = ctx.timed(|| {
                run_cmd(&mut gctl(&[
                    "apply".as_ref(),
                    "--parent".as_ref(),
                    "small".as_ref(),
                    l.as_ref(),
                    tar.as_os_str(),
                ]))
            })?;
            run_cmd(&mut gctl(&["rm".as_ref(), l.as_ref()]))?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("apply2-cli-gnu");
            fs::create_dir(&dst)?;
            let (secs, _) = ctx.timed(|| tar_x(&tar, &dst))?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired("overlay2-apply-cli", &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name: "overlay2-apply-cli".into(),
            what: format!(
                "a {}-file layer (added.tar) applied with the CLI on the {}-file base",
                self.spec.added, self.spec.files
            ),
            ours: "graphctl --driver overlay2 apply --parent small (process start, store open, DiffID record included)".into(),
            baseline: Some("tar -x -f added.tar into an empty directory".into()),
            target: Some("≤ 1.0×".into()),
            ours_secs: o,
            baseline_secs: t,
            ..CaseResult::default()
        })
    }

    /// overlay2's native `changes` of a read-write layer holding 10 changed files over the
    /// `small` base, against the naive changes (`archive::changes` of the two mounted trees).
    pub(super) fn case_overlay2_changes(&mut self) -> Result<CaseResult> {
        let base = self.small_layer2()?;
        let rw = id("rw10")?;
        let spec = self.spec.clone();
        const CHANGED: usize = 10;
        self.setup_step(
            &format!("overlay2 read-write layer with {CHANGED} changed files"),
            |b| {
                let d = b.driver2()?;
                if d.exists(&rw) {
                    return Ok(());
                }
                d.create_read_write(&rw, Some(&base))?;
                let p = d.get(&rw, &MountOpts::default())?;
                let r = (|| -> Result<()> {
                    for k in 0..CHANGED {
                        // Files 1, 1 + files/10, …: spread over the tree, none deleted in upper.
                        let i = 1 + k * (spec.files / CHANGED);
                        let f = p.join(spec.file(i));
                        fs::write(&f, spec.content(i, 2))
                            .with_context(|| format!("writing {}", f.display()))?;
                    }
                    Ok(())
                })();
                d.put(&rw)?;
                r
            },
        )?;
        let d = self.opened(Kind::Overlay2)?;
        let ctx = &self.ctx;
        let (na, nb) = (Cell::new(0), Cell::new(0));
        let mut native = |_run: usize| -> Result<f64> {
            let (secs, v) = ctx.timed(|| Ok(d.changes(&rw, Some(&base))?))?;
            na.set(v.len());
            Ok(secs)
        };
        let mut naive = |_run: usize| -> Result<f64> {
            let (secs, v) = ctx.timed(|| {
                let lower = d.get(&base, &MountOpts::default())?;
                let upper = match d.get(&rw, &MountOpts::default()) {
                    Ok(p) => p,
                    Err(e) => {
                        d.put(&base)?;
                        return Err(e.into());
                    }
                };
                let r = archive::changes(&upper, Some(&lower));
                d.put(&rw)?;
                d.put(&base)?;
                Ok(r?)
            })?;
            nb.set(v.len());
            Ok(secs)
        };
        let (o, t) = ctx.paired("overlay2-changes", &mut native, &mut naive)?;
        let check = if na.get() == nb.get() {
            format!("both report {} changes", na.get())
        } else {
            format!(
                "CHANGE COUNTS DIFFER: native {}, naive {}",
                na.get(),
                nb.get()
            )
        };
        if na.get() == 0 {
            bail!("the native changes found nothing in the read-write layer");
        }
        Ok(CaseResult {
            name: "overlay2-changes".into(),
            what: format!(
                "changes of a read-write layer with {CHANGED} rewritten files over the {}-file base",
                self.spec.files
            ),
            ours: "overlay2 changes (native, from diff/)".into(),
            baseline: Some(
                "naive: get both layers, archive::changes(merged, base), put both".into(),
            ),
            target: Some("≤ 0.01× (≥ 100× faster)".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec![check],
            ..CaseResult::default()
        })
    }

    /// Inodes consumed by a base layer and a chain of small layers on top of it, overlay
    /// against overlay2.
    pub(super) fn case_inodes(&mut self) -> Result<()> {
        let (base_files, layers, per_layer) = if self.quick {
            (2_000, 10, 100)
        } else {
            (10_000, 10, 100)
        };
        for kind in [Kind::Overlay, Kind::Overlay2] {
            super::super::scratch::check_interrupted()?;
            eprintln!("bench: inodes: {}", kind.name());
            let r = self.inode_chain(kind, base_files, layers, per_layer);
            self.inodes.push(match r {
                Ok((base_inodes, layer_inodes)) => InodeResult {
                    driver: kind.name().into(),
                    base_files,
                    layer_files: per_layer,
                    base_inodes,
                    layer_inodes,
                    error: None,
                },
                Err(e) => {
                    eprintln!("bench: inodes: {} failed: {e:#}", kind.name());
                    InodeResult {
                        driver: kind.name().into(),
                        base_files,
                        layer_files: per_layer,
                        error: Some(format!("{e:#}")),
                        ..InodeResult::default()
                    }
                }
            });
        }
        Ok(())
    }

    /// Builds the chain for [`Bench::case_inodes`] and returns the inodes of the base and of
    /// each layer on it; the layers are removed afterwards.
    fn inode_chain(
        &mut self,
        kind: Kind,
        base_files: usize,
        layers: usize,
        per_layer: usize,
    ) -> Result<(u64, Vec<u64>)> {
        let probe = self.ctx.run_dir.clone();
        let d = self.driver_of(kind)?;
        let mut made = Vec::new();
        let r = (|| -> Result<(u64, Vec<u64>)> {
            let base = id("inodes-base")?;
            let tar = corpus::layer_tar(&corpus::graphtest_files(base_files, 11))?;
            let before = free_inodes(&probe)?;
            d.create(&base, None)?;
            made.push(base.clone());
            d.apply_diff(&base, None, &mut &tar[..])?;
            let base_inodes = before.saturating_sub(free_inodes(&probe)?);
            let mut per = Vec::new();
            let mut parent = base;
            // graphtest directories are `directory-0`, `directory-100`, …: each layer adds
            // its files to ten of them, as image layers add files to existing directories.
            let dirs = (base_files / 100).clamp(1, 10);
            for k in 0..layers {
                let files: Vec<(String, Vec<u8>)> = (0..per_layer)
                    .map(|j| {
                        let dir = (j * dirs / per_layer) * 100;
                        let mut data = vec![0; 64];
                        corpus::Rng::new((k * per_layer + j) as u64).fill(&mut data);
                        (format!("directory-{dir}/added-{k}-{j}"), data)
                    })
                    .collect();
                let tar = corpus::layer_tar(&files)?;
                let l = id(&format!("inodes-{k}"))?;
                let before = free_inodes(&probe)?;
                d.create(&l, Some(&parent))?;
                made.push(l.clone());
                d.apply_diff(&l, Some(&parent), &mut &tar[..])?;
                per.push(before.saturating_sub(free_inodes(&probe)?));
                parent = l;
            }
            Ok((base_inodes, per))
        })();
        for l in made.iter().rev() {
            if let Err(e) = d.remove(l) {
                eprintln!("bench: inodes: removing {l}: {e}");
            }
        }
        r
    }
}
