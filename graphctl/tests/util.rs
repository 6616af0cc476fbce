//! Helpers: a temporary store ([`Store`]) and a command runner for the built binary
//! ([`TestCommand`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The committed sample image (`cargo xtask sample-image`).
pub fn sample_image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample-image")
}

pub use test_support::is_root;

/// Why a root-only test must be skipped here, or `None` to run it (always run under `CI=true`).
pub fn skip_root_test() -> Option<&'static str> {
    if test_support::is_ci() || is_root() {
        None
    } else {
        let reason = "needs root (set CI=true to force it)";
        test_support::record_skip(reason);
        Some(reason)
    }
}

/// A temporary storage root used with one driver.
pub struct Store {
    /// Owns the temporary directory.
    pub dir: tempfile::TempDir,
    /// The storage root passed as `--root`.
    pub root: PathBuf,
    /// The driver passed as `--driver`.
    pub driver: &'static str,
}

impl Store {
    /// A fresh, empty store for `driver`.
    pub fn new(driver: &'static str) -> Store {
        let dir = tempfile::Builder::new()
            .prefix("graphctl-test-")
            .tempdir_in(test_tmp())
            .unwrap();
        let root = dir.path().join("root");
        write_empty_config(dir.path());
        Store { dir, root, driver }
    }

    /// A store whose root is `root` (for special filesystems).
    pub fn at(driver: &'static str, root: PathBuf) -> Store {
        let dir = tempfile::tempdir_in(test_tmp()).unwrap();
        write_empty_config(dir.path());
        Store { dir, root, driver }
    }

    /// The empty config file every command reads (`GRAPHCTL_CONFIG`, which must exist).
    pub fn empty_config(&self) -> PathBuf {
        self.dir.path().join(EMPTY_CONFIG)
    }

    /// `graphctl --root ROOT --driver DRIVER ARGS...`.
    pub fn cmd(&self, args: &[&str]) -> TestCommand {
        let mut c = self.cmd_auto(&["--driver", self.driver]);
        c.cmd.args(args);
        c
    }

    /// `graphctl --root ROOT ARGS...`: automatic driver selection.
    pub fn cmd_auto(&self, args: &[&str]) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_graphctl"));
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            // A fixed, empty config: the host's files and environment must not leak in.
            .env("GRAPHCTL_CONFIG", self.empty_config())
            .env_remove("GRAPHDRIVER")
            .env_remove("GRAPHDRIVER_OPTS")
            .env_remove("RUST_LOG");
        TestCommand { cmd, stdin: None }
    }

    /// Runs `args`, asserts success and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.cmd(args).ok()
    }

    /// Runs `args`, asserts exit status 1 with a one-line `error:` message; returns the message.
    pub fn err(&self, args: &[&str]) -> String {
        self.cmd(args).err()
    }

    /// A path showing layer `id`'s tree for the test to read, and the layer to [`Store::unlook`]
    /// afterwards: the read-only view of `mount ID` as root; without root (no view can be
    /// mounted, and `mount` of a committed layer is refused) a read-write layer `ID-look`
    /// created on top and mounted (on vfs a plain copy).
    #[allow(dead_code)]
    pub fn look(&self, id: &str) -> (PathBuf, String) {
        let held = if is_root() {
            id.to_string()
        } else {
            let top = format!("{id}-look");
            self.ok(&["create", "--rw", "--parent", id, &top]);
            top
        };
        (PathBuf::from(self.ok(&["mount", &held]).trim()), held)
    }

    /// Releases what [`Store::look`] took (and removes its extra layer, if any).
    #[allow(dead_code)]
    pub fn unlook(&self, held: &str) {
        self.ok(&["unmount", held]);
        if held.ends_with("-look") {
            self.ok(&["rm", held]);
        }
    }

    /// A path for scratch files that is not inside the store.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Store {
    /// Unmounts whatever a failed test left mounted, so the temporary directory can go.
    fn drop(&mut self) {
        if self.root.exists() {
            let _ = self.cmd(&["cleanup"]).output();
        }
    }
}

/// The name of the empty config file in each [`Store`]'s directory.
const EMPTY_CONFIG: &str = "empty-config.toml";

fn write_empty_config(dir: &Path) {
    std::fs::write(dir.join(EMPTY_CONFIG), "").unwrap();
}

/// Where tests put their temporary directories: `$GRAPHCTL_TEST_TMP` (CI's filesystem matrix
/// points it at each loop-mounted filesystem), else the target dir's filesystem (overlayfs does
/// not accept every filesystem as upper, and /tmp may be one of those).
pub fn test_tmp() -> PathBuf {
    let dir = std::env::var_os("GRAPHCTL_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `graphctl` invocation.
pub struct TestCommand {
    /// The command.
    pub cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl TestCommand {
    /// Wraps a prepared command.
    pub fn new(cmd: Command) -> Self {
        TestCommand { cmd, stdin: None }
    }

    /// Feeds `data` on stdin.
    pub fn stdin(mut self, data: Vec<u8>) -> Self {
        self.stdin = Some(data);
        self
    }

    /// Runs the command to completion.
    pub fn output(mut self) -> Output {
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.cmd.spawn().unwrap();
        if let Some(data) = self.stdin.take() {
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        child.wait_with_output().unwrap()
    }

    /// Asserts exit status 0 and returns stdout.
    pub fn ok(self) -> String {
        let desc = format!("{:?}", self.cmd);
        let out = self.output();
        assert!(
            out.status.success(),
            "{desc} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Asserts exit status `code` and returns (stdout, stderr).
    pub fn status(self, code: i32) -> (String, String) {
        let desc = format!("{:?}", self.cmd);
        let out = self.output();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{desc}:\nstdout: {stdout}\nstderr: {stderr}"
        );
        (stdout, stderr)
    }

    /// Asserts exit status 1 and exactly one `error:` line on stderr (notes and logs aside);
    /// returns that line.
    pub fn err(self) -> String {
        let (_, stderr) = self.status(1);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
        let others: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("error:") && !l.starts_with("note:"))
            .collect();
        assert!(others.is_empty(), "unexpected stderr lines: {stderr}");
        errors[0].to_string()
    }
}

/// A mounted filesystem for a test, unmounted on drop (root only).
pub struct TmpMount {
    /// The mount point.
    pub path: PathBuf,
}

impl TmpMount {
    /// Mounts a tmpfs of `size` (e.g. `"1m"`) at a new directory under `parent`.
    pub fn tmpfs(parent: &Path, size: &str) -> TmpMount {
        Self::tmpfs_with(parent, &format!("size={size}"))
    }

    /// Mounts a tmpfs with mount options `opts` (e.g. `"size=8m,nr_inodes=500"`).
    pub fn tmpfs_with(parent: &Path, opts: &str) -> TmpMount {
        let path = parent.join("tmpfs");
        std::fs::create_dir_all(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", path.display());
        TmpMount { path }
    }

    /// Remounts read-only (`ro`) or read-write (`rw`).
    pub fn remount(&self, mode: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for TmpMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.path).status();
    }
}

/// The ids `graphctl ls` prints.
#[allow(dead_code)]
pub fn ls_ids(s: &Store) -> BTreeSet<String> {
    s.ok(&["ls"])
        .lines()
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Decoded mount points of this process's namespace.
#[allow(dead_code)]
pub fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(drivers::mountinfo::unescape)
        .collect()
}

/// Mount points at or below `dir`.
#[allow(dead_code)]
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// A tree read with plain `std::fs` calls (an oracle independent of our tar code): relative
/// path → contents for regular files, `<type>` for anything else but directories.
pub type Tree = BTreeMap<String, Vec<u8>>;

/// The files under `dir` as a [`Tree`].
#[allow(dead_code)]
pub fn read_tree(dir: &Path) -> Tree {
    fn walk(dir: &Path, rel: &str, out: &mut Tree) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().into_string().unwrap();
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&e.path(), &path, out);
            } else if ft.is_file() {
                out.insert(path, std::fs::read(e.path()).unwrap());
            } else {
                out.insert(path, format!("<{ft:?}>").into_bytes());
            }
        }
    }
    let mut out = Tree::new();
    walk(dir, "", &mut out);
    out
}

/// `cmd` (its program, arguments and environment) run under `strace` with `strace_args`
/// (fault injection: `-e inject=...`).
#[allow(dead_code)]
pub fn under_strace<S: AsRef<std::ffi::OsStr>>(cmd: &Command, strace_args: &[S]) -> Command {
    let mut st = Command::new("strace");
    st.args(strace_args)
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => st.env(k, v),
            None => st.env_remove(k),
        };
    }
    st
}

/// True if `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// A plain layer tar from `(path, contents)` pairs (directories end in `/`): see
/// [`graphdriver_image::test_util::layer_tar`].
pub fn layer_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    graphdriver_image::test_util::layer_tar(entries).unwrap()
}

/// A new pseudo-terminal: (master, slave). A command given the slave as stdin, stdout or
/// stderr sees a terminal there; what it writes is read from the master.
pub fn pty() -> (std::fs::File, std::fs::File) {
    use std::ffi::CStr;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // SAFETY: posix_openpt takes flags only; the result is checked before use.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `fd` is the open pty master; `name` is a writable buffer of the length given.
    let rc = unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            -1
        } else {
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
        }
    };
    assert_eq!(rc, 0, "pty setup: {}", std::io::Error::last_os_error());
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap();
    (master, slave)
}

/// Everything readable from a pty `master` after the last slave descriptor closed (Linux then
/// answers EIO instead of EOF).
pub fn read_pty(mut master: std::fs::File) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out
}

/// Makes `cmd` run as `nobody` (uid and gid 65534) when the tests run as root, so that file
/// permissions apply to it; a normal user's commands run as that user.
pub fn as_unprivileged(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    if is_root() {
        cmd.uid(65534).gid(65534);
    }
}
