//! Output that hostile names cannot forge, `diff -o` that never deletes what it did not create,
//! the raised open-file limit, and config errors that do not echo the file.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{Store, TmpMount, layer_tar, skip_root_test};

/// Names a container can create that would garble `changes` output if printed raw.
const HOSTILE: &[&[u8]] = &[
    b"\x1b[2Jclear",
    b"bad\xff\xfeutf8",
    b"tab\there",
    b"\"quoted\"",
];

/// A directory name that, printed raw, makes `A /x\nD /etc/passwd` read as two lines.
const FORGER: &[u8] = b"x\nD ";

/// A read-write layer `ctr` on `base` holding one file per [`HOSTILE`] name, `plain`, and
/// `FORGER/etc/passwd`; returns, sorted, every path `changes` must list.
fn hostile_layer(s: &Store) -> Vec<Vec<u8>> {
    s.ok(&["create", "base"]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let mount = PathBuf::from(s.ok(&["mount", "ctr"]).trim_end());
    let mut want = Vec::new();
    for name in HOSTILE.iter().chain([&&b"plain"[..]]) {
        fs::write(mount.join(OsStr::from_bytes(name)), b"x").unwrap();
        want.push([&b"/"[..], name].concat());
    }
    let forger = mount.join(OsStr::from_bytes(FORGER));
    fs::create_dir_all(forger.join("etc")).unwrap();
    fs::write(forger.join("etc/passwd"), b"x").unwrap();
    for tail in [&b""[..], b"/etc", b"/etc/passwd"] {
        want.push([&b"/"[..], FORGER, tail].concat());
    }
    s.ok(&["unmount", "ctr"]);
    want.sort();
    want
}

driver_test!(changes_text_cannot_be_forged, |driver| {
    let s = Store::new(driver);
    let want = hostile_layer(&s);
    let out = s.ok(&["changes", "ctr"]);
    let lines: Vec<&str> = out.lines().collect();
    // One line per path: no name spilled onto a second line.
    assert_eq!(lines.len(), want.len(), "{out}");
    assert!(!lines.contains(&"D /etc/passwd"), "{out}");
    assert!(!out.contains('\x1b') && !out.contains('\t'), "{out:?}");
    assert!(lines.contains(&"A /plain"), "{out}");
    assert!(lines.contains(&r#"A "/x\nD /etc/passwd""#), "{out}");
    assert!(lines.contains(&r#"A "/\x1b[2Jclear""#), "{out}");
    assert!(lines.contains(&r#"A "/bad\xff\xfeutf8""#), "{out}");
    assert!(lines.contains(&r#"A "/tab\there""#), "{out}");
    // A quote inside a name is plain: only a leading one would look like a quoted name.
    assert!(lines.contains(&r#"A /"quoted""#), "{out}");
    // Every printed path reads back as exactly the name on disk.
    let mut back: Vec<Vec<u8>> = lines
        .iter()
        .map(|l| archive::quote::unquote(l.strip_prefix("A ").unwrap()).unwrap())
        .collect();
    back.sort();
    assert_eq!(back, want);
});

driver_test!(changes_json_is_lossless_for_non_utf8_names, |driver| {
    let s = Store::new(driver);
    let want = hostile_layer(&s);
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "changes", "ctr"])).unwrap();
    let entries = v["changes"].as_array().unwrap();
    assert_eq!(entries.len(), want.len());
    let mut back = Vec::new();
    for e in entries {
        assert_eq!(e["kind"], "add");
        let path = e["path"].as_str().unwrap();
        let bytes = match e.get("path_bytes") {
            Some(b) => {
                let bytes: Vec<u8> = serde_json::from_value(b.clone()).unwrap();
                // Only names that are not UTF-8 carry their bytes; `path` is their lossy form.
                assert!(std::str::from_utf8(&bytes).is_err(), "{e}");
                assert_eq!(path, String::from_utf8_lossy(&bytes), "{e}");
                bytes
            }
            None => path.as_bytes().to_vec(),
        };
        back.push(bytes);
    }
    back.sort();
    assert_eq!(back, want);
    let bad: Vec<_> = entries
        .iter()
        .filter(|e| e.get("path_bytes").is_some())
        .collect();
    assert_eq!(bad.len(), 1, "{v}");
    assert_eq!(bad[0]["path"], "/bad\u{fffd}\u{fffd}utf8");
});

#[test]
fn status_json_survives_a_non_utf8_root() {
    let base = Store::new("vfs");
    let root = base.scratch("").join(OsStr::from_bytes(b"root\xff"));
    let s = Store::at("vfs", root.clone());
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "status"])).unwrap();
    let bytes: Vec<u8> = serde_json::from_value(v["home_bytes"].clone()).unwrap();
    assert_eq!(bytes, root.join("vfs").as_os_str().as_bytes());
    assert_eq!(
        v["home"].as_str().unwrap(),
        root.join("vfs").to_string_lossy()
    );
}

#[test]
fn changes_errors_stay_on_one_clean_line() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    for args in [
        &["changes", "nope"][..],
        &["changes", "x\x1b[31my"],
        &["changes", "a\nb"],
        &["changes", "--parent", "nope", "base"],
        &["changes", "--parent", "../x", "base"],
        &["changes", ""],
    ] {
        let (_, stderr) = s.cmd(args).status(1);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr:?}");
        assert!(
            !stderr.trim_end().chars().any(char::is_control),
            "{args:?}: {stderr:?}"
        );
    }
    let msg = s.err(&["changes", "nope"]);
    assert!(
        msg.contains("nope") && msg.contains("does not exist"),
        "{msg}"
    );
    let msg = s.err(&["changes", "--parent", "nope", "base"]);
    assert!(msg.contains("nope"), "{msg}");
    let msg = s.err(&["changes", "x\x1b[31my"]);
    assert!(msg.contains("invalid layer id"), "{msg}");
}

/// A store with a layer `l1` whose diff is `size` bytes of file content.
fn layer_with(s: &Store, size: usize) {
    s.ok(&["create", "base"]);
    let tar = s.scratch("l1.tar");
    fs::write(&tar, layer_tar(&[("big", &vec![b'z'; size])])).unwrap();
    s.ok(&["apply", "--parent", "base", "l1", tar.to_str().unwrap()]);
}

#[test]
fn diff_output_refuses_fifos_symlinks_and_directories() {
    let s = Store::new("vfs");
    layer_with(&s, 10);
    let fifo = s.scratch("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let target = s.scratch("target");
    fs::write(&target, "keep me").unwrap();
    let link = s.scratch("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dir = s.scratch("dir");
    fs::create_dir(&dir).unwrap();
    for (path, what) in [
        (&fifo, "a FIFO"),
        (&link, "a symlink"),
        (&dir, "a directory"),
    ] {
        let msg = s.err(&["diff", "l1", "-o", path.to_str().unwrap()]);
        assert!(
            msg.contains(path.to_str().unwrap()) && msg.contains(what),
            "{msg}"
        );
    }
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
    assert!(dir.is_dir());
    assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
}

#[test]
fn diff_output_leaves_a_device_node_alone() {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    let s = Store::new("vfs");
    layer_with(&s, 10);
    // A /dev/null of our own (char 1:3): `diff -o /dev/null` used to delete it on failure.
    let null = s.scratch("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(made.success());
    let before = fs::symlink_metadata(&null).unwrap();
    let msg = s.err(&["diff", "l1", "-o", null.to_str().unwrap()]);
    assert!(
        msg.contains(null.to_str().unwrap()) && msg.contains("a character device"),
        "{msg}"
    );
    let after = fs::symlink_metadata(&null).unwrap();
    assert!(after.file_type().is_char_device());
    assert_eq!((after.ino(), after.rdev()), (before.ino(), before.rdev()));
}

#[test]
fn diff_output_removes_only_a_file_it_created() {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    let s = Store::new("vfs");
    layer_with(&s, 3 << 20);
    // A filesystem too small for the layer's tar: the write fails half-way.
    let small = TmpMount::tmpfs(s.dir.path(), "1m");
    let existing = small.path.join("existing.tar");
    fs::write(&existing, "old content").unwrap();
    let msg = s.err(&["diff", "l1", "-o", existing.to_str().unwrap()]);
    assert!(msg.contains(existing.to_str().unwrap()), "{msg}");
    // Not ours: truncated and partly written, but still there.
    assert!(fs::symlink_metadata(&existing).unwrap().is_file());
    let fresh = small.path.join("fresh.tar");
    let msg = s.err(&["diff", "l1", "-o", fresh.to_str().unwrap()]);
    assert!(msg.contains(fresh.to_str().unwrap()), "{msg}");
    assert!(!fresh.exists(), "a file diff created must go when it fails");
    // With room, both work; a new file is private to its owner.
    fs::remove_file(&existing).unwrap();
    let out = s.scratch("ok.tar");
    s.ok(&["diff", "l1", "-o", out.to_str().unwrap()]);
    assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
    let first = fs::read(&out).unwrap();
    fs::write(&out, vec![b'q'; 8 << 20]).unwrap();
    s.ok(&["diff", "l1", "-o", out.to_str().unwrap()]);
    assert_eq!(
        fs::read(&out).unwrap(),
        first,
        "an existing file is truncated"
    );
}

#[test]
fn diff_output_keeps_a_busy_executable() {
    let s = Store::new("vfs");
    layer_with(&s, 10);
    // A running program's file cannot be opened for writing (ETXTBSY); it must not be deleted.
    let exe = s.scratch("sleep");
    fs::copy("/bin/sleep", &exe).unwrap();
    let mut running = Command::new(&exe)
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let res = s.cmd(&["diff", "l1", "-o", exe.to_str().unwrap()]).output();
    running.kill().unwrap();
    running.wait().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    if res.status.success() {
        // A kernel that allows writing a running program: then the diff simply landed there.
        eprintln!("note: this kernel allowed opening a running executable for writing");
    } else {
        assert!(stderr.contains(exe.to_str().unwrap()), "{stderr}");
    }
    assert!(exe.is_file(), "diff -o removed a file it did not create");
}

/// The "Max open files" soft and hard limits of process `pid`.
fn nofile_limits(pid: u32) -> (String, String) {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

#[test]
fn graphctl_raises_its_open_file_limit() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    // Start graphctl with the common soft limit of 1024 (the hard one above it): `apply` then
    // blocks reading its layer from our pipe, after start-up, so its limits can be read.
    let hard_ok = Command::new("sh")
        .args([
            "-c",
            "ulimit -Hn 4096 2>/dev/null; test \"$(ulimit -Hn)\" -gt 1024",
        ])
        .status()
        .unwrap()
        .success();
    if !hard_ok {
        eprintln!("skipping: the hard open-file limit here is 1024 and cannot be raised");
        test_support::record_skip("the hard open-file limit here is 1024 and cannot be raised");
        return;
    }
    let mut c = s.cmd(&["-vv", "apply", "--parent", "base", "l1"]);
    let program = PathBuf::from(c.cmd.get_program());
    let args: Vec<_> = c.cmd.get_args().map(|a| a.to_owned()).collect();
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(
            "h=$(ulimit -Hn); [ \"$h\" = unlimited ] || [ \"$h\" -gt 1024 ] || ulimit -Hn 4096; \
             ulimit -Sn 1024 && exec \"$0\" \"$@\"",
        )
        .arg(&program)
        .args(&args)
        .envs(c.cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .env("RUST_LOG", "graphctl=debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in c.cmd.get_envs() {
        if v.is_none() {
            sh.env_remove(k);
        }
    }
    c.cmd = sh;
    let mut child = c.cmd.spawn().unwrap();
    let pid = child.id();
    let stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // graphctl logs the limit right after it sets it, before it reads stdin.
    let mut line = String::new();
    let mut seen = false;
    while stderr.read_line(&mut line).unwrap() > 0 {
        if line.contains("open-file limit") {
            seen = true;
            break;
        }
        line.clear();
    }
    assert!(seen, "graphctl never logged its open-file limit");
    assert!(line.contains("before: Some(1024)"), "{line}");
    let (soft, hard) = nofile_limits(pid);
    drop(stdin);
    child.wait().unwrap();
    assert_ne!(soft, "1024", "{line}");
    assert_eq!(soft, hard, "{line}");
}
#[test]
fn readme_config_example_parses_and_works() {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("```toml\n[storage]").unwrap() + "```toml\n".len();
    let block = &readme[start..];
    let block = &block[..block.find("```").unwrap()];
    assert!(block.contains("mount_options"), "{block}");
    let s = Store::new("vfs");
    let config = s.scratch("storage.toml");
    fs::write(&config, block).unwrap();
    let driver = if skip_root_test().is_none() {
        "overlay"
    } else {
        "vfs"
    };
    // The example names its own driver and root; --root keeps the test out of /var/lib.
    let mut cmd = s.cmd_auto(&["--driver", driver, "status"]);
    cmd.cmd.env("GRAPHCTL_CONFIG", &config);
    let out = cmd.ok();
    assert!(out.contains(&format!("Driver: {driver}")), "{out}");
    if driver != "overlay" {
        return;
    }
    // Its mount options reach the mount: a read-write layer is mounted nodev.
    for args in [
        &["create", "base"][..],
        &["create", "--rw", "--parent", "base", "ctr"],
    ] {
        let mut cmd = s.cmd_auto(&[&["--driver", driver][..], args].concat());
        cmd.cmd.env("GRAPHCTL_CONFIG", &config);
        cmd.ok();
    }
    let mut cmd = s.cmd_auto(&["--driver", driver, "mount", "ctr"]);
    cmd.cmd.env("GRAPHCTL_CONFIG", &config);
    let merged = cmd.ok().trim_end().to_string();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(merged.as_str()))
        .unwrap()
        .to_string();
    let mut cmd = s.cmd_auto(&["--driver", driver, "unmount", "ctr"]);
    cmd.cmd.env("GRAPHCTL_CONFIG", &config);
    cmd.ok();
    let per_mount = line.split(' ').nth(5).unwrap();
    assert!(per_mount.split(',').any(|o| o == "nodev"), "{line}");
}

/// The per-mount options (field 6 of /proc/self/mountinfo) of the mount at `path`.
fn mount_flags_of(path: &str) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path))
        .unwrap_or_else(|| panic!("{path} is not mounted"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn mount_options_set_mount_flags_on_a_real_overlay() {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    let s = Store::new("overlay");
    let opt = ["-o", "mount_options=nodev, nosuid,xino=off"];
    s.ok(&[&opt[..], &["create", "base"]].concat());
    s.ok(&[&opt[..], &["create", "--rw", "--parent", "base", "ctr"]].concat());
    let merged = s.ok(&[&opt[..], &["mount", "ctr"]].concat());
    let flags = mount_flags_of(merged.trim_end());
    s.ok(&["unmount", "ctr"]);
    for want in ["nodev", "nosuid"] {
        assert!(flags.iter().any(|f| f == want), "{want}: {flags:?}");
    }
    assert!(!flags.iter().any(|f| f == "noexec"), "{flags:?}");
    // Without the option the same layer mounts without them.
    let merged = s.ok(&["mount", "ctr"]);
    let flags = mount_flags_of(merged.trim_end());
    s.ok(&["unmount", "ctr"]);
    assert!(!flags.iter().any(|f| f == "nodev"), "{flags:?}");
}

#[test]
fn mount_options_cannot_override_the_driver() {
    if let Some(reason) = skip_root_test() {
        eprintln!("skipping: {reason}");
        return;
    }
    let s = Store::new("overlay");
    s.ok(&["create", "base"]);
    s.ok(&["create", "--rw", "--parent", "base", "ctr"]);
    let host = s.scratch("host");
    fs::create_dir(&host).unwrap();
    let smuggled = format!("upperdir={}", host.display());
    for (value, name) in [
        (smuggled.as_str(), "upperdir"),
        ("nodev,lowerdir=/", "lowerdir"),
        ("workdir=/tmp", "workdir"),
        ("metacopy=on", "metacopy"),
        ("redirect_dir=on", "redirect_dir"),
        ("userxattr", "userxattr"),
        ("volatile", "volatile"),
        ("index=on", "index"),
        ("ro", "ro"),
    ] {
        let opt = format!("mount_options={value}");
        let msg = s.err(&["-o", &opt, "mount", "ctr"]);
        assert!(
            msg.contains(&format!("{name:?}")) && msg.contains("mount_options"),
            "{value}: {msg}"
        );
        assert!(msg.contains("command line"), "{msg}");
    }
    for value in [
        "nodev,,upperdir=/x",
        "=x",
        ",nodev",
        "context=\"a,upperdir=/x",
    ] {
        let opt = format!("mount_options={value}");
        let msg = s.err(&["-o", &opt, "ls"]);
        assert!(msg.contains("mount_options"), "{value}: {msg}");
    }
    // Through the environment and the config file the option names its origin too.
    let mut c = s.cmd(&["ls"]);
    c.cmd
        .env("GRAPHDRIVER_OPTS", "overlay.mount_options=upperdir=/x");
    let msg = c.err();
    assert!(
        msg.contains("\"upperdir\"") && msg.contains("GRAPHDRIVER_OPTS"),
        "{msg}"
    );
    let config = s.scratch("storage.toml");
    fs::write(
        &config,
        "[storage]\n\n[storage.options.overlay]\nmount_options = \"nodev,workdir=/x\"\n",
    )
    .unwrap();
    let mut c = s.cmd(&["ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &config);
    let msg = c.err();
    assert!(
        msg.contains("\"workdir\"") && msg.contains(&format!("{}:4", config.display())),
        "{msg}"
    );
    // Nothing was mounted and the host directory is untouched.
    assert_eq!(fs::read_dir(&host).unwrap().count(), 0);
    assert_eq!(s.ok(&["ls"]), "base -\nctr base\n");
}

driver_test!(a_socket_left_out_of_a_diff_is_reported, |driver| {
    // Issue 17: TarStream::skipped() was never read, so a socket vanished from diffs silently.
    if driver == "overlay" && skip_root_test().is_some() {
        eprintln!("skipping overlay: needs root");
        return;
    }
    let s = Store::new(driver);
    s.ok(&["create", "--rw", "ctr"]);
    let path = PathBuf::from(s.ok(&["mount", "ctr"]).trim());
    fs::write(path.join("kept"), b"k").unwrap();
    let listener = std::os::unix::net::UnixListener::bind(path.join("app.sock")).unwrap();
    drop(listener);
    s.ok(&["unmount", "ctr"]);
    let out = s.scratch("ctr.tar");
    let (_, stderr) = s
        .cmd(&["diff", "ctr", "-o", out.to_str().unwrap()])
        .status(0);
    assert!(
        stderr.contains("left out of the layer tar") && stderr.contains("app.sock"),
        "{stderr}"
    );
    let mut names = Vec::new();
    for e in tar::Archive::new(fs::File::open(&out).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert!(names.iter().any(|n| n.ends_with("kept")), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("app.sock")), "{names:?}");
});
