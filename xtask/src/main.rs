//! Project automation, run as `cargo xtask <command>`.
//!
//! * `ci`: the same steps as `.ci/run` (format check, clippy, the test suite).
//! * `test`: the README's test command: doc tests and the suite, then the skipped tests.
//! * `sample-image`: regenerate the small OCI image under `examples/sample-image`.
//! * `kernel-profile VERSION -- CMD...`: run a command as on an older kernel (seccomp answers
//!   `ENOSYS` for newer system calls; see `kernel_profile.rs`).
//! * `bench`: side-by-side benchmarks against GNU tar and cp (see `bench.rs`).
//! * `man`: graphctl's man pages, generated from its command-line definition, into
//!   `target/man` (or a directory given).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use clap::{Parser, Subcommand};

// The in-tree drivers must be linked for benches that open them by name.
use drivers as _;

mod bench;
mod ci;
mod kernel_profile;
mod sample_image;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run what CI runs: fmt check, clippy -D warnings, the test suite.
    Ci,
    /// Run the doc tests and the suite (nextest), then list the tests that skipped and why.
    Test {
        /// Extra arguments for `cargo nextest run` (after `--`), e.g. `-E 'package(archive)'`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Regenerate examples/sample-image (a small, reproducible OCI image layout).
    SampleImage(sample_image::Args),
    /// Run the side-by-side benchmarks and write target/bench/report.{md,json}.
    Bench(bench::Args),
    /// Write graphctl's man pages (graphctl.1, graphctl-SUBCOMMAND.1) into DIR
    /// (default target/man); read one with `man -l target/man/graphctl.1`.
    Man {
        /// The directory to write into.
        #[arg(default_value = "target/man")]
        dir: std::path::PathBuf,
    },
    /// Run a command as on an older kernel: system calls newer than VERSION answer ENOSYS.
    KernelProfile {
        /// The kernel to imitate, MAJOR.MINOR (CI runs 5.4, 5.10, 5.15, 6.1, 6.8).
        version: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Ci => ci::run(),
        Command::Test { args } => test::run(&args),
        Command::SampleImage(args) => sample_image::run(args),
        Command::Bench(args) => bench::run(args),
        Command::KernelProfile { version, command } => kernel_profile::run(&version, &command),
        Command::Man { dir } => man(&dir),
    }
}

/// `cargo xtask man DIR`: builds graphctl and has it write its man pages (clap_mangen, from the
/// same definition that parses its command line, so the pages cannot drift from the tool).
fn man(dir: &std::path::Path) -> Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["run", "--quiet", "-p", "graphctl", "--", "man"])
        .arg(dir)
        .status()?;
    anyhow::ensure!(status.success(), "graphctl man failed: {status}");
    Ok(())
}
