//! `cargo xtask ci`: the steps of `.ci/run`, for running locally.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `.ci/run` from the workspace root, so local runs and CI can never drift apart.
pub fn run() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let status = Command::new("bash")
        .arg(root.join(".ci/run"))
        .current_dir(root)
        .status()
        .context("running .ci/run")?;
    if !status.success() {
        bail!(".ci/run failed: {status}");
    }
    Ok(())
}
