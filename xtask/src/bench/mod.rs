//! `cargo xtask bench`: ours against the tools a user would otherwise reach for, side by side.
//!
//! Everything runs on a scratch filesystem set up for the run ([`scratch`]): a fresh
//! loop-mounted ext4 image with `nodiscard` by default, or a tmpfs (`--fs tmpfs`). Corpora are
//! generated deterministically on it ([`corpus`]). Each paired case runs one warm-up of ours and
//! of the baseline, then `--pairs` pairs, ours first then the baseline, back to back on the same
//! filesystem; the report gives both medians and the median of the per-pair ratios
//! ours/baseline ([`stats`]). Cases without an external baseline report ours alone.
//!
//! Caches: by default warm for both sides. Before every timed run (ours or baseline) the
//! runner calls `sync(2)`, untimed, so neither side pays for write-back of the run before it;
//! inputs were read during the warm-up and stay in the page cache. `--drop-caches` additionally
//! writes 3 to `/proc/sys/vm/drop_caches` before every timed run (cold reads for both).
//!
//! Peak memory of applying and exporting the big single-file layer is measured in a fresh child
//! process (this binary re-executed with a hidden `--rss-child` flag), so corpus generation does
//! not pollute `VmHWM`; the confined apply forks once more, so the child reports the larger of
//! its own `VmHWM` and `getrusage(RUSAGE_CHILDREN)`'s `ru_maxrss`.
//!
//! Output: `<out>/report.md` and `<out>/report.json` (default `target/bench`).

mod cases;
mod child;
pub mod corpus;
mod report;
pub mod scratch;
pub mod stats;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use scratch::FsKind;

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Smaller corpora (10 000 files, 128 MiB big layer) and 3 pairs: a smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Measured pairs per case after the warm-up (default 5, 3 with --quick).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// The scratch filesystem the cases run on.
    #[arg(long, value_enum, default_value_t = FsKind::Ext4)]
    pub fs: FsKind,
    /// Run only these cases (comma-separated): apply, apply-unconfined, overlay-apply,
    /// hardlink-copy, export, changes, overlay2-apply, overlay2-changes, deep-read,
    /// deep-read-overlay2, inodes, import, diff-n, diff-apply, rss, rss-entries.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where report.md and report.json go (and the scratch image, while running).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Drop the page cache before every timed run instead of keeping it warm.
    #[arg(long)]
    pub drop_caches: bool,
    /// Internal: run one memory-measured operation in this fresh process and print JSON.
    #[arg(long, hide = true)]
    pub rss_child: Option<String>,
    /// Internal: the input of `--rss-child`.
    #[arg(long, hide = true)]
    pub rss_input: Option<PathBuf>,
    /// Internal: the output of `--rss-child`.
    #[arg(long, hide = true)]
    pub rss_dest: Option<PathBuf>,
}

/// Every case name `--only` accepts, in the order they run.
pub const CASES: &[&str] = &[
    "apply",
    "apply-unconfined",
    "overlay-apply",
    "hardlink-copy",
    "export",
    "changes",
    "overlay2-apply",
    "overlay2-changes",
    "deep-read",
    "deep-read-overlay2",
    "inodes",
    "import",
    "diff-n",
    "diff-apply",
    "rss",
    "rss-entries",
];

/// The workspace root (the parent of `xtask/`).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .to_path_buf()
}

/// Runs `cmd`, failing with its stderr when it does not exit 0.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs the benchmarks.
pub fn run(args: Args) -> Result<()> {
    if let Some(op) = &args.rss_child {
        return child::run(op, args.rss_input.as_deref(), args.rss_dest.as_deref());
    }
    for name in &args.only {
        if !CASES.contains(&name.as_str()) {
            bail!(
                "unknown case {name:?}: expected one of {}",
                CASES.join(", ")
            );
        }
    }
    if !is_root() {
        bail!("bench needs root (it mounts a scratch filesystem and uses mount namespaces)");
    }
    let pairs = args.pairs.unwrap_or(if args.quick { 3 } else { 5 });
    if pairs == 0 {
        bail!("--pairs must be at least 1, found 0");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut machine = report::Machine::probe(&out);
    scratch::catch_interrupts();
    let (size_gib, inodes) = match (args.quick, args.fs) {
        (true, _) => (4, 400_000),
        (false, FsKind::Ext4) => (24, 2_000_000),
        (false, FsKind::Tmpfs) => (16, 2_000_000),
    };
    eprintln!("bench: setting up the scratch filesystem ({:?})", args.fs);
    let scratch = scratch::Scratch::setup(args.fs, &out, size_gib, inodes)?;
    machine.scratch_fs = scratch.description.clone();
    let mut bench = cases::Bench::new(&args, pairs, &scratch.mnt)?;
    let selected: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| o == c))
        .collect();
    let outcome = bench.run_all(&selected);
    bench.close();
    drop(scratch);
    machine.loadavg_end = report::loadavg();
    let rep = report::Report {
        machine,
        settings: report::Settings {
            quick: args.quick,
            pairs,
            fs: args.fs,
            caches: if args.drop_caches {
                "dropped (echo 3 > drop_caches) before every timed run".into()
            } else {
                "warm; sync(2) twice before every timed run".into()
            },
            corpus: bench.corpus_description(),
            total_secs: started.elapsed().as_secs_f64(),
        },
        setup: bench.setup_times.clone(),
        cases: bench.results.clone(),
        rss: bench.rss.clone(),
        inodes: bench.inodes.clone(),
    };
    let md = rep.markdown();
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&rep)?)?;
    println!("{md}");
    eprintln!("bench: wrote {}/report.md and report.json", out.display());
    outcome
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
