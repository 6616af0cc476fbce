//! Host probes of the overlay drivers (`overlay` and `overlay2`): one documented function per
//! question the drivers ask before they trust a kernel, a filesystem and a home, in the manner
//! of containerd's `overlayutils/check.go` and containers/storage's `overlay/check.go`.
//!
//! Each probe answers one thing; the drivers decide what an answer means for them (refuse to
//! start, fall back, report in `status`).

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use graphdriver::{Durability, Error, LayerStore, Result, mountinfo};

use crate::overlay::mountopt::{self, MountOptions};

/// What [`open_home`] found: the store in the home and the filesystem it is on.
pub(crate) struct Home {
    /// The opened (and recovered) store.
    pub store: LayerStore,
    /// The statfs magic of the home's filesystem.
    pub magic: i64,
    /// Its usual name ([`fs_name`]).
    pub backing_fs: String,
    /// The parsed `mount_options`.
    pub user_opts: MountOptions,
}

/// The start-up checks both overlay drivers make, in order, as driver `driver`: the user's
/// `mount_options` ([`mountopt::parse`], before anything touches the host), overlay in the
/// kernel ([`overlay_listed`]), the privilege to mount ([`can_mount`]), a home mount options
/// can name ([`home_unexpressible`]); then the store is opened and its filesystem checked
/// ([`incompatible`]). [`Error::InvalidOption`], [`Error::NotSupported`] or
/// [`Error::IncompatibleFs`] name what failed.
pub(crate) fn open_home(
    driver: &str,
    home: &Path,
    mount_options: Option<&str>,
    durability: Durability,
) -> Result<Home> {
    let fail = |reason: String| Error::NotSupported {
        driver: driver.to_string(),
        reason,
    };
    let user_opts =
        mountopt::parse(mount_options.unwrap_or("")).map_err(|reason| Error::InvalidOption {
            driver: driver.to_string(),
            key: "mount_options".to_string(),
            origin: None,
            reason,
        })?;
    match overlay_listed() {
        Ok(true) => {}
        Ok(false) => {
            return Err(fail(
                "the kernel does not list overlay in /proc/filesystems (load the overlay module)"
                    .to_string(),
            ));
        }
        Err(e) => return Err(fail(format!("cannot read /proc/filesystems: {e}"))),
    }
    if !can_mount() {
        return Err(fail(
            "needs root (CAP_SYS_ADMIN) to mount overlay".to_string(),
        ));
    }
    if let Some(why) = home_unexpressible(home) {
        return Err(fail(why));
    }
    let (store, _recovery) = LayerStore::open(home, durability)?;
    let magic = backing_magic(home).map_err(|e| fail(format!("statfs {}: {e}", home.display())))?;
    let backing_fs = fs_name(magic);
    if let Some(why) = incompatible(magic) {
        return Err(Error::IncompatibleFs {
            driver: driver.to_string(),
            fs: backing_fs,
            home: home.to_path_buf(),
            reason: why.to_string(),
        });
    }
    Ok(Home {
        store,
        magic,
        backing_fs,
        user_opts,
    })
}

/// [`supports_d_type`] as a start-up check of driver `driver`: [`Error::IncompatibleFs`] when
/// the filesystem `backing_fs` of `home` does not report file types, [`Error::NotSupported`]
/// when the check itself fails.
pub(crate) fn require_d_type(driver: &str, home: &Path, backing_fs: &str) -> Result<()> {
    let supported = supports_d_type(home).map_err(|e| Error::NotSupported {
        driver: driver.to_string(),
        reason: format!("checking d_type support: {e}"),
    })?;
    if supported {
        return Ok(());
    }
    Err(Error::IncompatibleFs {
        driver: driver.to_string(),
        fs: backing_fs.to_string(),
        home: home.to_path_buf(),
        reason: "the filesystem does not report file types in directory entries (d_type)"
            .to_string(),
    })
}

/// Where the overlay module publishes its parameters.
const PARAMS: &str = "/sys/module/overlay/parameters";

/// Whether the kernel lists `overlay` in `/proc/filesystems` (the module is loaded or built in).
/// An unreadable `/proc/filesystems` is the error.
pub(crate) fn overlay_listed() -> io::Result<bool> {
    let filesystems = fs::read_to_string("/proc/filesystems")?;
    Ok(filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay")))
}

/// Whether this process may mount (effective uid 0; the drivers need `CAP_SYS_ADMIN`).
pub(crate) fn can_mount() -> bool {
    rustix::process::geteuid().is_root()
}

/// Why `home` cannot appear in overlay mount options, if it cannot: a `,`, `:` or `=` would be
/// read as an option separator, and the option string must be UTF-8.
pub(crate) fn home_unexpressible(home: &Path) -> Option<String> {
    let Some(text) = home.to_str() else {
        return Some(format!("the home {} is not valid UTF-8", home.display()));
    };
    text.chars()
        .find(|c| matches!(c, ',' | ':' | '='))
        .map(|bad| {
            format!(
                "the home {} contains {bad:?}, which overlay mount options cannot express",
                home.display()
            )
        })
}

/// The statfs magic of the filesystem `home` is on.
pub(crate) fn backing_magic(home: &Path) -> io::Result<i64> {
    Ok(rustix::fs::statfs(home)?.f_type as i64)
}

/// Whether the overlay module has the `index` parameter (Linux 4.13+): then the drivers mount
/// with `index=off`, so a layer can be mounted over lowers it was not made on.
pub(crate) fn has_index_param() -> bool {
    Path::new(PARAMS).join("index").exists()
}

/// A boolean module parameter of overlay (`Y`/`N`), `None` when the kernel has no such
/// parameter (older kernels, where the feature does not exist).
pub(crate) fn module_param(name: &str) -> Option<bool> {
    let text = fs::read_to_string(Path::new(PARAMS).join(name)).ok()?;
    Some(matches!(text.trim(), "Y" | "y" | "1" | "on"))
}

/// Whether a layer's upper directory alone tells its changes exactly on this host, for mounts
/// made with `options`: `Ok(())` or the reason it does not. Directory renames recorded as
/// `redirect_dir` xattrs, `metacopy` files (metadata copied up without data) and the inode
/// index make an upper's contents depend on its lowers; the drivers turn the first two off
/// explicitly where the kernel knows them, so only mount options that turn them back on make
/// the upper inexact.
pub(crate) fn native_diff_exact(options: &[String]) -> Result<(), String> {
    for o in options {
        let (key, value) = o.split_once('=').unwrap_or((o.as_str(), ""));
        let on = !matches!(value, "off" | "nofollow" | "");
        if matches!(key, "redirect_dir" | "metacopy" | "index") && on {
            return Err(format!(
                "the mount option {o:?} makes upper directories depend on their lowers"
            ));
        }
    }
    Ok(())
}

/// Removes the scratch directories (`.probe-<pid>`, `.dtype-<pid>`) of earlier processes that
/// died during init, unmounting a probe mount they left behind.
pub(crate) fn remove_stale_scratch(home: &Path) {
    let Ok(entries) = fs::read_dir(home) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix(".probe-")
                    .or_else(|| n.strip_prefix(".dtype-"))
            })
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if alive {
            continue;
        }
        let path = entry.path();
        let merged = path.join("merged");
        if mountinfo::is_mountpoint(&merged).unwrap_or(false) {
            let _ = mountinfo::unmount(&merged);
        }
        match archive::fs::remove_tree(&path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "removed the scratch directory of an interrupted init")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "could not remove a stale scratch directory")
            }
        }
    }
}

/// The usual name of a filesystem by its statfs magic.
pub(crate) fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "extfs".into(),
        0x01021994 => "tmpfs".into(),
        0x58465342 => "xfs".into(),
        0x9123683E => "btrfs".into(),
        0x2FC12FC1 => "zfs".into(),
        0x794C7630 => "overlayfs".into(),
        0x61756673 => "aufs".into(),
        0xF15F => "ecryptfs".into(),
        0x6969 => "nfs".into(),
        0x65735546 => "fuse".into(),
        other => format!("unknown (magic {other:#x})"),
    }
}

/// Why overlay cannot use a filesystem as its backing store, if it cannot.
pub(crate) fn incompatible(magic: i64) -> Option<&'static str> {
    match magic {
        0x794C7630 => Some("overlay cannot use an overlay filesystem as upper and work directory"),
        0x61756673 => Some("overlay cannot run on aufs"),
        0xF15F => Some("overlay cannot run on ecryptfs"),
        _ => None,
    }
}

/// The record of passed init probes in the home (a dot-name: never a layer id).
pub(crate) const PROBE_RECORD: &str = ".probed";

/// What the init probes depend on: the running kernel, the backing filesystem, whether the
/// `index` parameter exists and the user's mount options. A record with another key (a new
/// kernel after a reboot, other options) makes the next start probe again.
pub(crate) fn probe_key(magic: i64, index_param: bool, mount_options: Option<&str>) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "v1 kernel={} fs={magic:x} index={index_param} options={}",
        kernel.trim(),
        mount_options.unwrap_or("").trim()
    )
}

/// True if the home's probe record holds `key` (read without following a symlink; anything
/// unreadable counts as no record, so the probes run).
pub(crate) fn probe_record_matches(home: &Path, key: &str) -> bool {
    let Ok(fd) = rustix::fs::open(
        home.join(PROBE_RECORD),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return false;
    };
    let mut text = String::new();
    let read = fs::File::from(fd).take(4096).read_to_string(&mut text);
    read.is_ok() && text == key
}

/// Records that the probes passed for `key`: written to a new file and renamed into place,
/// best effort (a failure only means the next start probes again).
pub(crate) fn write_probe_record(home: &Path, key: &str) {
    let tmp = home.join(format!("{PROBE_RECORD}-{}", std::process::id()));
    let written = fs::write(&tmp, key).and_then(|()| fs::rename(&tmp, home.join(PROBE_RECORD)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        tracing::debug!(home = %home.display(), error = %e, "could not record the init probes");
    }
}

/// Creates a file in a scratch dir under `home` and checks that readdir reports its type.
pub(crate) fn supports_d_type(home: &Path) -> io::Result<bool> {
    let scratch = home.join(format!(".dtype-{}", std::process::id()));
    let _ = archive::fs::remove_tree(&scratch);
    fs::create_dir(&scratch)?;
    let result = (|| {
        fs::write(scratch.join("f"), b"")?;
        let fd = rustix::fs::open(
            &scratch,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut found = false;
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            if entry.file_name() == c"f" {
                found = entry.file_type() != rustix::fs::FileType::Unknown;
            }
        }
        Ok(found)
    })();
    let _ = archive::fs::remove_tree(&scratch);
    result
}
