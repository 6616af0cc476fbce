//! The dedicated scratch filesystem every case runs on, and its cleanup guard.
//!
//! `ext4` (the default): a sparse image file, `mkfs.ext4` with inode tables and journal written
//! up front (`lazy_itable_init=0,lazy_journal_init=0`, so no background zeroing thread runs
//! during the measurements) and without discard, attached to a loop device with direct I/O
//! (falling back to buffered if refused) and mounted with `nodiscard`. The host disk
//! of this machine uses online discard: after deleting 100 000 files there the next GNU
//! `tar -x` took 76 s instead of 4.5 s, all in the kernel. `tmpfs`: a size-limited tmpfs.
//!
//! [`Scratch`] unmounts (recursively, so overlay mounts left inside go too), detaches the loop
//! device and deletes the image when dropped: on success, on error and after Ctrl-C (the
//! signal handler only sets a flag that the case runner checks between runs). A detached
//! watchdog shell does the same if the xtask process dies without running its destructors
//! (SIGKILL, abort).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use super::run_cmd;

/// Which filesystem the scratch area is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// A fresh loop-mounted ext4 image (nodiscard).
    Ext4,
    /// A tmpfs.
    Tmpfs,
}

/// A mounted scratch filesystem; unmounted and deleted on drop.
pub struct Scratch {
    /// Where it is mounted.
    pub mnt: PathBuf,
    /// The directory holding the mount point and image.
    base: PathBuf,
    image: Option<PathBuf>,
    /// What it is, for the report.
    pub description: String,
    mounted: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the process, so the guard runs.
pub fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; replacing
        // the disposition of SIGINT/SIGTERM affects no other code in this process.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Fails if SIGINT or SIGTERM arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

impl Scratch {
    /// Creates and mounts a scratch filesystem of `size_gib` GiB with room for `inodes` inodes
    /// under `out` (the image and mount point go in `out/scratch-<pid>`).
    pub fn setup(kind: FsKind, out: &Path, size_gib: u64, inodes: u64) -> Result<Scratch> {
        let base = out.join(format!("scratch-{}", std::process::id()));
        let mnt = base.join("mnt");
        fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        let mut s = Scratch {
            mnt: mnt.clone(),
            base: base.clone(),
            image: None,
            description: String::new(),
            mounted: false,
        };
        let host_fs = host_fs(out);
        match kind {
            FsKind::Ext4 => {
                let image = base.join("scratch.img");
                let f = fs::File::create(&image)
                    .with_context(|| format!("creating {}", image.display()))?;
                f.set_len(size_gib << 30)?;
                drop(f);
                s.image = Some(image.clone());
                s.spawn_watchdog();
                run_cmd(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-N", &inodes.to_string()])
                        .args(["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"])
                        .arg(&image),
                )?;
                let (dev, direct) = attach_loop(&image)?;
                run_cmd(
                    Command::new("mount")
                        .args(["-t", "ext4", "-o", "nodiscard"])
                        .arg(&dev)
                        .arg(&mnt),
                )?;
                s.mounted = true;
                s.description = format!(
                    "ext4 ({size_gib} GiB sparse image, {inodes} inodes) on {dev} ({}), mounted nodiscard, image on {host_fs}",
                    if direct {
                        "direct I/O"
                    } else {
                        "buffered: --direct-io=on was refused"
                    }
                );
            }
            FsKind::Tmpfs => {
                s.spawn_watchdog();
                run_cmd(
                    Command::new("mount")
                        .args([
                            "-t",
                            "tmpfs",
                            "-o",
                            &format!("size={size_gib}g,nr_inodes={inodes}"),
                        ])
                        .arg("tmpfs")
                        .arg(&mnt),
                )?;
                s.mounted = true;
                s.description = format!("tmpfs (size={size_gib}g)");
            }
        }
        Ok(s)
    }

    /// A detached (`setsid`) shell that cleans up once this process is gone, whatever killed it.
    fn spawn_watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 2; done; \
             if mountpoint -q '{mnt}'; then umount -R '{mnt}' || umount -R -l '{mnt}'; fi; \
             {img_cleanup} rm -rf '{base}'",
            pid = std::process::id(),
            mnt = self.mnt.display(),
            base = self.base.display(),
            img_cleanup = match &self.image {
                Some(img) => format!(
                    "losetup -j '{}' | cut -d: -f1 | xargs -r -n1 losetup -d;",
                    img.display()
                ),
                None => String::new(),
            },
        );
        let spawned = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!("bench: no cleanup watchdog ({e}); the guard still cleans up on exit");
        }
    }

    /// Unmounts, detaches and deletes; idempotent. Errors are printed, not returned.
    fn cleanup(&mut self) {
        if self.mounted {
            // Let the driver's overlay mounts and the loop mount go, innermost first.
            let ok = Command::new("umount")
                .arg("-R")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "bench: umount -R {} failed; detaching lazily",
                    self.mnt.display()
                );
                let _ = Command::new("umount")
                    .arg("-R")
                    .arg("-l")
                    .arg(&self.mnt)
                    .status();
            }
            self.mounted = false;
        }
        if let Some(img) = self.image.take() {
            // Detach every loop device backed by the image (ours, and any a crash left behind).
            if let Ok(out) = Command::new("losetup").arg("-j").arg(&img).output() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some((dev, _)) = line.split_once(':') {
                        let _ = Command::new("losetup").arg("-d").arg(dev).status();
                    }
                }
            }
            if let Err(e) = fs::remove_file(&img) {
                eprintln!("bench: removing {}: {e}", img.display());
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.base)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("bench: removing {}: {e}", self.base.display());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Attaches `image` to a free loop device, with direct I/O when the kernel allows it (no double
/// caching in the host page cache, so `sync` really reaches the disk and no host write-back of an
/// earlier run lands in a later one). Returns the device and whether direct I/O is on.
fn attach_loop(image: &Path) -> Result<(String, bool)> {
    for direct in [true, false] {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if direct {
            cmd.arg("--direct-io=on");
        }
        let out = cmd.arg(image).stdin(Stdio::null()).output()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && dev.starts_with("/dev/") {
            return Ok((dev, direct));
        }
        if !direct {
            bail!(
                "losetup -f --show {} failed ({}): {}",
                image.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    bail!("no loop device for {}", image.display())
}

/// The filesystem `path` is on, as `findmnt` describes it (`ext4 /dev/vda (rw,relatime,discard)`).
pub fn host_fs(path: &Path) -> String {
    Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T"])
        .arg(path)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown filesystem".to_string())
}
