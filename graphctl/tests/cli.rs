//! The command line itself: exit codes, usage errors, `--json` shapes, `drivers`, `status`.

use crate::util::Store;

#[test]
fn usage_errors_exit_2() {
    let s = Store::new("vfs");
    s.cmd(&[]).status(2);
    s.cmd(&["no-such-command"]).status(2);
    s.cmd(&["create"]).status(2);
    s.cmd(&["ls", "--no-such-flag"]).status(2);
    let (stdout, _) = s.cmd(&["--help"]).status(0);
    assert!(stdout.contains("import"), "{stdout}");
}

#[test]
fn exists_is_silent_and_uses_the_exit_status() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    let (out, err) = s.cmd(&["exists", "base"]).status(0);
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    let (out, err) = s.cmd(&["exists", "nope"]).status(1);
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
}

#[test]
fn drivers_lists_every_driver_even_with_no_store() {
    let s = Store::new("vfs");
    let text = s.ok(&["drivers"]);
    assert!(text.lines().any(|l| l == "vfs\tsupported"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("overlay\t")), "{text}");
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "drivers"])).unwrap();
    let vfs = v["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "vfs")
        .unwrap();
    assert_eq!(vfs["supported"], true);
    // Works with an unknown --driver too: it lists, it does not open.
    s.cmd(&["drivers"]).ok();
}

#[test]
fn status_and_ls_json() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    s.ok(&["create", "--parent", "base", "--rw", "ctr"]);
    let text = s.ok(&["status"]);
    assert!(text.starts_with("Driver: vfs\n"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "status"])).unwrap();
    assert_eq!(v["driver"], "vfs");
    assert_eq!(v["home"], s.root.join("vfs").to_str().unwrap());
    assert!(v["status"].is_object());
    assert_eq!(s.ok(&["ls"]), "base -\nctr base\n");
    let mut v: serde_json::Value = serde_json::from_str(&s.ok(&["ls", "--json"])).unwrap();
    let mut v = v["layers"].take();
    for l in v.as_array_mut().unwrap() {
        // The creation time is the clock's (checked in info.rs).
        assert!(l["created"].is_string(), "{l}");
        l.as_object_mut().unwrap().remove("created");
    }
    assert_eq!(
        v,
        serde_json::json!([
            {"id": "base", "parent": null, "kind": "image", "read_write": false,
             "diff_id": null, "mount_count": 0},
            {"id": "ctr", "parent": "base", "kind": "read-write", "read_write": true,
             "diff_id": null, "mount_count": 0},
        ])
    );
}

#[test]
fn options_flags_env_and_file_precedence() {
    let s = Store::new("vfs");
    // The config file names an unknown driver; the flag wins over it.
    let conf = s.scratch("storage.toml");
    std::fs::write(&conf, "[storage]\ndriver = \"nosuch\"\n").unwrap();
    let mut c = s.cmd(&["ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &conf);
    c.ok();
    // The environment wins over the file; a bad option from it is reported with its origin.
    let mut c = s.cmd(&["-o", "vfs.nosuchoption=1", "ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &conf);
    let msg = c.err();
    assert!(
        msg.contains("nosuchoption") && msg.contains("command line"),
        "{msg}"
    );
}

#[test]
fn automatic_selection_notes_a_fallback_or_picks_overlay2() {
    let s = Store::new("vfs");
    let (out, err) = s.cmd_auto(&["--json", "status"]).status(0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    if v["driver"] == "vfs" {
        assert!(err.contains("note: using driver vfs"), "{err}");
    } else {
        // The first of the default priority that works here.
        assert_eq!(v["driver"], "overlay2");
    }
}

#[test]
fn closed_stdout_is_not_an_error() {
    let s = Store::new("vfs");
    let tar = crate::util::layer_tar(&[("big", &vec![b'q'; 1 << 20])]);
    s.cmd(&["apply", "base", "-"]).stdin(tar).ok();
    // `graphctl diff base | head -c 1`: the pipe closes long before the tar is written.
    let script =
        r#""$0" --root "$1" --driver vfs diff base | head -c 1 >/dev/null; echo ${PIPESTATUS[0]}"#;
    let out = std::process::Command::new("bash")
        .args(["-c", script, env!("CARGO_BIN_EXE_graphctl")])
        .arg(&s.root)
        .env("GRAPHCTL_CONFIG", s.empty_config())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("error"),
        "{out:?}"
    );
}

#[test]
fn config_named_by_the_environment_must_exist() {
    let s = Store::new("vfs");
    let missing = s.scratch("missing.toml");
    let mut c = s.cmd(&["ls"]);
    c.cmd.env("GRAPHCTL_CONFIG", &missing);
    let msg = c.err();
    assert!(
        msg.contains("GRAPHCTL_CONFIG") && msg.contains(missing.to_str().unwrap()),
        "{msg}"
    );
}

/// A user's world (nobody's when the tests run as root): a home in a directory of the system
/// temp dir that the user can enter but not write, and a copy of graphctl it can run (the target
/// dir may sit under a private directory).
struct UserWorld {
    dir: tempfile::TempDir,
    home: std::path::PathBuf,
    exe: std::path::PathBuf,
}

impl UserWorld {
    fn new() -> UserWorld {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("graphctl-user-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let exe = dir.path().join("graphctl");
        let bin = env!("CARGO_BIN_EXE_graphctl");
        if std::fs::hard_link(bin, &exe).is_err() {
            std::fs::copy(bin, &exe).unwrap();
        }
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        UserWorld { dir, home, exe }
    }

    /// A new directory `name` beside the home that belongs to the user.
    fn own_dir(&self, name: &str) -> std::path::PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        if crate::util::is_root() {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        }
        dir
    }

    /// `graphctl ARGS` as the user, with no config named: the default config path and the
    /// default root are under its home.
    fn cmd(&self, args: &[&str]) -> crate::util::TestCommand {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("HOME", &self.home)
            .env_remove("GRAPHCTL_CONFIG")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env_remove("GRAPHDRIVER")
            .env_remove("GRAPHDRIVER_OPTS")
            .env_remove("RUST_LOG");
        crate::util::as_unprivileged(&mut cmd);
        crate::util::TestCommand::new(cmd)
    }
}

#[test]
fn unreadable_default_config_is_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let user = UserWorld::new();
    let conf_dir = user.home.join(".config/graphctl");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("storage.toml");
    std::fs::write(&conf, "[storage]\ndriver = \"nosuch\"\n").unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o000)).unwrap();
    let root = user.own_dir("root");
    let (out, err) = user
        .cmd(&["--root", root.to_str().unwrap(), "--driver", "vfs", "ls"])
        .status(0);
    assert_eq!(out, "");
    assert!(
        err.starts_with("warning: ")
            && err.contains(conf.to_str().unwrap())
            && err.contains("--config"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

driver_test!(exists_answers_125_when_it_cannot_tell, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "base"]);
    let (help, _) = s.cmd(&["exists", "--help"]).status(0);
    assert!(help.contains("125"), "{help}");
    // An invalid id, a store that cannot be read, a planted entry: errors, not "missing".
    let (out, err) = s.cmd(&["exists", "../x"]).status(125);
    assert!(out.is_empty() && err.contains("invalid layer id"), "{err}");
    let planted = s.root.join(driver).join("evil");
    std::os::unix::fs::symlink("/etc", &planted).unwrap();
    let (_, err) = s.cmd(&["exists", "evil"]).status(125);
    assert!(
        err.lines()
            .any(|l| l.starts_with("error:") && l.contains("evil")),
        "{err}"
    );
    std::fs::remove_file(&planted).unwrap();
    let file = Store::at(driver, s.scratch("not-a-dir"));
    std::fs::write(&file.root, "").unwrap();
    let (_, err) = file.cmd(&["exists", "base"]).status(125);
    assert!(err.contains("not-a-dir"), "{err}");
    // A config error is an error too.
    let mut c = s.cmd(&["exists", "base"]);
    c.cmd.env("GRAPHCTL_CONFIG", s.scratch("missing.toml"));
    c.status(125);
    s.cmd(&["exists", "base"]).status(0);
    s.cmd(&["exists", "nope"]).status(1);
});

driver_test!(unmount_of_an_unknown_layer_is_an_error, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "--rw", "ctr"]);
    let msg = s.err(&["unmount", "nope"]);
    assert!(
        msg.contains("nope") && msg.contains("does not exist"),
        "{msg}"
    );
    s.ok(&["mount", "ctr"]);
    s.ok(&["unmount", "ctr"]);
});

#[test]
fn option_errors_say_what_is_wrong() {
    let s = Store::new("vfs");
    s.ok(&["create", "base"]);
    // Automatic selection finds vfs's layers: a bad option is no reason to switch drivers.
    let msg = s.cmd_auto(&["-o", "foo=bar", "ls"]).err();
    assert!(!msg.contains("switch"), "{msg}");
    assert!(
        msg.contains("\"foo\"") && msg.contains("unknown option") && msg.contains("vfs"),
        "{msg}"
    );
    for bad in ["nokey", "=x"] {
        let msg = s.cmd_auto(&["-o", bad, "ls"]).err();
        assert!(!msg.contains("driver :"), "{msg}");
        assert!(
            msg.contains(&format!("{bad:?}")) && msg.contains("KEY=VALUE"),
            "{msg}"
        );
    }
}

#[test]
fn permission_hint_does_not_suggest_the_path_that_failed() {
    use std::os::unix::fs::PermissionsExt;
    // The default root, under a home the user cannot write, cannot be made.
    let user = UserWorld::new();
    std::fs::set_permissions(&user.home, std::fs::Permissions::from_mode(0o555)).unwrap();
    let msg = user.cmd(&["--driver", "vfs", "ls"]).err();
    let default_root = user.home.join(".local/share/graphctl");
    assert!(msg.contains("Permission denied"), "{msg}");
    assert!(
        msg.contains("may not write") && msg.contains("another --root"),
        "{msg}"
    );
    assert!(
        !msg.contains(&format!("--root {}", default_root.display())),
        "{msg}"
    );
}

/// Runs `cmd` with the slave of a new pty as the stdio streams `on` names ("stdin", "stdout",
/// "stderr"); the others are pipes (stdin empty). Returns (exit code, stdout, stderr), the
/// terminal's output standing in for the streams it replaced.
fn on_terminal(mut cmd: std::process::Command, on: &[&str]) -> (Option<i32>, String, String) {
    use std::process::Stdio;
    let (master, slave) = crate::util::pty();
    let stdio = |name: &str, otherwise: fn() -> Stdio| {
        if on.contains(&name) {
            Stdio::from(slave.try_clone().unwrap())
        } else {
            otherwise()
        }
    };
    cmd.stdin(stdio("stdin", Stdio::null))
        .stdout(stdio("stdout", Stdio::piped))
        .stderr(stdio("stderr", Stdio::piped));
    let child = cmd.spawn().unwrap();
    // The pty reports its end once no slave descriptor is left open, ours included.
    drop(cmd);
    drop(slave);
    let reader = std::thread::spawn(move || crate::util::read_pty(master));
    let out = child.wait_with_output().unwrap();
    let tty = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let text = |bytes: &[u8], name: &str| {
        if on.contains(&name) {
            tty.clone()
        } else {
            String::from_utf8_lossy(bytes).into_owned()
        }
    };
    (
        out.status.code(),
        text(&out.stdout, "stdout"),
        text(&out.stderr, "stderr"),
    )
}

driver_test!(warnings_are_plain_lines_off_a_terminal, |driver| {
    let s = Store::new(driver);
    s.ok(&["create", "base"]);
    // A planted symlink: the store warns about it when it opens.
    std::os::unix::fs::symlink("/etc", s.root.join(driver).join("evil")).unwrap();
    let (_, err) = s.cmd(&["ls"]).status(1);
    assert!(err.contains("warning: "), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
    // No Debug dump of the store's records: no type name, no empty fields.
    assert!(
        !err.contains("Recovery {") && !err.contains(": []"),
        "{err}"
    );
    // On a terminal the level is coloured, unless NO_COLOR says otherwise.
    let (code, _, tty) = on_terminal(s.cmd(&["ls"]).cmd, &["stderr"]);
    assert_eq!(code, Some(1), "{tty}");
    assert!(tty.contains("\x1b["), "{tty:?}");
    let mut c = s.cmd(&["ls"]).cmd;
    c.env("NO_COLOR", "1");
    let (_, _, tty) = on_terminal(c, &["stderr"]);
    assert!(
        tty.contains("warning: ") && !tty.contains('\x1b'),
        "{tty:?}"
    );
});

driver_test!(diff_and_apply_refuse_a_terminal, |driver| {
    let s = Store::new(driver);
    s.cmd(&["apply", "base", "-"])
        .stdin(crate::util::layer_tar(&[("f", b"f")]))
        .ok();
    let (code, out, err) = on_terminal(s.cmd(&["diff", "base"]).cmd, &["stdout"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out:?}");
    assert!(
        err.contains("terminal") && err.contains("-o FILE") && err.contains('>'),
        "{err}"
    );
    // With -o, the terminal on stdout does not matter.
    let file = s.scratch("base.tar");
    let (code, _, err) = on_terminal(
        s.cmd(&["diff", "base", "-o", file.to_str().unwrap()]).cmd,
        &["stdout"],
    );
    assert_eq!(code, Some(0), "{err}");
    for args in [&["apply", "next"][..], &["apply", "next", "-"]] {
        let (code, _, err) = on_terminal(s.cmd(args).cmd, &["stdin"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("terminal") && err.contains("argument") && err.contains('<'),
            "{err}"
        );
    }
    // A file argument is read, whatever stdin is.
    let (code, _, err) = on_terminal(
        s.cmd(&["apply", "next", file.to_str().unwrap()]).cmd,
        &["stdin"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s.ok(&["ls"]), "base -\nnext -\n");
});
