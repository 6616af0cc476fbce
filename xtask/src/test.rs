//! `cargo xtask test`: the README's test command. Runs the doc tests and the suite under
//! nextest, then says how many tests skipped and why.
//!
//! A test that needs root (or a tool that is not installed) skips outside CI: it prints why
//! and records itself through `test_support::record_skip` in the file named by
//! `GRAPHDRIVER_SKIPPED_TESTS`, which this command sets. nextest still counts such a test as
//! passed, so the summary printed last is what tells a green run in which everything ran from
//! one in which the root-only tests did not.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cargo test --doc` and `cargo nextest run` (with `extra` arguments) in the workspace,
/// then prints the skipped tests. Fails if either command failed.
pub fn run(extra: &[String]) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    let log = target.join("skipped-tests.txt");
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", log.display())),
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let doc = Command::new(&cargo)
        .args(["test", "--workspace", "--doc", "--locked"])
        .env("GRAPHDRIVER_SKIPPED_TESTS", &log)
        .current_dir(root)
        .status()
        .context("running cargo test --doc")?;
    let suite = Command::new(&cargo)
        .args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ])
        .args(extra)
        .env("GRAPHDRIVER_SKIPPED_TESTS", &log)
        .current_dir(root)
        .status()
        .context("running cargo nextest (install it with: cargo install --locked cargo-nextest)")?;
    report_skips(&log)?;
    if !doc.success() || !suite.success() {
        bail!("tests failed (doc tests: {doc}, suite: {suite})");
    }
    Ok(())
}

/// Prints how many tests skipped, grouped by reason, from the log the tests appended to.
fn report_skips(log: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", log.display())),
    };
    eprint!("{}", summary(&text));
    Ok(())
}

/// The summary of a skip log: a line saying nothing skipped, or the count and the tests by
/// reason (at most five named per reason).
fn summary(text: &str) -> String {
    use std::fmt::Write as _;
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        let (test, reason) = line.split_once('\t').unwrap_or((line, "no reason given"));
        by_reason.entry(reason).or_default().push(test);
    }
    let total: usize = by_reason.values().map(Vec::len).sum();
    let mut out = String::new();
    if total == 0 {
        out.push_str("== no test skipped: everything ran\n");
        return out;
    }
    let _ = writeln!(
        out,
        "== {total} test(s) SKIPPED (counted as passed above; they did not run). Run as root, \
         or install what is named, to run them:"
    );
    for (reason, tests) in &by_reason {
        let _ = writeln!(out, "   {} × {reason}", tests.len());
        for t in tests.iter().take(5) {
            let _ = writeln!(out, "       {t}");
        }
        if tests.len() > 5 {
            let _ = writeln!(out, "       … and {} more", tests.len() - 5);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_counts_by_reason() {
        assert_eq!(super::summary(""), "== no test skipped: everything ran\n");
        let s = super::summary("a\tneeds root\nb\tneeds root\nc\tstrace is not installed\n");
        assert!(s.starts_with("== 3 test(s) SKIPPED"), "{s}");
        assert!(s.contains("2 × needs root\n       a\n       b\n"), "{s}");
        assert!(s.contains("1 × strace is not installed"), "{s}");
    }
}
