//! The cases: fixtures prepared lazily on the scratch filesystem, then timed runs.
//!
//! The overlay2 rows live in [`ov2`], the image import rows in [`import`].

mod import;
mod ov2;

use std::cell::{Cell, RefCell};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use archive::{ApplyOptions, TarOptions};
use graphdriver::{Config, Driver, LayerId, MountOpts};

use super::child;
use super::corpus::{self, Spec};
use super::report::{CaseResult, InodeResult, RssResult};
use super::scratch::check_interrupted;
use super::{Args, run_cmd};

/// How runs are timed and separated.
pub struct Ctx {
    pairs: usize,
    drop_caches: bool,
    run_dir: PathBuf,
    seq: Cell<u64>,
    /// CPU seconds (user + system, this process and its reaped children) of each timed run of
    /// ours and of the baseline in the current case, in run order, warm-up excluded.
    cpu: RefCell<(Vec<f64>, Vec<f64>)>,
    /// CPU seconds of the last timed run.
    last_cpu: Cell<f64>,
}

impl Ctx {
    /// Flushes dirty data (and drops caches if asked) so a run does not pay for the one before.
    fn settle(&self) -> Result<()> {
        // Twice: with a buffered loop device the first sync's write-back to the image file can
        // leave dirty pages in the host filesystem, which the second one flushes.
        for _ in 0..2 {
            // SAFETY: sync(2) has no preconditions and cannot fail.
            unsafe { libc::sync() };
        }
        if self.drop_caches {
            fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")?;
        }
        Ok(())
    }

    /// Settles, then times `f`.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
        self.settle()?;
        let cpu = child::cpu_secs();
        let t = Instant::now();
        let r = f()?;
        let secs = t.elapsed().as_secs_f64();
        self.last_cpu.set(child::cpu_secs() - cpu);
        Ok((secs, r))
    }

    /// A new, not yet existing path in the run directory.
    fn fresh(&self, tag: &str) -> PathBuf {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        self.run_dir.join(format!("{tag}-{n}"))
    }

    /// One warm-up of each, then `pairs` pairs A B A B …; returns the measured seconds.
    fn paired(
        &self,
        name: &str,
        a: &mut dyn FnMut(usize) -> Result<f64>,
        b: &mut dyn FnMut(usize) -> Result<f64>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        eprintln!("bench: {name}: warm-up");
        a(0)?;
        check_interrupted()?;
        b(0)?;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for i in 1..=self.pairs {
            check_interrupted()?;
            let x = a(i)?;
            self.cpu.borrow_mut().0.push(self.last_cpu.get());
            check_interrupted()?;
            let y = b(i)?;
            self.cpu.borrow_mut().1.push(self.last_cpu.get());
            eprintln!(
                "bench: {name}: pair {i}: ours {x:.4} s, baseline {y:.4} s, ratio {:.3}",
                x / y
            );
            xs.push(x);
            ys.push(y);
        }
        Ok((xs, ys))
    }

    /// One warm-up, then `2 × pairs` runs of `a` alone.
    fn single(&self, name: &str, a: &mut dyn FnMut(usize) -> Result<f64>) -> Result<Vec<f64>> {
        eprintln!("bench: {name}: warm-up");
        a(0)?;
        let mut xs = Vec::new();
        for i in 1..=2 * self.pairs {
            check_interrupted()?;
            xs.push(a(i)?);
            self.cpu.borrow_mut().0.push(self.last_cpu.get());
        }
        eprintln!(
            "bench: {name}: median {:.4} s",
            super::stats::median(&xs).unwrap_or(f64::NAN)
        );
        Ok(xs)
    }
}

fn remove_tree(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn id(s: &str) -> Result<LayerId> {
    LayerId::new(s).map_err(|e| anyhow!("layer id {s:?}: {e}"))
}

fn tar_x(tar: &Path, dst: &Path) -> Result<()> {
    run_cmd(
        Command::new("tar")
            .arg("-x")
            .arg("-f")
            .arg(tar)
            .arg("-C")
            .arg(dst),
    )
}

/// The benchmark session: fixtures, the driver, and the results so far.
pub struct Bench {
    ctx: Ctx,
    spec: Spec,
    quick: bool,
    corpus: PathBuf,
    graph_root: PathBuf,
    chain_len: usize,
    big_size: u64,
    have_small: bool,
    small_digest: String,
    have_upper: bool,
    have_copies: bool,
    have_big: bool,
    driver: Option<Box<dyn Driver>>,
    small_layer: Option<LayerId>,
    /// The overlay2 driver, in its own home next to the overlay driver's.
    driver2: Option<Box<dyn Driver>>,
    /// The `small` tree as an overlay2 base layer.
    small_layer2: Option<LayerId>,
    have_added: bool,
    /// The `graphctl` binary, once located (or built).
    graphctl: Option<PathBuf>,
    /// Fixture preparation times.
    pub setup_times: Vec<(String, f64)>,
    /// Finished cases.
    pub results: Vec<CaseResult>,
    /// Peak-memory measurements.
    pub rss: Vec<RssResult>,
    /// Inodes per layer, per driver.
    pub inodes: Vec<InodeResult>,
}

/// Which layered driver a case runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The seed `overlay` driver: image layers are hardlinked full trees.
    Overlay,
    /// `overlay2`: each layer holds only its `diff/`, stacked as overlay lowers.
    Overlay2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Overlay => "overlay",
            Kind::Overlay2 => "overlay2",
        }
    }
}

impl Bench {
    /// A session on the scratch filesystem mounted at `mnt`.
    pub fn new(args: &Args, pairs: usize, mnt: &Path) -> Result<Bench> {
        let run_dir = mnt.join("run");
        let corpus = mnt.join("corpus");
        fs::create_dir_all(&run_dir)?;
        fs::create_dir_all(&corpus)?;
        Ok(Bench {
            ctx: Ctx {
                pairs,
                drop_caches: args.drop_caches,
                run_dir,
                seq: Cell::new(0),
                cpu: RefCell::new((Vec::new(), Vec::new())),
                last_cpu: Cell::new(0.0),
            },
            spec: if args.quick {
                Spec::quick()
            } else {
                Spec::full()
            },
            quick: args.quick,
            corpus,
            graph_root: mnt.join("graph"),
            chain_len: 128,
            big_size: if args.quick { 128 << 20 } else { 1 << 30 },
            have_small: false,
            small_digest: String::new(),
            have_upper: false,
            have_copies: false,
            have_big: false,
            driver: None,
            small_layer: None,
            driver2: None,
            small_layer2: None,
            have_added: false,
            graphctl: None,
            setup_times: Vec::new(),
            results: Vec::new(),
            rss: Vec::new(),
            inodes: Vec::new(),
        })
    }

    /// The corpora, for the report.
    pub fn corpus_description(&self) -> String {
        let s = &self.spec;
        format!(
            "small = {} files of 0–{} KiB in {} directories + {} symlinks; upper = small hardlinked \
             with every 10th file rewritten, every 20th deleted, one directory removed, {} files added; \
             {}-layer chain; big layer = one {} MiB file; small tree digest: {}",
            s.files,
            s.max_size / 1024,
            s.dirs,
            s.symlinks,
            s.added,
            self.chain_len,
            self.big_size >> 20,
            if self.small_digest.is_empty() {
                "not generated"
            } else {
                &self.small_digest
            }
        )
    }

    fn setup_step<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        eprintln!("bench: preparing {what}");
        let t = Instant::now();
        let r = f(self)?;
        self.setup_times
            .push((what.to_string(), t.elapsed().as_secs_f64()));
        Ok(r)
    }

    fn small(&mut self) -> Result<()> {
        if !self.have_small {
            let (spec, root) = (self.spec.clone(), self.corpus.join("small"));
            self.setup_step("small tree", |_| corpus::generate_small(&spec, &root))?;
            // Printed in the report so runs can be checked to have used the same corpus.
            self.small_digest =
                self.setup_step("small tree digest", |_| corpus::tree_digest(&root))?;
            let tar = self.corpus.join("small.tar");
            self.setup_step("small.tar (GNU tar --sort=name)", |_| {
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
            self.have_small = true;
        }
        Ok(())
    }

    fn upper(&mut self) -> Result<()> {
        self.small()?;
        if !self.have_upper {
            let (spec, small, upper) = (
                self.spec.clone(),
                self.corpus.join("small"),
                self.corpus.join("upper"),
            );
            self.setup_step("upper tree (cp -al + changes)", |_| {
                corpus::generate_upper(&spec, &small, &upper)
            })?;
            let tar = self.corpus.join("upper.tar");
            self.setup_step("upper.tar (archive::changes + export_changes)", |_| {
                let changes = archive::changes(&upper, Some(&small))?;
                let mut s = archive::export_changes(&upper, &changes, &TarOptions::default())?;
                let mut f = BufWriter::new(File::create(&tar)?);
                io::copy(&mut s, &mut f)?;
                f.into_inner().map_err(|e| e.into_error())?;
                Ok(())
            })?;
            self.have_upper = true;
        }
        Ok(())
    }

    fn copies(&mut self) -> Result<()> {
        self.upper()?;
        if !self.have_copies {
            let c = self.corpus.clone();
            self.setup_step("unrelated copies of small and upper (cp -a)", |_| {
                run_cmd(
                    Command::new("cp")
                        .arg("-a")
                        .arg(c.join("small"))
                        .arg(c.join("small-copy")),
                )?;
                run_cmd(
                    Command::new("cp")
                        .arg("-a")
                        .arg(c.join("upper"))
                        .arg(c.join("upper-copy")),
                )
            })?;
            self.have_copies = true;
        }
        Ok(())
    }

    fn big(&mut self) -> Result<()> {
        if !self.have_big {
            let (dir, size) = (self.corpus.join("big"), self.big_size);
            let tar = self.corpus.join("big.tar");
            self.setup_step("big layer (one file) and big.tar (GNU tar)", |_| {
                fs::create_dir(&dir)?;
                corpus::generate_big(&dir.join("blob"), size, 42)?;
                run_cmd(
                    Command::new("tar")
                        .arg("-c")
                        .arg("-f")
                        .arg(&tar)
                        .arg("-C")
                        .arg(&dir)
                        .arg("."),
                )
            })?;
            self.have_big = true;
        }
        Ok(())
    }

    fn driver(&mut self) -> Result<&dyn Driver> {
        if self.driver.is_none() {
            let cfg = Config {
                driver: Some("overlay".into()),
                ..Config::new(self.graph_root.clone())
            };
            let sel =
                graphdriver::open(&cfg).map_err(|e| anyhow!("opening the overlay driver: {e}"))?;
            self.driver = Some(sel.driver);
        }
        self.driver
            .as_deref()
            .ok_or_else(|| anyhow!("overlay driver not open"))
    }

    /// The `small` tree as an overlay image layer.
    fn small_layer(&mut self) -> Result<LayerId> {
        if let Some(l) = &self.small_layer {
            return Ok(l.clone());
        }
        self.small()?;
        let tar = self.corpus.join("small.tar");
        let l = id("small")?;
        self.setup_step("overlay layer from small.tar", |b| {
            let d = b.driver()?;
            d.create(&l, None)?;
            d.apply_diff(&l, None, &mut File::open(&tar)?)?;
            Ok(())
        })?;
        self.small_layer = Some(l.clone());
        Ok(l)
    }

    /// Unmounts whatever the drivers hold.
    pub fn close(&mut self) {
        for d in [self.driver.take(), self.driver2.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = d.cleanup() {
                eprintln!("bench: {} driver cleanup: {e}", d.name());
            }
        }
    }

    /// The driver of `kind`, opened on first use.
    fn driver_of(&mut self, kind: Kind) -> Result<&dyn Driver> {
        match kind {
            Kind::Overlay => self.driver(),
            Kind::Overlay2 => self.driver2(),
        }
    }

    /// The driver of `kind`, which must be open already.
    fn opened(&self, kind: Kind) -> Result<&dyn Driver> {
        match kind {
            Kind::Overlay => self.driver.as_deref(),
            Kind::Overlay2 => self.driver2.as_deref(),
        }
        .ok_or_else(|| anyhow!("{} driver not open", kind.name()))
    }

    /// Runs the selected cases; a failing case is recorded and the others still run.
    pub fn run_all(&mut self, selected: &[&str]) -> Result<()> {
        for &name in selected {
            let r = match name {
                "apply" => self.case_apply(true),
                "apply-unconfined" => self.case_apply(false),
                "overlay-apply" => self.case_overlay_apply(),
                "hardlink-copy" => self.case_hardlink_copy(),
                "export" => self.case_export(),
                "changes" => self.case_changes(),
                "overlay2-apply" => {
                    let r = self.case_overlay2_apply();
                    self.record("overlay2-apply".into(), r)?;
                    let r = self.case_overlay2_apply_vs_tar();
                    self.record("overlay2-apply-vs-tar".into(), r)?;
                    let r = self.case_overlay2_apply_cli();
                    self.record("overlay2-apply-cli".into(), r)?;
                    continue;
                }
                "overlay2-changes" => self.case_overlay2_changes(),
                "deep-read" => self.case_deep_read(Kind::Overlay),
                "deep-read-overlay2" => self.case_deep_read(Kind::Overlay2),
                "inodes" => {
                    self.case_inodes()?;
                    continue;
                }
                "import" => {
                    self.case_import()?;
                    continue;
                }
                "diff-n" => {
                    let sizes: &[(usize, usize)] = if self.quick {
                        &[(10, 10), (10, 1_000), (1_000, 10)]
                    } else {
                        &[(10, 10), (10, 10_000), (10_000, 10)]
                    };
                    for &(bottom, top) in sizes {
                        let r = self.case_diff_n(bottom, top);
                        self.record(format!("DiffN({bottom}/{top})"), r)?;
                    }
                    continue;
                }
                "diff-apply" => self.case_diff_apply(100),
                "rss" => {
                    self.case_rss()?;
                    continue;
                }
                "rss-entries" => {
                    self.case_rss_entries()?;
                    continue;
                }
                other => bail!("unknown case {other}"),
            };
            self.record(name.to_string(), r)?;
        }
        Ok(())
    }

    fn record(&mut self, name: String, r: Result<CaseResult>) -> Result<()> {
        check_interrupted()?;
        let (ours_cpu, baseline_cpu) = self.ctx.cpu.take();
        match r {
            Ok(c) => self.results.push(
                CaseResult {
                    ours_cpu_secs: ours_cpu,
                    baseline_cpu_secs: baseline_cpu,
                    ..c
                }
                .finish(),
            ),
            Err(e) => {
                eprintln!("bench: {name} failed: {e:#}");
                self.results.push(CaseResult {
                    name,
                    error: Some(format!("{e:#}")),
                    ..CaseResult::default()
                });
            }
        }
        Ok(())
    }

    fn case_apply(&mut self, confined: bool) -> Result<CaseResult> {
        self.small()?;
        let tar = self.corpus.join("small.tar");
        let ctx = &self.ctx;
        let (ours_n, theirs_n) = (Cell::new(0), Cell::new(0));
        let opts = ApplyOptions::default();
        let mut ours = |run: usize| -> Result<f64> {
            let dst = ctx.fresh("apply-ours");
            fs::create_dir(&dst)?;
            let f = File::open(&tar)?;
            let (secs, _) = ctx.timed(|| {
                if confined {
                    chrootarchive::apply_layer(&dst, f, &opts)
                } else {
                    archive::apply_layer(&dst, f, &opts).map_err(chrootarchive::Error::from)
                }
                .map_err(anyhow::Error::from)
            })?;
            if run == 0 {
                ours_n.set(corpus::count_entries(&dst)?);
            }
            remove_tree(&dst)?;
            Ok(secs)
        };
        let mut theirs = |run: usize| -> Result<f64> {
            let dst = ctx.fresh("apply-gnu");
            fs::create_dir(&dst)?;
            let (secs, _) = ctx.timed(|| tar_x(&tar, &dst))?;
            if run == 0 {
                theirs_n.set(corpus::count_entries(&dst)?);
            }
            remove_tree(&dst)?;
            Ok(secs)
        };
        let name = if confined {
            "apply"
        } else {
            "apply-unconfined"
        };
        let (o, t) = ctx.paired(name, &mut ours, &mut theirs)?;
        let check = if ours_n.get() == theirs_n.get() {
            format!("both trees have {} entries", ours_n.get())
        } else {
            format!(
                "ENTRY COUNT DIFFERS: ours {}, GNU tar {}",
                ours_n.get(),
                theirs_n.get()
            )
        };
        Ok(CaseResult {
            name: name.into(),
            what: "apply small.tar into an empty directory".into(),
            ours: if confined {
                "chrootarchive::apply_layer"
            } else {
                "archive::apply_layer (in-process, no confinement)"
            }
            .into(),
            baseline: Some("tar -x -f small.tar".into()),
            target: confined.then(|| "≤ 1.0×".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec![check],
            ..CaseResult::default()
        })
    }

    fn case_overlay_apply(&mut self) -> Result<CaseResult> {
        self.upper()?;
        let small = self.small_layer()?;
        let upper_tar = self.corpus.join("upper.tar");
        let upper_n = corpus::count_entries(&self.corpus.join("upper"))?;
        let d = self
            .driver
            .as_deref()
            .ok_or_else(|| anyhow!("overlay driver not open"))?;
        let ctx = &self.ctx;
        let src = d.get(&small, &MountOpts::default())?;
        let ours_n = Cell::new(0);
        let mut ours = |run: usize| -> Result<f64> {
            let l = id(&format!("ov{run}"))?;
            let mut f = File::open(&upper_tar)?;
            let (secs, _) = ctx.timed(|| {
                d.create(&l, Some(&small))?;
                Ok(d.apply_diff(&l, Some(&small), &mut f)?)
            })?;
            if run == 0 {
                let p = d.get(&l, &MountOpts::default())?;
                ours_n.set(corpus::count_entries(&p)?);
                d.put(&l)?;
            }
            d.remove(&l)?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("ovl-gnu");
            let (secs, _) = ctx.timed(|| {
                run_cmd(Command::new("cp").arg("-al").arg(&src).arg(&dst))?;
                tar_x(&upper_tar, &dst)
            })?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let r = ctx.paired("overlay-apply", &mut ours, &mut theirs);
        d.put(&small)?;
        let (o, t) = r?;
        let check = if ours_n.get() == upper_n {
            format!("our layer has the {upper_n} entries of the upper tree")
        } else {
            format!(
                "ENTRY COUNT DIFFERS: our layer {}, upper tree {upper_n}",
                ours_n.get()
            )
        };
        Ok(CaseResult {
            name: "overlay-apply".into(),
            what: "image layer upper.tar applied on the small layer".into(),
            ours: "overlay driver create + apply_diff".into(),
            baseline: Some("cp -al small + tar -x -f upper.tar".into()),
            target: None,
            ours_secs: o,
            baseline_secs: t,
            notes: vec![
                check,
                "GNU tar does not interpret whiteouts (it writes .wh.* files and deletes nothing), so the baseline does less work".into(),
            ],
            ..CaseResult::default()
        })
    }

    fn case_hardlink_copy(&mut self) -> Result<CaseResult> {
        self.small()?;
        let src = self.corpus.join("small");
        let ctx = &self.ctx;
        let mut ours = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("copy-ours");
            let (secs, _) = ctx.timed(|| {
                drivers::copy::copy_tree(&src, &dst, drivers::copy::CopyMode::Hardlink)
                    .map_err(anyhow::Error::from)
            })?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("copy-gnu");
            let (secs, _) =
                ctx.timed(|| run_cmd(Command::new("cp").arg("-al").arg(&src).arg(&dst)))?;
            remove_tree(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired("hardlink-copy", &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name: "hardlink-copy".into(),
            what: "hardlinked copy of the small tree".into(),
            ours: "drivers::copy::copy_tree(Hardlink)".into(),
            baseline: Some("cp -al".into()),
            target: Some("≤ 1.0×".into()),
            ours_secs: o,
            baseline_secs: t,
            ..CaseResult::default()
        })
    }

    fn case_export(&mut self) -> Result<CaseResult> {
        self.small()?;
        let src = self.corpus.join("small");
        let ctx = &self.ctx;
        let (ours_len, theirs_len) = (Cell::new(0), Cell::new(0));
        let mut ours = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("export-ours.tar");
            let (secs, n) = ctx.timed(|| {
                let mut s = archive::tar_tree(&src, &TarOptions::default())?;
                let mut f = BufWriter::with_capacity(1 << 16, File::create(&dst)?);
                let n = io::copy(&mut s, &mut f)?;
                f.into_inner().map_err(|e| e.into_error())?;
                Ok(n)
            })?;
            ours_len.set(n);
            fs::remove_file(&dst)?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let dst = ctx.fresh("export-gnu.tar");
            let (secs, _) = ctx.timed(|| {
                run_cmd(
                    Command::new("tar")
                        .arg("-c")
                        .arg("-f")
                        .arg(&dst)
                        .arg("-C")
                        .arg(&src)
                        .arg("."),
                )
            })?;
            theirs_len.set(fs::metadata(&dst)?.len());
            fs::remove_file(&dst)?;
            Ok(secs)
        };
        let (o, t) = ctx.paired("export", &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name: "export".into(),
            what: "whole small tree to a tar file on the scratch fs".into(),
            ours: "archive::tar_tree".into(),
            baseline: Some("tar -c -f out.tar".into()),
            target: Some("≤ 1.0×".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec![format!(
                "tar sizes: ours {} MiB (PAX, with xattrs), GNU {} MiB (GNU format, no xattrs)",
                ours_len.get() >> 20,
                theirs_len.get() >> 20
            )],
            ..CaseResult::default()
        })
    }

    fn case_changes(&mut self) -> Result<CaseResult> {
        self.copies()?;
        let c = &self.corpus;
        let (small, upper) = (c.join("small"), c.join("upper"));
        let (small_c, upper_c) = (c.join("small-copy"), c.join("upper-copy"));
        let ctx = &self.ctx;
        let (na, nb) = (Cell::new(0), Cell::new(0));
        let mut linked = |_run: usize| -> Result<f64> {
            let (secs, v) = ctx.timed(|| Ok(archive::changes(&upper, Some(&small))?))?;
            na.set(v.len());
            Ok(secs)
        };
        let mut unrelated = |_run: usize| -> Result<f64> {
            let (secs, v) = ctx.timed(|| Ok(archive::changes(&upper_c, Some(&small_c))?))?;
            nb.set(v.len());
            Ok(secs)
        };
        let (o, t) = ctx.paired("changes", &mut linked, &mut unrelated)?;
        let check = if na.get() == nb.get() {
            format!("both report {} changes", na.get())
        } else {
            format!(
                "CHANGE COUNTS DIFFER: hardlinked {}, unrelated {}",
                na.get(),
                nb.get()
            )
        };
        Ok(CaseResult {
            name: "changes".into(),
            what: "changes(upper, small): hardlinked child vs unrelated copies of the same trees"
                .into(),
            ours: "archive::changes, hardlinked child".into(),
            baseline: Some("archive::changes, two unrelated copies".into()),
            target: Some("≤ 0.10× (≥ 10× faster)".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec![check],
            ..CaseResult::default()
        })
    }

    fn case_deep_read(&mut self, kind: Kind) -> Result<CaseResult> {
        let n = self.chain_len;
        let plain = self.corpus.join("chain-plain");
        let base_data = {
            let mut v = vec![0; 1 << 20];
            corpus::Rng::new(7).fill(&mut v);
            v
        };
        let layer_files = |i: usize| -> Vec<(String, Vec<u8>)> {
            let mut v = vec![(
                format!("layers/layer-{i:03}"),
                format!("layer {i}\n").into_bytes(),
            )];
            if i == 0 {
                v.insert(0, ("base/file".into(), base_data.clone()));
            }
            v
        };
        let top = self.setup_step(
            &format!("{n}-layer chain ({} create + apply_diff each)", kind.name()),
            |b| {
                let d = b.driver_of(kind)?;
                let mut parent: Option<LayerId> = None;
                for i in 0..n {
                    let l = id(&format!("chain{i:03}"))?;
                    let tar = corpus::layer_tar(&layer_files(i))?;
                    d.create(&l, parent.as_ref())?;
                    d.apply_diff(&l, parent.as_ref(), &mut &tar[..])?;
                    parent = Some(l);
                }
                // Shared by the overlay and overlay2 rows: built by the first that runs.
                if !plain.exists() {
                    fs::create_dir(&plain)?;
                    for i in 0..n {
                        archive::apply_layer(
                            &plain,
                            &corpus::layer_tar(&layer_files(i))?[..],
                            &ApplyOptions::default(),
                        )?;
                    }
                }
                parent.ok_or_else(|| anyhow!("empty chain"))
            },
        )?;
        let d = self.opened(kind)?;
        let ctx = &self.ctx;
        const ITER: usize = 20;
        let read_all = |root: &Path| -> Result<()> {
            let data = fs::read(root.join("base/file"))?;
            if data != base_data {
                bail!("base/file differs at the top of the chain");
            }
            for i in 0..n {
                let m = fs::read(root.join(format!("layers/layer-{i:03}")))?;
                if m != format!("layer {i}\n").as_bytes() {
                    bail!("marker of layer {i} differs at the top of the chain");
                }
            }
            Ok(())
        };
        let mut ours = |_run: usize| -> Result<f64> {
            let (secs, _) = ctx.timed(|| {
                for _ in 0..ITER {
                    let p = d.get(&top, &MountOpts::default())?;
                    let r = read_all(&p);
                    d.put(&top)?;
                    r?;
                }
                Ok(())
            })?;
            Ok(secs)
        };
        let mut theirs = |_run: usize| -> Result<f64> {
            let (secs, _) = ctx.timed(|| {
                for _ in 0..ITER {
                    read_all(&plain)?;
                }
                Ok(())
            })?;
            Ok(secs)
        };
        let name = match kind {
            Kind::Overlay => format!("deep-read({n})"),
            Kind::Overlay2 => format!("deep-read-overlay2({n})"),
        };
        let (o, t) = ctx.paired(&name, &mut ours, &mut theirs)?;
        Ok(CaseResult {
            name,
            what: format!(
                "{ITER}× (get top layer, read a 1 MiB base file and all {n} per-layer markers, put)"
            ),
            ours: format!("{} driver, {n}-layer chain", kind.name()),
            baseline: Some("the same reads in a plain directory".into()),
            target: Some("≤ 1.3×".into()),
            ours_secs: o,
            baseline_secs: t,
            notes: vec!["every read is checked against the expected content".into()],
            ..CaseResult::default()
        })
    }

    /// Base layer with `bottom` graphtest files, a child with `top` (same names, other seed).
    fn graphtest_pair(
        &mut self,
        tag: &str,
        bottom: usize,
        top: usize,
    ) -> Result<(LayerId, LayerId)> {
        let (base, upper) = (id(&format!("{tag}-base"))?, id(&format!("{tag}-upper"))?);
        self.setup_step(
            &format!("graphtest layers {tag} ({bottom}/{top} files)"),
            |b| {
                let d = b.driver()?;
                d.create(&base, None)?;
                d.apply_diff(
                    &base,
                    None,
                    &mut &corpus::layer_tar(&corpus::graphtest_files(bottom, 3))?[..],
                )?;
                d.create(&upper, Some(&base))?;
                d.apply_diff(
                    &upper,
                    Some(&base),
                    &mut &corpus::layer_tar(&corpus::graphtest_files(top, 6))?[..],
                )?;
                Ok(())
            },
        )?;
        Ok((base, upper))
    }

    fn case_diff_n(&mut self, bottom: usize, top: usize) -> Result<CaseResult> {
        let (base, upper) = self.graphtest_pair(&format!("diffn-{bottom}-{top}"), bottom, top)?;
        let d = self
            .driver
            .as_deref()
            .ok_or_else(|| anyhow!("overlay driver not open"))?;
        let ctx = &self.ctx;
        let len = Cell::new(0);
        let mut ours = |_run: usize| -> Result<f64> {
            let (secs, n) = ctx.timed(|| {
                let mut r = d.diff(&upper, Some(&base))?;
                Ok(io::copy(&mut r, &mut io::sink())?)
            })?;
            len.set(n);
            Ok(secs)
        };
        let o = ctx.single(&format!("DiffN({bottom}/{top})"), &mut ours)?;
        Ok(CaseResult {
            name: format!("DiffN({bottom}/{top})"),
            what: format!(
                "graphtest: diff of a {top}-file layer over a {bottom}-file base, read to the end"
            ),
            ours: "overlay driver diff".into(),
            baseline: None,
            target: None,
            ours_secs: o,
            notes: vec![format!("diff tar is {} KiB", len.get() >> 10)],
            ..CaseResult::default()
        })
    }

    fn case_diff_apply(&mut self, count: usize) -> Result<CaseResult> {
        let (base, upper) = self.graphtest_pair(&format!("diffapply-{count}"), count, count)?;
        let d = self
            .driver
            .as_deref()
            .ok_or_else(|| anyhow!("overlay driver not open"))?;
        let mut diff = Vec::new();
        d.diff(&upper, Some(&base))?.read_to_end(&mut diff)?;
        let ctx = &self.ctx;
        let mut ours = |run: usize| -> Result<f64> {
            let l = id(&format!("diffapply-{count}-{run}"))?;
            let (secs, _) = ctx.timed(|| {
                d.create(&l, Some(&base))?;
                Ok(d.apply_diff(&l, Some(&base), &mut &diff[..])?)
            })?;
            d.remove(&l)?;
            Ok(secs)
        };
        let o = ctx.single(&format!("DiffApplyN({count})"), &mut ours)?;
        Ok(CaseResult {
            name: format!("DiffApplyN({count})"),
            what: format!(
                "graphtest: create a child of a {count}-file base and apply a {count}-file diff"
            ),
            ours: "overlay driver create + apply_diff".into(),
            baseline: None,
            target: None,
            ours_secs: o,
            ..CaseResult::default()
        })
    }

    fn case_rss(&mut self) -> Result<()> {
        if let Err(e) = self.big() {
            self.rss.push(RssResult {
                name: "big layer fixture".into(),
                error: Some(format!("{e:#}")),
                ..RssResult::default()
            });
            return Ok(());
        }
        let (dir, tar) = (self.corpus.join("big"), self.corpus.join("big.tar"));
        // Ours and the reference alternate, so neither always runs first after the fixture.
        let ops: [(&str, &str, bool); 5] = [
            ("apply", "apply: chrootarchive::apply_layer", true),
            ("gnu-apply", "apply: GNU tar -x (reference)", true),
            ("export", "export: archive::tar_tree to a file", false),
            ("gnu-export", "export: GNU tar -c (reference)", false),
            (
                "apply-unconfined",
                "apply: archive::apply_layer (in-process)",
                true,
            ),
        ];
        for (op, label, is_apply) in ops {
            check_interrupted()?;
            eprintln!("bench: rss: {label}");
            let dest = self.ctx.fresh(&format!("rss-{op}"));
            let r = (|| -> Result<child::ChildOut> {
                if is_apply {
                    fs::create_dir(&dest)?;
                }
                self.ctx.settle()?;
                let out = child::spawn(op, if is_apply { &tar } else { &dir }, &dest)?;
                Ok(out)
            })();
            if is_apply {
                remove_tree(&dest)?;
            } else if dest.exists() {
                fs::remove_file(&dest)?;
            }
            self.rss.push(match r {
                Ok(c) => RssResult {
                    name: label.into(),
                    bytes: self.big_size,
                    secs: c.secs,
                    peak_rss_kib: c.self_hwm_kib.max(c.children_maxrss_kib),
                    self_hwm_kib: c.self_hwm_kib,
                    children_maxrss_kib: c.children_maxrss_kib,
                    error: None,
                },
                Err(e) => RssResult {
                    name: label.into(),
                    bytes: self.big_size,
                    error: Some(format!("{e:#}")),
                    ..RssResult::default()
                },
            });
        }
        Ok(())
    }

    /// Peak RSS of the confined apply against GNU tar for layers of many entries (10k, 300k
    /// and 1M empty files; 1M directory entries repeating two paths): memory must follow the
    /// layer's shape, not its length (issue 13, issue 20).
    fn case_rss_entries(&mut self) -> Result<()> {
        let counts: &[usize] = if self.quick {
            &[10_000, 100_000]
        } else {
            &[10_000, 300_000, 1_000_000]
        };
        let mut layers: Vec<(String, usize, corpus::EntriesShape)> = counts
            .iter()
            .map(|&n| (format!("{n} files"), n, corpus::EntriesShape::Files))
            .collect();
        let repeats = *counts.last().unwrap_or(&10_000);
        layers.push((
            format!("{repeats} repeated directory entries"),
            repeats,
            corpus::EntriesShape::RepeatedDirs,
        ));
        for (what, count, shape) in layers {
            check_interrupted()?;
            let tar = self.ctx.fresh(&format!("entries-{count}-{shape:?}.tar"));
            if let Err(e) = corpus::generate_entries_tar(&tar, count, shape) {
                self.rss.push(RssResult {
                    name: format!("layer of {what}"),
                    error: Some(format!("{e:#}")),
                    ..RssResult::default()
                });
                continue;
            }
            let bytes = fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
            for (op, label) in [
                ("apply", "chrootarchive::apply_layer"),
                ("gnu-apply", "GNU tar -x (reference)"),
            ] {
                check_interrupted()?;
                eprintln!("bench: rss: {label}, {what}");
                let dest = self.ctx.fresh(&format!("rss-entries-{op}"));
                let r = (|| -> Result<child::ChildOut> {
                    fs::create_dir(&dest)?;
                    self.ctx.settle()?;
                    child::spawn(op, &tar, &dest)
                })();
                remove_tree(&dest)?;
                let name = format!("apply, {what}: {label}");
                self.rss.push(match r {
                    Ok(c) => RssResult {
                        name,
                        bytes,
                        secs: c.secs,
                        peak_rss_kib: c.self_hwm_kib.max(c.children_maxrss_kib),
                        self_hwm_kib: c.self_hwm_kib,
                        children_maxrss_kib: c.children_maxrss_kib,
                        error: None,
                    },
                    Err(e) => RssResult {
                        name,
                        bytes,
                        error: Some(format!("{e:#}")),
                        ..RssResult::default()
                    },
                });
            }
            fs::remove_file(&tar)?;
        }
        Ok(())
    }
}
