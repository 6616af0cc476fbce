//! Mounting an overlay of a lower chain: with the new mount API and `lowerdir+` (Linux 6.8+)
//! each lower is its own `fsconfig` call and a chain has no length limit; otherwise one
//! `mount(2)` whose option string must fit in a page.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use graphdriver::{Error, Result, mountinfo};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, fsconfig_create,
    fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
};

/// The kernel copies at most one page of `mount(2)` data; the last byte is the terminating NUL.
pub(crate) const MAX_MOUNT_DATA: usize = 4096;

/// How the driver hands a lower chain to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountApi {
    /// `fsopen` + one `fsconfig("lowerdir+")` per lower (Linux 6.8+): no depth limit.
    LowerdirPlus,
    /// One `mount(2)` with `lowerdir=a:b:…`: the data must fit in one page, which limits the
    /// depth of a chain (the error names the limit).
    OptionString,
}

/// One overlay mount to make.
pub(crate) struct Spec<'a> {
    /// The lower directories, topmost first.
    pub lowers: &'a [PathBuf],
    /// The upper and work directories, or none for a read-only view.
    pub upper: Option<(&'a Path, &'a Path)>,
    /// Overlay options after the driver's own, each `key` or `key=value`.
    pub data: &'a [String],
    /// Mount flags (`MS_RDONLY`, `MS_NODEV`, …).
    pub flags: MountFlags,
}

impl Spec<'_> {
    /// The `mount(2)` data string of this mount.
    pub(crate) fn option_string(&self) -> String {
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect();
        let mut data = format!("lowerdir={}", lowers.join(":"));
        if let Some((upper, work)) = self.upper {
            data.push_str(&format!(
                ",upperdir={},workdir={}",
                upper.display(),
                work.display()
            ));
        }
        for item in self.data {
            data.push(',');
            data.push_str(item);
        }
        data
    }
}

/// Mounts `spec` on `target` with `api`.
pub(crate) fn mount(target: &Path, spec: &Spec<'_>, api: MountApi) -> Result<()> {
    match api {
        MountApi::OptionString => {
            let data = spec.option_string();
            if data.len() >= MAX_MOUNT_DATA {
                return Err(Error::Mount {
                    target: target.to_path_buf(),
                    options: data.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "a chain of {} lower layers needs {} bytes of mount options; \
                             mount(2) takes fewer than {MAX_MOUNT_DATA} (one page), so this \
                             kernel mounts chains of about {} layers at this home (Linux 6.8+ \
                             with lowerdir+ has no limit)",
                            spec.lowers.len(),
                            data.len(),
                            depth_limit(spec)
                        ),
                    ),
                });
            }
            mountinfo::mount_with_flags("overlay", target, "overlay", spec.flags, &data)
        }
        MountApi::LowerdirPlus => mount_new_api(target, spec).map_err(|source| Error::Mount {
            target: target.to_path_buf(),
            options: spec.option_string(),
            source,
        }),
    }
}

/// How many lowers of the length of `spec`'s fit in one page of mount data.
fn depth_limit(spec: &Spec<'_>) -> usize {
    let per = spec
        .lowers
        .iter()
        .map(|l| l.as_os_str().len() + 1)
        .max()
        .unwrap_or(1);
    let fixed = spec.option_string().len()
        - spec
            .lowers
            .iter()
            .map(|l| l.as_os_str().len() + 1)
            .sum::<usize>();
    MAX_MOUNT_DATA.saturating_sub(fixed) / per
}

/// The mount attributes the new API takes for `flags`.
fn attr_flags(flags: MountFlags) -> MountAttrFlags {
    let mut attr = MountAttrFlags::empty();
    for (flag, a) in [
        (MountFlags::RDONLY, MountAttrFlags::MOUNT_ATTR_RDONLY),
        (MountFlags::NOSUID, MountAttrFlags::MOUNT_ATTR_NOSUID),
        (MountFlags::NODEV, MountAttrFlags::MOUNT_ATTR_NODEV),
        (MountFlags::NOEXEC, MountAttrFlags::MOUNT_ATTR_NOEXEC),
        (MountFlags::NOATIME, MountAttrFlags::MOUNT_ATTR_NOATIME),
        (
            MountFlags::NODIRATIME,
            MountAttrFlags::MOUNT_ATTR_NODIRATIME,
        ),
        (
            MountFlags::STRICTATIME,
            MountAttrFlags::MOUNT_ATTR_STRICTATIME,
        ),
    ] {
        if flags.contains(flag) {
            attr |= a;
        }
    }
    attr
}

fn mount_new_api(target: &Path, spec: &Spec<'_>) -> io::Result<()> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for lower in spec.lowers {
        fsconfig_set_string(fs.as_fd(), "lowerdir+", lower)?;
    }
    if let Some((upper, work)) = spec.upper {
        fsconfig_set_string(fs.as_fd(), "upperdir", upper)?;
        fsconfig_set_string(fs.as_fd(), "workdir", work)?;
    }
    for item in spec.data {
        match item.split_once('=') {
            // A quoted label (`context="a,b"`) is one value without its quotes here.
            Some((key, value)) => {
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                fsconfig_set_string(fs.as_fd(), key, value)?
            }
            None => fsconfig_set_flag(fs.as_fd(), item.as_str())?,
        }
    }
    // Superblock flags of mount(2) are fsconfig flags here.
    for (flag, name) in [
        (MountFlags::SYNCHRONOUS, "sync"),
        (MountFlags::DIRSYNC, "dirsync"),
        (MountFlags::LAZYTIME, "lazytime"),
    ] {
        if spec.flags.contains(flag) {
            fsconfig_set_flag(fs.as_fd(), name)?;
        }
    }
    fsconfig_create(fs.as_fd())?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        attr_flags(spec.flags),
    )?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// Whether this kernel takes `lowerdir+` (Linux 6.8+): an `fsopen` of overlay and one
/// `fsconfig` of a lower directory, nothing mounted. `ENOSYS` (no new mount API) and
/// `EINVAL` (no `lowerdir+`) answer no.
pub(crate) fn lowerdir_plus_supported(lower: &Path) -> bool {
    let Ok(fs) = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) else {
        return false;
    };
    fsconfig_set_string(fs.as_fd(), "lowerdir+", lower).is_ok()
}
