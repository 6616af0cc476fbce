//! Helpers the workspace's tests share, and the conformance suite with them.
//!
//! A test that needs root (mounts, overlay, chroot, mknod, uid 65534) runs when the process is
//! root or `CI=true` (where it must run, and fails rather than skips), and otherwise skips:
//! it prints why and, through [`record_skip`], appends a line to the file named by
//! [`SKIP_LOG_ENV`]. `cargo xtask test` (the README's test command) sets that variable and ends
//! with the count of skipped tests and their reasons, so a run in which root-only tests did not
//! run never looks like a run in which they passed.
//!
//! ```
//! fn needs_a_mount() {
//!     if !test_support::root_or_skip("mounting a tmpfs") {
//!         return;
//!     }
//!     // ... the test body
//! }
//! # needs_a_mount();
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io::Write;

/// The environment variable naming the file skipped tests are recorded in (one line each:
/// the test's name, a tab, the reason).
pub const SKIP_LOG_ENV: &str = "GRAPHDRIVER_SKIPPED_TESTS";

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True under `CI=true`, where no test may skip for want of root.
pub fn is_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether a test that needs root for `what` runs: true as root or under `CI=true`; otherwise
/// prints `skipping: <what> needs root` and records the skip ([`record_skip`]), and returns
/// false.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() || is_ci() {
        return true;
    }
    let reason = format!("{what} needs root (run as root, or set CI=true to force it)");
    eprintln!("skipping: {reason}");
    record_skip(&reason);
    false
}

/// Whether `tool` can be run here. Under `CI=true` a missing tool fails the test (`.ci/run`
/// installs the Debian package `package`); elsewhere the test skips: it prints the tool and
/// the package and records the skip ([`record_skip`]).
pub fn tool_or_skip(tool: &str, package: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            !is_ci(),
            "{tool} is required under CI=true: apt-get install {package} (.ci/run does)"
        );
        let reason = format!("{tool} is not installed (apt-get install {package})");
        eprintln!("skipping: {reason}");
        record_skip(&reason);
    }
    found
}

/// Records that the current test skipped, for `reason`: appends a line to the file named by
/// [`SKIP_LOG_ENV`], if set. The test's name is the current thread's (libtest and nextest name
/// the thread after the test). Errors writing the log are ignored: the skip was printed anyway.
pub fn record_skip(reason: &str) {
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let thread = std::thread::current();
    let _ = append_skip(
        std::path::Path::new(&path),
        thread.name().unwrap_or("(unnamed test)"),
        reason,
    );
}

/// Appends the line `test<TAB>reason` to `log` (tabs and newlines in either become spaces).
/// One write of a short line with `O_APPEND`: lines of parallel test processes do not mix.
fn append_skip(log: &std::path::Path, test: &str, reason: &str) -> std::io::Result<()> {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    let line = format!("{}\t{}\n", clean(test), clean(reason));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?
        .write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn skips_append_one_line_each() {
        let dir = std::env::temp_dir().join(format!("test-support-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skipped.txt");
        super::append_skip(&log, "a::b", "needs root").unwrap();
        super::append_skip(&log, "c", "two\nlines\tand a tab").unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "a::b\tneeds root\nc\ttwo lines and a tab\n");
    }
}
