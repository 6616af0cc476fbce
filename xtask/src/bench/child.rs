//! The hidden `--rss-child` mode: one operation on the big layer in a fresh process, reporting
//! its wall time and peak memory as one JSON line on stdout.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::run_cmd;

/// What the child prints.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChildOut {
    /// Wall time of the operation.
    pub secs: f64,
    /// VmHWM of the child itself, KiB.
    pub self_hwm_kib: u64,
    /// ru_maxrss of its waited-for children (the confined apply's fork, GNU tar), KiB.
    pub children_maxrss_kib: u64,
}

/// The operations `--rss-child` accepts.
pub const OPS: &[&str] = &[
    "apply",
    "apply-unconfined",
    "export",
    "gnu-apply",
    "gnu-export",
];

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn children_maxrss_kib() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid, writable rusage; getrusage only writes to it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so it initialised the struct (and it was zeroed before).
    let ru = unsafe { ru.assume_init() };
    u64::try_from(ru.ru_maxrss).unwrap_or(0)
}

/// User + system CPU seconds of this process (all threads) and of its reaped children.
pub fn cpu_secs() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a valid, writable rusage; getrusage only writes to it.
        if unsafe { libc::getrusage(who, ru.as_mut_ptr()) } != 0 {
            continue;
        }
        // SAFETY: getrusage succeeded, so it initialised the struct (and it was zeroed before).
        let ru = unsafe { ru.assume_init() };
        for tv in [ru.ru_utime, ru.ru_stime] {
            total += tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
        }
    }
    total
}

/// Runs `op` with `input` and `dest` and prints a [`ChildOut`] line.
pub fn run(op: &str, input: Option<&Path>, dest: Option<&Path>) -> Result<()> {
    let (Some(input), Some(dest)) = (input, dest) else {
        bail!("--rss-child needs --rss-input and --rss-dest");
    };
    let opts = archive::ApplyOptions::default();
    let t = Instant::now();
    match op {
        "apply" => {
            chrootarchive::apply_layer(dest, File::open(input)?, &opts).with_context(|| {
                format!(
                    "confined apply of {} onto {}",
                    input.display(),
                    dest.display()
                )
            })?;
        }
        "apply-unconfined" => {
            archive::apply_layer(dest, File::open(input)?, &opts)
                .with_context(|| format!("apply of {} onto {}", input.display(), dest.display()))?;
        }
        "export" => {
            let mut s = archive::tar_tree(input, &archive::TarOptions::default())?;
            let mut f = BufWriter::with_capacity(1 << 16, File::create(dest)?);
            io::copy(&mut s, &mut f).with_context(|| format!("exporting {}", input.display()))?;
            f.into_inner().map_err(|e| e.into_error())?;
        }
        "gnu-apply" => run_cmd(
            Command::new("tar")
                .arg("-x")
                .arg("-f")
                .arg(input)
                .arg("-C")
                .arg(dest),
        )?,
        "gnu-export" => run_cmd(
            Command::new("tar")
                .arg("-c")
                .arg("-f")
                .arg(dest)
                .arg("-C")
                .arg(input)
                .arg("."),
        )?,
        other => bail!(
            "unknown --rss-child operation {other:?}: expected one of {}",
            OPS.join(", ")
        ),
    }
    let out = ChildOut {
        secs: t.elapsed().as_secs_f64(),
        self_hwm_kib: vm_hwm_kib(),
        children_maxrss_kib: children_maxrss_kib(),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Runs `op` in a fresh child process (this binary re-executed) and returns what it printed.
pub fn spawn(op: &str, input: &Path, dest: &PathBuf) -> Result<ChildOut> {
    let exe = std::env::current_exe().context("finding the xtask binary to re-execute")?;
    let out = Command::new(exe)
        .args(["bench", "--rss-child", op, "--rss-input"])
        .arg(input)
        .arg("--rss-dest")
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .output()
        .context("re-executing the xtask binary")?;
    if !out.status.success() {
        bail!(
            "{op} child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("parsing the {op} child's output {line:?}"))
}
