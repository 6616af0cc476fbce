//! Mount points from `/proc/self/mountinfo`, and thin mount/unmount wrappers.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::{Error, IoContext, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Decodes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) the
/// kernel writes in mountinfo fields. Malformed escapes are kept as written.
pub fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Every mount point listed in `/proc/self/mountinfo` (the 5th field), decoded.
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string(MOUNTINFO).ctx("read", Path::new(MOUNTINFO))?;
    Ok(parse_mount_points(&text))
}

/// The mount points of mountinfo text.
pub fn parse_mount_points(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// True if `path` is a mount point in this process's mount namespace. `path` is made absolute
/// and symlink-free first; a path that does not exist is not a mount point.
pub fn is_mountpoint(path: &Path) -> Result<bool> {
    let abs = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("resolve", path, e)),
    };
    Ok(mount_points()?.contains(&abs))
}

/// How many times `path` (made absolute) appears as a mount point (stacked mounts count each).
pub fn mount_count(path: &Path) -> Result<usize> {
    let abs = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("resolve", path, e)),
    };
    Ok(mount_points()?.iter().filter(|m| **m == abs).count())
}

/// Mounts a filesystem of type `fstype` from `source` on `target` with the data string `data`.
pub fn mount(source: &str, target: &Path, fstype: &str, data: &str) -> Result<()> {
    mount_with_flags(
        source,
        target,
        fstype,
        rustix::mount::MountFlags::empty(),
        data,
    )
}

/// Like [`mount`], with mount `flags` (`MS_NODEV`, ...) besides the filesystem's `data`.
pub fn mount_with_flags(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: rustix::mount::MountFlags,
    data: &str,
) -> Result<()> {
    let err = |e: io::Error| Error::Mount {
        target: target.to_path_buf(),
        options: data.to_string(),
        source: e,
    };
    let cdata = CString::new(data.as_bytes()).map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "mount data contains a NUL byte",
        ))
    })?;
    rustix::mount::mount(
        source,
        target.as_os_str().as_bytes(),
        fstype,
        flags,
        cdata.as_c_str(),
    )
    .map_err(|e| err(e.into()))
}

/// Mounts a read-only bind of directory `source` on `target` (not recursive: submounts of
/// `source` are not carried over), with the extra mount `flags` (`MS_NODEV`, ...). Two calls, as
/// the kernel requires: the bind, then a remount of the new mount read-only. If the remount
/// fails the bind is taken down again, so a writable bind is never left behind.
pub fn bind_read_only(
    source: &Path,
    target: &Path,
    flags: rustix::mount::MountFlags,
) -> Result<()> {
    let err = |options: &str, e: rustix::io::Errno| Error::Mount {
        target: target.to_path_buf(),
        options: options.to_string(),
        source: e.into(),
    };
    rustix::mount::mount_bind(source, target).map_err(|e| err("bind", e))?;
    let ro = flags | rustix::mount::MountFlags::RDONLY;
    if let Err(e) = rustix::mount::mount_remount(target, ro | rustix::mount::MountFlags::BIND, c"")
    {
        let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
        return Err(err("remount,bind,ro", e));
    }
    Ok(())
}

/// Unmounts `target`. `EINVAL` (not a mount point) is an error too; callers that tolerate a
/// vanished mount check [`is_mountpoint`] first. `EBUSY` is retried for a quarter of a second
/// (a forked child's fleeting copies of our descriptors) before it is reported.
pub fn unmount(target: &Path) -> Result<()> {
    // A child forked by another thread (a confined apply) holds copies of every descriptor of
    // this process until it closes them, microseconds later: a mount with a file open in it is
    // busy for that moment. A few short retries tell that from a mount really in use.
    let mut delay = std::time::Duration::from_millis(2);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) if waited < UNMOUNT_BUSY_PATIENCE => {
                std::thread::sleep(delay);
                waited += delay;
                delay = (delay * 2).min(std::time::Duration::from_millis(50));
            }
            other => {
                return other.map_err(|e| Error::Mount {
                    target: target.to_path_buf(),
                    options: "unmount".to_string(),
                    source: e.into(),
                });
            }
        }
    }
}

/// How long [`unmount`] retries a mount that answers `EBUSY` before reporting it.
const UNMOUNT_BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(
            unescape(r"/a\040b\011c\012d\134e"),
            Path::new("/a b\tc\nd\\e")
        );
        assert_eq!(unescape(r"/plain"), Path::new("/plain"));
        assert_eq!(unescape(r"/bad\09x\"), Path::new(r"/bad\09x\"));
    }

    #[test]
    fn parses_the_fifth_field() {
        let text = "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / / rw - overlay overlay rw\n";
        assert_eq!(
            parse_mount_points(text),
            vec![PathBuf::from("/mnt two"), PathBuf::from("/")]
        );
    }

    #[test]
    fn a_read_only_bind_refuses_writes() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping a_read_only_bind_refuses_writes: needs root to mount");
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI=true needs root"
            );
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (src, view) = (d.path().join("src"), d.path().join("view"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&view).unwrap();
        fs::write(src.join("f"), b"x").unwrap();
        bind_read_only(&src, &view, rustix::mount::MountFlags::NODEV).unwrap();
        let write = fs::write(view.join("f"), b"y");
        let create = fs::write(view.join("g"), b"y");
        let read = fs::read(view.join("f"));
        unmount(&view).unwrap();
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert_eq!(create.unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert_eq!(read.unwrap(), b"x");
        assert_eq!(fs::read(src.join("f")).unwrap(), b"x");
        assert!(!src.join("g").exists());
    }

    #[test]
    fn proc_is_a_mountpoint_and_a_fresh_dir_is_not() {
        assert!(is_mountpoint(Path::new("/proc")).unwrap());
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(d.path()).unwrap());
        assert!(!is_mountpoint(&d.path().join("missing")).unwrap());
    }
}
