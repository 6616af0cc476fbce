//! The report: what ran, on what machine, and the numbers, as Markdown and JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::scratch::{FsKind, host_fs};
use super::stats::{Summary, median, pair_ratios, summarize};

/// The machine the run happened on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// `nproc`.
    pub nproc: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// MemTotal from /proc/meminfo.
    pub memory: String,
    /// Kernel release.
    pub kernel: String,
    /// The scratch filesystem the cases ran on.
    pub scratch_fs: String,
    /// The filesystem holding the output directory (and the ext4 image).
    pub host_fs: String,
    /// `tar --version`, first line.
    pub tar: String,
    /// `cp --version`, first line.
    pub cp: String,
    /// Whether this binary was built with optimizations.
    pub profile: String,
    /// /proc/loadavg when the run started: other work on the machine makes numbers noisy.
    pub loadavg_start: String,
    /// /proc/loadavg when the run ended.
    pub loadavg_end: String,
    /// When the run started (UTC).
    pub date: String,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn proc_field(file: &str, key: &str) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Machine {
    /// Describes this machine; `out` is where the scratch image will live.
    pub fn probe(out: &Path) -> Machine {
        let mem_kib: Option<u64> = proc_field("/proc/meminfo", "MemTotal")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok());
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: proc_field("/proc/cpuinfo", "model name"),
            memory: mem_kib.map_or_else(
                || "unknown".into(),
                |k| format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)),
            ),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            scratch_fs: String::new(),
            host_fs: host_fs(out),
            tar: first_line("tar", &["--version"]),
            cp: first_line("cp", &["--version"]),
            profile: if cfg!(debug_assertions) {
                "debug (not meaningful for timings)"
            } else {
                "release"
            }
            .into(),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

/// How the run was configured.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// `--quick`.
    pub quick: bool,
    /// Measured pairs per case.
    pub pairs: usize,
    /// The scratch filesystem kind.
    pub fs: FsKind,
    /// How caches were handled.
    pub caches: String,
    /// The corpora.
    pub corpus: String,
    /// Wall time of the whole run.
    pub total_secs: f64,
}

/// One case's samples and summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CaseResult {
    /// The case's name (`--only` value, with parameters).
    pub name: String,
    /// What is measured.
    pub what: String,
    /// Our side.
    pub ours: String,
    /// The baseline, if any.
    pub baseline: Option<String>,
    /// The target the issue sets, if any.
    pub target: Option<String>,
    /// Seconds of ours, one per measured run (warm-up excluded).
    pub ours_secs: Vec<f64>,
    /// Seconds of the baseline, one per measured run.
    pub baseline_secs: Vec<f64>,
    /// CPU seconds (user + system, including reaped children) of each measured run of ours.
    pub ours_cpu_secs: Vec<f64>,
    /// CPU seconds of each measured run of the baseline.
    pub baseline_cpu_secs: Vec<f64>,
    /// Median of CPU seconds / wall seconds per run of ours: above 1.0 means more than one
    /// core was busy on average.
    pub ours_cpu_per_wall: Option<f64>,
    /// The same for the baseline.
    pub baseline_cpu_per_wall: Option<f64>,
    /// Medians and the median pairwise ratio.
    pub summary: Summary,
    /// Checks and observations made during the run.
    pub notes: Vec<String>,
    /// Why the case did not complete, if it did not.
    pub error: Option<String>,
    /// Why the case did not run at all (a tool that is not installed), if it did not.
    pub unavailable: Option<String>,
}

impl CaseResult {
    /// Fills `summary` from the samples.
    pub fn finish(mut self) -> CaseResult {
        self.summary = summarize(&self.ours_secs, &self.baseline_secs);
        // cpu / wall per run is the same computation as a pairwise ratio.
        self.ours_cpu_per_wall = median(&pair_ratios(&self.ours_cpu_secs, &self.ours_secs));
        self.baseline_cpu_per_wall =
            median(&pair_ratios(&self.baseline_cpu_secs, &self.baseline_secs));
        self
    }
}

/// Peak memory of one operation on the big layer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RssResult {
    /// What ran.
    pub name: String,
    /// Layer size in bytes.
    pub bytes: u64,
    /// Wall time of the operation (one run).
    pub secs: f64,
    /// max(self VmHWM, children's ru_maxrss), KiB.
    pub peak_rss_kib: u64,
    /// The measuring process's own VmHWM, KiB.
    pub self_hwm_kib: u64,
    /// getrusage(RUSAGE_CHILDREN).ru_maxrss, KiB.
    pub children_maxrss_kib: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Inodes a chain of layers consumes on the scratch filesystem, for one driver.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InodeResult {
    /// The driver.
    pub driver: String,
    /// Files in the base layer.
    pub base_files: usize,
    /// Files each layer of the chain adds.
    pub layer_files: usize,
    /// Inodes the base layer consumed (drop of `statvfs` `f_ffree` across create + apply).
    pub base_inodes: u64,
    /// Inodes each layer of the chain consumed, in chain order.
    pub layer_inodes: Vec<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The configuration.
    pub settings: Settings,
    /// Corpus and fixture preparation times (untimed for the cases), seconds.
    pub setup: Vec<(String, f64)>,
    /// The timed cases.
    pub cases: Vec<CaseResult>,
    /// The peak-memory measurements.
    pub rss: Vec<RssResult>,
    /// Inodes per layer, per driver.
    pub inodes: Vec<InodeResult>,
}

/// Seconds in a readable unit.
pub fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{}×", fmt_num(r)))
}

/// A ratio with two decimals, or as `1/N` when two decimals would round it to 0.00.
fn fmt_num(r: f64) -> String {
    if r > 0.0 && r < 0.005 {
        format!("1/{:.0}", 1.0 / r)
    } else {
        format!("{r:.2}")
    }
}

impl Report {
    /// The Markdown rendering (also printed to stdout).
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# cargo xtask bench{}\n",
            if s.quick { " --quick" } else { "" }
        );
        let _ = writeln!(
            o,
            "Machine: {} × {}, {} RAM, Linux {}; {}.",
            m.nproc, m.cpu, m.memory, m.kernel, m.profile
        );
        let _ = writeln!(o, "Scratch: {}.", m.scratch_fs);
        let _ = writeln!(o, "Host filesystem of the output directory: {}.", m.host_fs);
        let _ = writeln!(o, "Tools: {}; {}.", m.tar, m.cp);
        let _ = writeln!(
            o,
            "Run: {}, {} pairs per case after one warm-up pair, caches {}; load average {} at start, {} at end; {:.0} s in total.",
            m.date, s.pairs, s.caches, m.loadavg_start, m.loadavg_end, s.total_secs
        );
        let _ = writeln!(o, "Corpus: {}.\n", s.corpus);
        let _ = writeln!(
            o,
            "Ratio = median over pairs of ours/baseline (< 1.0: ours faster); range = min–max pair ratio; \
             CPU/wall = median of (user+system CPU seconds, children included) / wall seconds per run \
             (above 1.0: more than one core busy on average).\n"
        );
        let _ = writeln!(
            o,
            "| case | ours | baseline | ours median | baseline median | ratio | range | CPU/wall ours, base | target |"
        );
        let _ = writeln!(o, "|---|---|---|---:|---:|---:|---|---|---|");
        for c in &self.cases {
            if let Some(why) = &c.unavailable {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | not available ({}) | | | | | {} |",
                    c.name,
                    c.ours,
                    c.baseline.as_deref().unwrap_or("–"),
                    why.replace('|', "/"),
                    c.target.as_deref().unwrap_or("")
                );
                continue;
            }
            if let Some(e) = &c.error {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | failed: {}{} | | | | | {} |",
                    c.name,
                    c.ours,
                    c.baseline.as_deref().unwrap_or("–"),
                    e.chars()
                        .take(100)
                        .collect::<String>()
                        .replace('|', "/")
                        .replace('\n', " "),
                    if e.chars().count() > 100 {
                        "… (full error in report.json)"
                    } else {
                        ""
                    },
                    c.target.as_deref().unwrap_or("")
                );
                continue;
            }
            let sm = &c.summary;
            let range = match (sm.ratio_min, sm.ratio_max) {
                (Some(a), Some(b)) => format!("{}–{}", fmt_num(a), fmt_num(b)),
                _ => "–".into(),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {}, {} | {} |",
                c.name,
                c.ours,
                c.baseline.as_deref().unwrap_or("–"),
                fmt_secs(sm.ours_median),
                fmt_secs(sm.theirs_median),
                fmt_ratio(sm.ratio_median),
                range,
                c.ours_cpu_per_wall
                    .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
                c.baseline_cpu_per_wall
                    .map_or_else(|| "–".into(), |r| format!("{r:.2}")),
                c.target.as_deref().unwrap_or("")
            );
        }
        if !self.rss.is_empty() {
            let _ = writeln!(
                o,
                "\nPeak RSS, the big single-file layer and layers of many entries (each in a fresh child process; goal < 64 MiB for ours):\n"
            );
            let _ = writeln!(
                o,
                "| operation | layer size | wall time (1 run) | peak RSS |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|");
            for r in &self.rss {
                let rss = match &r.error {
                    Some(e) => format!("failed: {}", e.replace('|', "/")),
                    None => format!("{:.1} MiB", r.peak_rss_kib as f64 / 1024.0),
                };
                let _ = writeln!(
                    o,
                    "| {} | {} MiB | {} | {} |",
                    r.name,
                    r.bytes >> 20,
                    fmt_secs(Some(r.secs)),
                    rss
                );
            }
        }
        if !self.inodes.is_empty() {
            let _ = writeln!(
                o,
                "\nInodes consumed on the scratch filesystem (drop of statvfs f_ffree across each layer's create + apply_diff; driver bookkeeping included):\n"
            );
            let _ = writeln!(
                o,
                "| driver | base layer | inodes | chain | inodes per layer, median (min–max) | chain total |"
            );
            let _ = writeln!(o, "|---|---:|---:|---|---:|---:|");
            for r in &self.inodes {
                if let Some(e) = &r.error {
                    let _ = writeln!(
                        o,
                        "| {} | {} files | failed: {} | | | |",
                        r.driver,
                        r.base_files,
                        e.replace('|', "/")
                    );
                    continue;
                }
                let per: Vec<f64> = r.layer_inodes.iter().map(|&n| n as f64).collect();
                let (lo, hi) = (
                    r.layer_inodes.iter().min().copied().unwrap_or(0),
                    r.layer_inodes.iter().max().copied().unwrap_or(0),
                );
                let _ = writeln!(
                    o,
                    "| {} | {} files | {} | {} layers × {} files | {} ({lo}–{hi}) | {} |",
                    r.driver,
                    r.base_files,
                    r.base_inodes,
                    r.layer_inodes.len(),
                    r.layer_files,
                    median(&per).map_or_else(|| "–".into(), |m| format!("{m:.0}")),
                    r.layer_inodes.iter().sum::<u64>()
                );
            }
        }
        let notes: Vec<_> = self
            .cases
            .iter()
            .flat_map(|c| c.notes.iter().map(move |n| (c, n)))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(o, "\nNotes:\n");
            for (c, n) in notes {
                let _ = writeln!(o, "- {}: {}", c.name, n);
            }
        }
        if !self.setup.is_empty() {
            let _ = writeln!(o, "\nFixture preparation (not part of any timing):\n");
            for (what, secs) in &self.setup {
                let _ = writeln!(o, "- {what}: {}", fmt_secs(Some(*secs)));
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_formatted_in_a_readable_unit() {
        assert_eq!(fmt_secs(Some(0.000_25)), "250 µs");
        assert_eq!(fmt_secs(Some(0.0123)), "12.3 ms");
        assert_eq!(fmt_secs(Some(4.567)), "4.57 s");
        assert_eq!(fmt_secs(None), "–");
    }

    #[test]
    fn tiny_ratios_are_shown_as_fractions() {
        assert_eq!(fmt_ratio(Some(0.5)), "0.50×");
        assert_eq!(fmt_ratio(Some(0.0001)), "1/10000×");
        assert_eq!(fmt_ratio(None), "–");
    }
}
