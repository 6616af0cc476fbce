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
    let vfs = v
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
fn automatic_selection_notes_a_fallback_or_picks_overlay() {
    let s = Store::new("vfs");
    let (out, err) = s.cmd_auto(&["--json", "status"]).status(0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    if v["driver"] == "vfs" {
        assert!(err.contains("note: using driver vfs"), "{err}");
    } else {
        assert_eq!(v["driver"], "overlay");
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
        .env("GRAPHCTL_CONFIG", s.scratch("none.toml"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("error"),
        "{out:?}"
    );
}
